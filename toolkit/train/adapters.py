"""Merging a LoRA adapter into its base, the one way the runner, `toolkit merge-adapter` and the exports do it.

A merge is made in float32 from the base's own full-precision weights, never into 4-bit weights: a QLoRA
adapter was trained against the dequantized base, and merging into the quantized one rounds the adapter's
update away (a quantized base is refused, naming the command that merges right). When training resized the
vocabulary (added tokens), the adapter holds the whole embedding and head rows, and the base is resized to
them before the adapter loads (PEFT alone fails with a size mismatch). The merged model's logits are
compared with base + adapter on a few prompts (the drift), and the report says which consumers can take the
adapter folder as it is and which need the merged one.

PEFT does the merge (`merge_and_unload`); what is ours is the base lookup, the refusal, the resize, the
drift, the atomic write and the report, which no library puts together.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

REPORT = "merge_report.json"
# Copied beside the merged weights when the adapter folder has them, so the merged folder is a whole model.
SIDE_FILES = ("generation_config.json", "chat_template.jinja")
DEFAULT_PROMPTS = ("The quick brown fox", "Hello, how are you?", "1 2 3 4 5")


@dataclass
class MergeReport:
    """What `merge_adapter` did: from which base, how far the merged logits are from base + adapter."""

    adapter: str
    base: str
    out: str
    dtype: str  # the merged weights' dtype on disk (the base's own)
    drift_max_abs: float  # max |logits(merged) - logits(base + adapter)| over the prompts, in float32
    prompts: int
    vocab_rows: dict[str, int] = field(default_factory=dict)  # base, adapter (when the adapter resized it)
    consumers: dict[str, str] = field(default_factory=dict)  # of the adapter folder: who takes it, how


def adapter_base(adapter: Path, base: str | Path | None = None) -> str:
    """The base the adapter in `adapter` merges into: `base` when given, else its adapter_config.json's."""
    config_path = adapter / "adapter_config.json"
    if not config_path.exists():
        raise ToolkitError(f"{adapter} holds no LoRA adapter (no adapter_config.json)")
    if base is not None:
        return str(base)
    named = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not named:
        raise ToolkitError(
            f"{adapter}/adapter_config.json names no base_model_name_or_path; give it: "
            f"toolkit merge-adapter {adapter} --base FULL_PRECISION_BASE"
        )
    return str(named)


def refuse_quantized(base: str, adapter: Path) -> PreTrainedConfig:
    """The config of `base`; a base whose weights are stored quantized (a bitsandbytes/GPTQ/AWQ checkpoint)
    is refused."""
    from transformers import AutoConfig

    from toolkit.models import register_auto_classes

    register_auto_classes()
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise ToolkitError(f"the base {base} of the adapter {adapter} cannot be read: {error}") from None
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = (
            quantization.get("quant_method", "quantized")
            if isinstance(quantization, dict)
            else getattr(quantization, "quant_method", "quantized")
        )
        raise ToolkitError(
            f"the base {base} of the adapter {adapter} is stored quantized ({method}): merging into those "
            "weights rounds the adapter's update away and leaves a model no exporter reads. Merge into the "
            f"full-precision base instead: toolkit merge-adapter {adapter} --base FULL_PRECISION_BASE"
        )
    return config


def adapter_tensors(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the adapter's safetensors (no weights read)."""
    from safetensors import safe_open

    path = adapter / "adapter_model.safetensors"
    if not path.exists():
        raise ToolkitError(
            f"{adapter} has no adapter_model.safetensors (adapters load from safetensors only)"
        )
    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def saved_rows(model: torch.nn.Module, tensors: dict[str, tuple[int, ...]]) -> int | None:
    """Rows of the embedding matrix the adapter saved whole (`modules_to_save`, or PEFT's own saving of
    resized embeddings), or None when it saved only low-rank weights."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        name = _module_name(model, module)
        if name is None:
            continue
        for key, shape in tensors.items():
            if key.endswith(f"{name}.weight") and "lora_" not in key and len(shape) == 2:
                return shape[0]
    return None


# `--max-lora-rank` takes one of these values; the adapter's rank is rounded up to the next.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(rank: int) -> int:
    """The `--max-lora-rank` (`max_lora_rank`) vLLM accepts for an adapter of rank `rank`."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def vllm_verdict(config: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> str:
    """Whether vLLM's LoRA loader takes an adapter as it is ("yes: <flags>") or not ("no: <why>; ..."),
    by vLLM's own rules (vllm/lora/peft_helper.py, lora/models.py): low-rank A/B weights only;
    modules_to_save only for a classifier/score head; no DoRA, no LoRA bias. Read from the adapter's config
    and tensor names alone."""
    extra = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    whole = [k for k in tensors if "lora_" not in k and not k.endswith(("score.weight", "classifier.weight"))]
    if config.get("use_dora"):
        blocker = "vLLM does not load DoRA adapters"
    elif config.get("lora_bias"):
        blocker = "vLLM does not load LoRA biases"
    elif whole or extra:
        blocker = "vLLM's LoRA loads low-rank A/B weights, and this adapter holds whole embedding/head rows"
    else:
        blocker = None
    if blocker:
        return f"no: {blocker}; serve the merged folder (toolkit export vllm MERGED)"
    return f"yes: --enable-lora --lora-modules NAME=ADAPTER --max-lora-rank {lora_rank(config.get('r', 8))}"


def _consumers(
    resized: tuple[int, int] | None, config: dict[str, Any], tensors: dict[str, tuple[int, ...]]
) -> dict[str, str]:
    """Who takes the adapter folder as it is (PEFT, vLLM's LoRA) and who needs the merged folder."""
    peft = "yes: PeftModel.from_pretrained(base, ADAPTER)"
    if resized:
        peft = (
            f"yes, after base.resize_token_embeddings({resized[1]}) (the adapter's vocabulary has "
            f"{resized[1]} rows, the base {resized[0]}): PeftModel.from_pretrained(base, ADAPTER)"
        )
    return {
        "peft": peft,
        "vllm": vllm_verdict(config, tensors),
        "merged folder": "every consumer of a full model (export, vLLM, GGUF)",
    }


def _prompts(tokenizer: Any, base_rows: int, prompts: list[str] | None) -> list[str]:
    chosen = list(prompts or DEFAULT_PROMPTS)
    added = [t for t, i in tokenizer.get_vocab().items() if i >= base_rows]
    if added:  # the rows the resize made are part of the check
        chosen.append(" ".join(sorted(added)[:8]))
    return chosen


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    prompts: list[str] | None = None,
    dtype: str | None = None,
) -> MergeReport:
    """Merge the LoRA adapter in `adapter` into its full-precision base and write a whole HF folder to `out`
    (weights at the base's dtype unless `dtype` is given, the adapter's tokenizer and chat template,
    `merge_report.json`), atomically. Returns the report."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import register_auto_classes

    register_auto_classes()
    adapter, out = Path(adapter), Path(out)
    base_id = adapter_base(adapter, base)
    base_config = refuse_quantized(base_id, adapter)
    # The base's own dtype as saved (loading in float32 below rewrites model.config.dtype).
    stored = dtype or str(getattr(base_config, "dtype", None) or "float32").removeprefix("torch.")
    config = json.loads((adapter / "adapter_config.json").read_text())
    task = config.get("task_type") or "CAUSAL_LM"
    if task != "CAUSAL_LM":
        raise ToolkitError(
            f"{adapter} is a {task} adapter; toolkit merge-adapter merges causal-LM adapters (a reward "
            "model's score head is used as it is, by GRPO's {model: PATH})"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base_id, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ToolkitError(f"the base {base_id} of the adapter {adapter} cannot be loaded: {error}") from None
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").exists() else Path(base_id)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tensors = adapter_tensors(adapter)
    base_rows = model.get_input_embeddings().num_embeddings
    rows = saved_rows(model, tensors)
    resized = None
    if rows is not None and rows != base_rows:
        # Training added tokens: the adapter's embedding (and head) rows are the resized matrix.
        model.resize_token_embeddings(rows)
        resized = (base_rows, rows)
    try:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    except (RuntimeError, ValueError, KeyError) as error:
        raise ToolkitError(f"the adapter {adapter} does not fit its base {base_id}: {error}") from None
    chosen = _prompts(tokenizer, base_rows, prompts)
    encoded = [tokenizer(p, return_tensors="pt") for p in chosen]
    with torch.no_grad():
        before = [model(**e).logits[0] for e in encoded]
        model = model.merge_and_unload()
        after = [model(**e).logits[0] for e in encoded]
    drift = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))

    report = MergeReport(
        adapter=str(adapter),
        base=base_id,
        out=str(out),
        dtype=stored,
        drift_max_abs=drift,
        prompts=len(chosen),
        vocab_rows={"base": base_rows, **({"adapter": resized[1]} if resized else {})},
        consumers=_consumers(resized, config, tensors),
    )
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, stored)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name in SIDE_FILES:
        if (adapter / name).exists():
            shutil.copy(adapter / name, tmp / name)
    (tmp / REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return report


def format_report(report: MergeReport) -> str:
    """The merge in a few lines, for the command's output."""
    lines = [
        f"merged {report.adapter} into {report.base} (float32, written as {report.dtype}) -> {report.out}",
        f"  logit drift, merged vs base + adapter: max |Δ| = {report.drift_max_abs:.3g} "
        f"over {report.prompts} prompts",
    ]
    if "adapter" in report.vocab_rows:
        lines.append(
            f"  vocabulary resized: base {report.vocab_rows['base']} rows -> {report.vocab_rows['adapter']}"
        )
    lines.append("  the adapter folder, by consumer:")
    lines += [f"    {who}: {how}" for who, how in report.consumers.items()]
    return "\n".join(lines)
