"""Verification of an exported HF folder in a fresh process in which forge-toolkit cannot be imported.

The source model runs here (the toolkit registered); the exported folder runs in a child interpreter
(`export/clean_load.py`, started with `python -I` and an import hook that blocks `toolkit`, `export`,
`eval`) through the Auto classes: the native transformers class, or the folder's own modelling files with
`trust_remote_code=True`. Compared:
- tokenization of the prompts and the chat-template rendering of a conversation (token ids),
- next-token logits at every position of every prompt, in float32: max |delta| <= 1e-5. A 16-bit export is
  compared with the source rounded to that dtype (the rewrite must be exact); the rounding itself is
  reported as `dtype_rounding_max_abs`, without a bound,
- a greedy continuation of the conversation (identical tokens),
- the class that loaded (the native architecture for a rewrite, a `transformers_modules` class for remote
  code) and that the project was not importable,
- that every checkpoint tensor name matched a parameter of that class and none was missing (vLLM's loaders
  refuse unknown names where transformers only warns).
vLLM itself, where its environment is set up, is the check of how vLLM runs the folder (export/verify_vllm.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from export.verify import CONVERSATION, PROMPTS
from toolkit.errors import ExportError

GREEDY_TOKENS = 16
MAX_ABS_LOGIT_DELTA = 1e-5
CHILD = Path(__file__).with_name("clean_load.py")
CHILD_TIMEOUT_S = 600


def run_clean(folder: Path, *, remote_code: bool, adapter: Path | None = None) -> dict[str, Any]:
    """What `folder` (plus `adapter`) computes in a fresh interpreter that cannot import forge-toolkit."""
    return _load_clean(
        folder,
        {
            "remote_code": remote_code,
            "adapter": str(adapter) if adapter else None,
            # An adapter folder that carries its own tokenizer (a LoRA run's final/ does) is read for it.
            "tokenizer": str(adapter) if adapter and (adapter / "tokenizer.json").exists() else None,
            "prompts": PROMPTS,
            "conversation": CONVERSATION,
            "greedy_tokens": GREEDY_TOKENS,
        },
    )


def _load_clean(
    folder: Path, request: dict[str, Any], inputs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run export/clean_load.py on `folder` with `request` (and `inputs` saved beside it for the child to
    read), in a private work folder; its result, or an ExportError saying why the folder did not load."""
    import torch

    with tempfile.TemporaryDirectory(prefix="clean-load-") as tmp:
        request = {**request, "folder": str(folder), "out": str(Path(tmp) / "result.pt")}
        if inputs is not None:
            torch.save(inputs, Path(tmp) / "inputs.pt")
            request["inputs"] = str(Path(tmp) / "inputs.pt")
        try:
            proc = run_child(Path(sys.executable), CHILD, request, Path(tmp), timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            raise ExportError(f"loading {folder} in a clean process took over {CHILD_TIMEOUT_S} s") from error
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise ExportError(f"{folder} does not load without forge-toolkit:\n{tail}")
        return torch.load(request["out"], weights_only=True)


def run_child(
    python: Path, script: Path, request: dict[str, Any], workdir: Path, *, timeout: int
) -> subprocess.CompletedProcess:
    """`python -I script workdir/request.json` in `workdir`, output captured: the request written there first;
    remote code copied into a private module cache there, never the user's HF cache; nothing fetched from the
    Hub; PYTHONPATH dropped. Raises subprocess.TimeoutExpired past `timeout` seconds."""
    (workdir / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(python), "-I", str(script), str(workdir / "request.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reference(
    folder: Path,
    dtype: str,
    *,
    adapter: Path | None = None,
    tokenizer_folder: Path | None = None,
    vllm_rows: bool = False,
) -> dict[str, Any]:
    """The same measurements on the source model in this process (the toolkit's architectures registered)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import register_auto_classes

    register_auto_classes()  # the Auto classes resolve the toolkit's architectures

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rounding = 0.0
    ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    if dtype != "float32":
        # The export holds weights rounded to `dtype`; the source is rounded the same way so that the
        # comparison measures the rewrite, not the rounding (which is reported on its own).
        with torch.no_grad():
            before = [model(input_ids=torch.tensor([row])).logits[0] for row in ids]
            round_weights(model, dtype)
            after = [model(input_ids=torch.tensor([row])).logits[0] for row in ids]
        rounding = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    chat = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([row])).logits[0] for row in ids]
        greedy = model.generate(
            input_ids=torch.tensor([chat_ids]),
            attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(chat_ids) :].tolist()
        # With `vllm_rows`, for the check in vLLM (export/verify_vllm.py): every prompt and the chat prompt,
        # their logits, and a greedy continuation of each taken from the raw logits with nothing masked or
        # stopping it (vLLM's `ignore_eos`), with the log-probability of every generated token.
        rows = ids + [chat_ids] if vllm_rows else []
        row_logits = logits + [model(input_ids=torch.tensor([chat_ids])).logits[0]] if vllm_rows else []
        row_greedy, row_greedy_logprobs = [], []
        for row in rows:
            sequence, logprobs = list(row), []
            for _ in range(GREEDY_TOKENS):
                last = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0, -1].double(), -1)
                token = int(last.argmax())
                sequence.append(token)
                logprobs.append(float(last[token]))
            row_greedy.append(sequence[len(row) :])
            row_greedy_logprobs.append(logprobs)
    return {
        "ids": ids,
        "chat_ids": chat_ids,
        "logits": logits,
        "greedy": greedy,
        "rounding": rounding,
        "row_logits": row_logits,
        "row_greedy": row_greedy,
        "row_greedy_logprobs": row_greedy_logprobs,
    }


def _check(measure: str, value: float, op: str, bound: float) -> dict[str, Any]:
    ok = value <= bound if op == "<=" else value == bound
    return {"measure": measure, "value": value, "bound": f"{op} {bound:g}", "ok": bool(ok)}


def max_abs_delta(expected: list[Any], actual: list[Any]) -> float:
    """Largest |difference| between two lists of logit tensors; infinite when their shapes differ."""
    if not all(a.shape == b.shape for a, b in zip(expected, actual, strict=True)):
        return float("inf")
    return max(float((a - b).abs().max()) for a, b in zip(expected, actual, strict=True))


def compare(source: dict[str, Any], exported: dict[str, Any], expected_class: str) -> dict[str, Any]:
    """Checks of `exported` (from `run_clean`) against `source` (from `reference`), each with its bound;
    `expected_class` is a regex the loaded class's dotted name must match."""
    checks = [
        _check(
            "max_abs_logit_delta",
            max_abs_delta(source["logits"], exported["logits"]),
            "<=",
            MAX_ABS_LOGIT_DELTA,
        ),
        _check("greedy_identical", float(source["greedy"] == exported["greedy"]), "==", 1.0),
        _check("tokenization_identical", float(source["ids"] == exported["ids"]), "==", 1.0),
        _check("chat_template_identical", float(source["chat_ids"] == exported["chat_ids"]), "==", 1.0),
        *_loading_checks(exported, expected_class),
    ]
    return _section(exported, expected_class, checks, source["rounding"], greedy_tokens=GREEDY_TOKENS)


def _loading_checks(exported: dict[str, Any], expected_class: str) -> list[dict[str, Any]]:
    """What every clean load must show: the expected class, without forge-toolkit, every checkpoint name used."""
    return [
        _check(
            "expected_class_loaded",
            float(bool(re.fullmatch(expected_class, exported["loaded_class"]))),
            "==",
            1.0,
        ),
        _check("loads_without_forge_toolkit", float(not exported["project_importable"]), "==", 1.0),
        _check("checkpoint_names_match", float(not exported["loading_problems"]), "==", 1.0),
    ]


def _section(
    exported: dict[str, Any], expected_class: str, checks: list[dict[str, Any]], rounding: float, **extra: Any
) -> dict[str, Any]:
    """The report section of one verified folder."""
    return {
        "loaded_class": exported["loaded_class"],
        "loading_problems": exported["loading_problems"],
        "expected_class": expected_class,
        **extra,
        "measures": {c["measure"]: c["value"] for c in checks} | {"dtype_rounding_max_abs": rounding},
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }


def verify_folder(
    folder: Path,
    source_folder: Path,
    *,
    dtype: str,
    remote_code: bool,
    expected_class: str,
    adapter: Path | None = None,
    source_adapter: Path | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load `folder` (with `adapter`) in a clean process and compare it with `source_folder` (with
    `source_adapter`), or with `source` when its `reference` was computed already; returns the report section
    (`ok` is False when a bound is missed)."""
    if source is None:
        source = source_reference(source_folder, dtype, source_adapter)
    exported = run_clean(folder, remote_code=remote_code, adapter=adapter)
    return compare(source, exported, expected_class)


def round_weights(model: Any, dtype: str) -> None:
    """Round `model`'s float32 weights to `dtype` and back, in place: the values a `dtype` export holds."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(getattr(torch, dtype)).float())


def model_outputs(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Every tensor field of `model(**inputs)`, by name (a ModelOutput of a model that is not a language model)."""
    import torch

    with torch.no_grad():
        out = model(**inputs)
    return {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}


def verify_outputs(folder: Path, source_folder: Path, *, dtype: str, expected_class: str) -> dict[str, Any]:
    """A model that is not a language model: `folder` loaded in a clean process (AutoModel, remote code) and
    run on the source model's `dummy_inputs` must give the source's outputs, field by field (the source's
    weights rounded to `dtype` first, as the folder's are)."""
    import torch
    from transformers import AutoModel

    from toolkit.models import register_auto_classes

    register_auto_classes()
    model = AutoModel.from_pretrained(source_folder, dtype=torch.float32).eval()
    inputs = model.dummy_inputs
    exact = model_outputs(model, inputs)
    round_weights(model, dtype)
    expected = model_outputs(model, inputs)
    rounding = max(float((exact[k] - expected[k]).abs().max()) for k in expected)
    exported = _load_clean(folder, {"kind": "outputs", "remote_code": True}, inputs)
    outputs = exported["outputs"]
    same_fields = sorted(outputs) == sorted(expected)
    delta = (
        max_abs_delta([expected[k] for k in expected], [outputs[k] for k in expected])
        if same_fields
        else float("inf")
    )
    checks = [
        _check("max_abs_output_delta", delta, "<=", MAX_ABS_LOGIT_DELTA),
        _check("same_output_fields", float(same_fields), "==", 1.0),
        *_loading_checks(exported, expected_class),
    ]
    return _section(exported, expected_class, checks, rounding, outputs=sorted(expected))


def source_reference(
    source_folder: Path, dtype: str, source_adapter: Path | None = None, *, vllm_rows: bool = False
) -> dict[str, Any]:
    """`reference` of a source model folder, with its adapter (and the adapter's tokenizer, when it has one);
    `vllm_rows` adds what the check in vLLM compares."""
    return reference(
        source_folder,
        dtype,
        adapter=source_adapter,
        tokenizer_folder=source_adapter
        if source_adapter and (source_adapter / "tokenizer.json").exists()
        else None,
        vllm_rows=vllm_rows,
    )


def markdown_table(section: dict[str, Any], title: str) -> str:
    """One verified folder's checks as a markdown table."""
    lines = [
        f"{title} (loaded as `{section['loaded_class']}`)",
        "",
        "| measure | value | bound | ok |",
        "|---|---|---|---|",
    ]
    for check in section["checks"]:
        lines.append(
            f"| {check['measure']} | {check['value']:.3g} | {check['bound']} | {'yes' if check['ok'] else 'NO'} |"
        )
    lines.append(f"| dtype_rounding_max_abs | {section['measures']['dtype_rounding_max_abs']:.3g} | - | - |")
    for problem in section.get("loading_problems") or ():
        lines.append(f"\ncheckpoint: {problem}")
    return "\n".join(lines)
