"""What an export reads: a run folder or HF model folder, resolved to one HF folder with full weights.

- An HF folder (config.json + safetensors) is used as it is.
- A run folder `runs/<name>` resolves to the `final/` of its last stage, in the order of its recipe.yaml,
  that holds a model (`toolkit.run_folder.RunFolder`). A stage folder `runs/<name>/<stage>` resolves to its
  own `final/`.
- A LoRA run's `final/` holds an adapter. It is merged with peft (`merge_and_unload`) into its base loaded
  in float32 from the base's own full-precision weights, never into a quantized base, and the logits of
  the merged model are compared with base+adapter on the verification prompts (the drift).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError, ToolkitError
from toolkit.run_folder import RunFolder, model_folder_of

# Copied next to merged weights so that the merged folder is a complete HF model folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class Source:
    """A resolved export source: an HF folder with config.json and safetensors weights."""

    folder: Path
    name: str
    run_dir: Path | None = None  # the run folder when SRC was one (default outputs go under it)
    lora: dict[str, Any] | None = None  # base model and merge drift, when SRC was a LoRA adapter
    license: str | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _final_folder(src: Path) -> tuple[Path, RunFolder | None]:
    """`toolkit.run_folder.model_folder_of`, its refusal as an export error."""
    try:
        return model_folder_of(src)
    except ToolkitError as error:
        raise ExportError(str(error)) from None


def _license(folder: Path) -> str | None:
    """The `license:` of the model card's front matter, when there is one."""
    readme = folder / "README.md"
    if not readme.exists():
        return None
    lines = readme.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None


def resolve_source(src: str | Path, prompts: list[str] | None = None) -> Source:
    """Resolve SRC (HF folder, run folder, stage folder or LoRA adapter folder) to full-weight HF folder."""
    src = Path(src)
    if not src.exists():
        raise ExportError(f"export source {src} does not exist")
    folder, run = _final_folder(src)
    run_dir = run.path if run is not None else None
    name = run.name if run is not None else folder.name
    if (folder / "adapter_config.json").exists():
        return merge_lora(folder, name, run_dir, prompts or [])
    if not any(folder.glob("*.safetensors")):
        raise ExportError(f"{folder} has no *.safetensors weights (save with safe_serialization=True)")
    return Source(folder=folder, name=name, run_dir=run_dir, license=_license(folder))


def merge_lora(adapter_dir: Path, name: str, run_dir: Path | None, prompts: list[str]) -> Source:
    """Merge the LoRA adapter in `adapter_dir` into its float32 base; report logits drift on `prompts`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import register_auto_classes

    register_auto_classes()  # the Auto classes resolve the toolkit's architectures

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path to merge into")
    base_config = Path(base) / "config.json"
    if base_config.exists() and "quantization_config" in json.loads(base_config.read_text()):
        raise ExportError(
            f"LoRA base {base} is quantized; merging into quantized weights loses the adapter's precision. "
            "Point adapter_config.json's base_model_name_or_path at the full-precision base."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as error:
        raise ExportError(f"LoRA base model {base} cannot be loaded: {error}") from error
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer.json").exists() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()

    def logits() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in prompts]

    before = logits()
    model = model.merge_and_unload()
    after = logits()
    drift = max((float((a - b).abs().max()) for a, b in zip(before, after, strict=True)), default=0.0)

    tmp = tempfile.TemporaryDirectory(prefix="merged-")
    merged = Path(tmp.name)
    model.save_pretrained(merged, safe_serialization=True)
    for file in TOKENIZER_FILES:
        for origin in (adapter_dir / file, Path(base) / file):
            if origin.exists():
                shutil.copy(origin, merged / file)
                break
    return Source(
        folder=merged,
        name=name,
        run_dir=run_dir,
        lora={"base": str(base), "adapter": str(adapter_dir), "merge_drift_max_abs": drift},
        license=_license(adapter_dir) or _license(Path(base)),
        _tmp=tmp,
    )
