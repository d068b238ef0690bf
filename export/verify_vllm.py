"""Verification of an exported folder in vLLM itself, through the vLLM environment's own Python.

vLLM pins its own torch and transformers, so it lives in a separate environment (`make vllm-env` writes
`.venv-vllm` from `constraints-vllm.txt`); this process talks to it only through a subprocess running
`export/vllm_check.py`. Which Python that is: `$FORGE_VLLM_PYTHON`, else this interpreter when it has vLLM (a
GPU machine's environment), else `.venv-vllm/bin/python` in the working directory or beside this package;
`FORGE_VLLM_PYTHON=none` turns vLLM off.

For each route (vLLM's native class for the folder's architecture; its Transformers backend for remote code)
the source model's figures (`export/verify_hf.reference`, computed here with the toolkit registered) are
compared with vLLM's on the same token ids:
- greedy tokens of every prompt and of the chat prompt, a fixed count with end-of-sequence ignored: identical;
- the log-probability of every prompt token and every generated token: max |delta| <= LOGPROB_BOUND;
- vLLM's tokenizer on the prompts and on the chat template's rendering: the same ids as the source's.
A route vLLM has no class for is reported as not run; at least the form's own route must run and pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from export.verify import CONVERSATION, PROMPTS
from export.verify_hf import run_child
from toolkit.errors import ExportError

PYTHON_ENV = "FORGE_VLLM_PYTHON"
DISABLED = "none"  # FORGE_VLLM_PYTHON=none: no vLLM here, even where one is set up
VENV = ".venv-vllm"
SETUP = "make vllm-env"
CHILD = Path(__file__).with_name("vllm_check.py")
# Engine start is 40-60 s for a tiny model on two cores; a 7B model's load takes minutes.
CHILD_TIMEOUT_S = 1800
# vLLM's float32 CPU kernels sum in another order than transformers' (packed prefill, paged attention): on the
# tiny and demo models the log-probabilities agree to ~1e-5; a wrong weight, norm or position moves them by
# far more than this bound.
LOGPROB_BOUND = 1e-3
MAX_MODEL_LEN = 512


def vllm_python() -> Path | None:
    """The Python that runs vLLM here, or None (see the module docstring for the order)."""
    named = os.environ.get(PYTHON_ENV)
    if named == DISABLED:
        return None
    if named:
        return Path(named)
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = root / VENV / "bin" / "python"
        if candidate.exists():
            return candidate
    return None


# `vllm serve` compiles its model with torch.compile at start (its AOT path, also on CPU); TORCHDYNAMO_DISABLE,
# which a training setup or a test suite may export for PyTorch, makes it fail there ("aot_compile is not
# supported by the current configuration"), so a server started for vLLM does not inherit it.
SERVER_UNSET = ("TORCHDYNAMO_DISABLE",)


def server_environ(**extra: str) -> dict[str, str]:
    """This process's environment for a `vllm serve` it starts: without SERVER_UNSET, with `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in SERVER_UNSET}, **extra}


def vllm_executable() -> Path | None:
    """The `vllm` command: on PATH, else beside the vLLM environment's Python."""
    on_path = shutil.which("vllm")
    if on_path:
        return Path(on_path)
    python = vllm_python()
    if python is not None and (python.parent / "vllm").exists():
        return python.parent / "vllm"
    return None


def require_vllm_python() -> Path:
    python = vllm_python()
    if python is None:
        raise ExportError(
            f"no vLLM environment found ({VENV}/, or ${PYTHON_ENV}); `{SETUP}` sets one up from its lock"
        )
    return python


def routes_for(form: str) -> tuple[str, list[str]]:
    """The route a folder of this form must pass in vLLM, and every route to try."""
    if form == "remote-code":
        return "transformers", ["transformers", "native"]
    return "native", ["native"]


def run_in_vllm(
    folder: Path,
    *,
    routes: list[str],
    prompts: list[list[int]],
    greedy_tokens: int,
    trust_remote_code: bool,
    lora: dict[str, Any] | None = None,
    tokenizer: Path | None = None,
    python: Path | None = None,
) -> dict[str, Any]:
    """What vLLM computes on `folder` (plus a LoRA adapter) through each route, from `export/vllm_check.py`."""
    python = python or require_vllm_python()
    config = json.loads((folder / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="vllm-check-") as tmp:
        request = {
            "folder": str(folder),
            "tokenizer": str(tokenizer) if tokenizer else None,
            "architectures": config.get("architectures") or [],
            "routes": routes,
            "trust_remote_code": trust_remote_code,
            "prompts": prompts,
            "texts": PROMPTS,
            "conversation": CONVERSATION,
            "greedy_tokens": greedy_tokens,
            "max_model_len": max_model_len(config),
            "lora": lora,
            "out": str(Path(tmp) / "result.json"),
        }
        try:
            proc = run_child(python, CHILD, request, Path(tmp), timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            raise ExportError(f"vLLM took over {CHILD_TIMEOUT_S} s on {folder}") from error
        if proc.returncode != 0 or not Path(request["out"]).exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise ExportError(f"vLLM ({python}) could not check {folder}:\n{tail}")
        return json.loads(Path(request["out"]).read_text())


# Where configs keep their context length (Llama and most: max_position_embeddings; GPT-2: n_positions).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def max_model_len(config: dict[str, Any]) -> int | None:
    """The context the check's engine reserves: the model's, up to MAX_MODEL_LEN (vLLM refuses more than the
    model's and must fit one full sequence in its KV cache); None leaves it to vLLM."""
    context = next((config[key] for key in CONTEXT_KEYS if isinstance(config.get(key), int)), None)
    return min(MAX_MODEL_LEN, context) if context else None


def prompt_logprobs(logits: Any, ids: list[int]) -> list[float | None]:
    """log p(token t | tokens < t) for every token of a row from its logits (None for the first, as vLLM)."""
    import torch

    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return [None] + [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]


def _max_delta(expected: list[list[float | None]], actual: list[list[float | None]]) -> float:
    worst = 0.0
    for row_e, row_a in zip(expected, actual, strict=True):
        if len(row_e) != len(row_a):
            return float("inf")
        for e, a in zip(row_e, row_a, strict=True):
            if (e is None) != (a is None):
                return float("inf")
            if e is not None:
                worst = max(worst, abs(e - a))
    return worst


def _check(measure: str, value: float, op: str, bound: float) -> dict[str, Any]:
    ok = value <= bound if op == "<=" else value == bound
    return {"measure": measure, "value": value, "bound": f"{op} {bound:g}", "ok": bool(ok)}


def compare(source: dict[str, Any], served: dict[str, Any], required: str) -> dict[str, Any]:
    """Checks of vLLM's figures (`run_in_vllm`) against the source's (`verify_hf.reference`), per route; the
    `required` route must have run."""
    rows = source["ids"] + [source["chat_ids"]]
    expected_prompt = [
        prompt_logprobs(logits, ids) for logits, ids in zip(source["row_logits"], rows, strict=True)
    ]
    checks, routes = [], {}
    for route, result in served["routes"].items():
        summary = {key: result[key] for key in ("ran", "why", "error", "load_seconds") if key in result}
        routes[route] = summary
        if not result["ran"]:
            if route == required or "error" in result:
                checks.append(_check(f"vllm_{route}_serves", 0.0, "==", 1.0))
            continue
        checks += [
            _check(f"vllm_{route}_serves", 1.0, "==", 1.0),
            _check(
                f"vllm_{route}_greedy_identical", float(result["greedy"] == source["row_greedy"]), "==", 1.0
            ),
            _check(
                f"vllm_{route}_prompt_logprob_max_abs_delta",
                _max_delta(expected_prompt, result["prompt_logprobs"]),
                "<=",
                LOGPROB_BOUND,
            ),
            _check(
                f"vllm_{route}_greedy_logprob_max_abs_delta",
                _max_delta(source["row_greedy_logprobs"], result["greedy_logprobs"])
                if result["greedy"] == source["row_greedy"]
                else float("inf"),
                "<=",
                LOGPROB_BOUND,
            ),
            _check(
                f"vllm_{route}_tokenization_identical", float(result["texts_ids"] == source["ids"]), "==", 1.0
            ),
            _check(
                f"vllm_{route}_chat_template_identical",
                float(result["chat_ids"] == source["chat_ids"]),
                "==",
                1.0,
            ),
        ]
    if required not in served["routes"]:
        checks.append(_check(f"vllm_{required}_serves", 0.0, "==", 1.0))
    return {
        "kind": "vllm",
        "vllm_version": served.get("vllm_version"),
        "required_route": required,
        "routes": routes,
        "greedy_tokens": len(source["row_greedy"][0]) if source["row_greedy"] else 0,
        "measures": {c["measure"]: c["value"] for c in checks},
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }


def verify_in_vllm(
    folder: Path,
    source: dict[str, Any],
    *,
    form: str,
    adapter: Path | None = None,
    python: Path | None = None,
) -> dict[str, Any]:
    """Serve `folder` (with `adapter` as a LoRA) in vLLM through each route of `form` and compare with
    `source` (`verify_hf.reference` of the source model with `vllm_rows`, with its adapter when there is
    one)."""
    if not source["row_greedy"]:
        raise ValueError("the source reference was computed without vllm_rows: nothing to compare in vLLM")
    required, routes = routes_for(form)
    lora = None
    if adapter is not None:
        from toolkit.train.adapters import lora_rank

        config = json.loads((adapter / "adapter_config.json").read_text())
        lora = {"path": str(adapter), "rank": lora_rank(config.get("r", 8))}
    served = run_in_vllm(
        folder,
        routes=routes,
        prompts=source["ids"] + [source["chat_ids"]],
        greedy_tokens=len(source["row_greedy"][0]),
        trust_remote_code=form == "remote-code",
        lora=lora,
        tokenizer=adapter if adapter is not None and (adapter / "tokenizer.json").exists() else None,
        python=python,
    )
    return compare(source, served, required)


def markdown_table(section: dict[str, Any], title: str) -> str:
    """One vLLM check's routes and measures as markdown."""
    lines = [f"{title} (vLLM {section.get('vllm_version')})", ""]
    for route, summary in section["routes"].items():
        state = (
            f"ran (engine start {summary['load_seconds']:.0f} s)"
            if summary["ran"]
            else f"not run: {summary.get('error') or summary.get('why')}"
        )
        lines.append(f"- route `{route}`: {state}")
    lines += ["", "| measure | value | bound | ok |", "|---|---|---|---|"]
    for check in section["checks"]:
        lines.append(
            f"| {check['measure']} | {check['value']:.3g} | {check['bound']} | {'yes' if check['ok'] else 'NO'} |"
        )
    return "\n".join(lines)
