"""What an export reads: a run folder or HF model folder, resolved to one HF folder with full weights.

- An HF folder (config.json + safetensors) is used as it is.
- A run folder `runs/<name>` resolves to the `final/` of its last stage, in the order of its recipe.yaml,
  that holds a model (`toolkit.run_folder.RunFolder`). A stage folder `runs/<name>/<stage>` resolves to its
  own `final/`.
- A LoRA run's `final/` holds an adapter. It is merged with peft (`merge_and_unload`) into its base loaded
  in float32 from the base's own full-precision weights, never into a quantized base, and the logits of
  the merged model are compared with base+adapter on the verification prompts (the drift): the merge of
  `toolkit.train.adapters`, the one the runner and `toolkit merge-adapter` make.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError, ToolkitError
from toolkit.run_folder import RunFolder, model_folder_of


@dataclass
class Source:
    """A resolved export source: an HF folder with config.json and safetensors weights."""

    folder: Path
    name: str
    run_dir: Path | None = None  # the run folder when SRC was one (default outputs go under it)
    lora: dict[str, Any] | None = None  # base model and merge drift, when SRC was a LoRA adapter
    license: str | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def output_folder(self, kind: str) -> Path:
        """Where an export of `kind` (vllm, hf) goes by default: `runs/<name>/<kind>` for a run, `<folder>-<kind>`
        beside an HF folder."""
        if self.run_dir is not None:
            return self.run_dir / kind
        return self.folder.with_name(f"{self.folder.name}-{kind}")

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
    """Merge the LoRA adapter in `adapter_dir` into its full-precision base (`toolkit.train.adapters`, the
    merge the runner and `toolkit merge-adapter` make); the logits drift is measured on `prompts`."""
    from toolkit.train.adapters import merge_adapter

    tmp = tempfile.TemporaryDirectory(prefix="merged-")
    merged = Path(tmp.name) / "merged"
    try:
        report = merge_adapter(adapter_dir, merged, prompts=prompts or None, dtype="float32")
    except ToolkitError as error:
        tmp.cleanup()
        raise ExportError(str(error)) from None
    return Source(
        folder=merged,
        name=name,
        run_dir=run_dir,
        lora={
            "base": report.base,
            "adapter": str(adapter_dir),
            "merge_drift_max_abs": report.drift_max_abs,
            "vllm": report.consumers["vllm"],  # whether vLLM's LoRA loader takes the adapter as it is
        },
        license=_license(adapter_dir) or _license(Path(report.base)),
        _tmp=tmp,
    )
