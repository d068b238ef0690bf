"""`toolkit export hf`: a Hub folder that loads with `from_pretrained` on a machine without forge-toolkit.

For a toolkit architecture the folder carries its modelling files (copied, imports made relative) and an
`auto_map`, so `trust_remote_code=True` loads it; for a transformers architecture it is the plain folder.
Either way: safetensors weights, the tokenizer with its chat template, a generation config that stops at the
end of a turn. Unlike `toolkit export vllm --form remote-code` this reads no vLLM plan: it serves every
architecture, those vLLM cannot run (cognate, the lattice) included.

Verification loads the written folder in a clean interpreter where the project cannot be imported
(`export/verify_hf.py`) and compares logits, greedy tokens, tokenization and the rendered chat template with
the source; `export_report.json` records it and the export exits non-zero when a bound is missed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.source import resolve_source
from export.vllm import (
    DEFAULT_MAX_SHARD_SIZE,
    Route,
    remote_code_files,
    resolve_dtype,
    write_model_folder,
)
from toolkit.errors import ExportError
from toolkit.io import atomic_path, write_json
from toolkit.models.registry import ARCHITECTURES


@dataclass
class HFResult:
    """What `export_hf` wrote and measured."""

    path: Path
    remote_code: bool
    dtype: str
    seconds: float
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.report.get("ok", True))


def hf_route(model_type: str) -> Route:
    """How a folder of `model_type` is written: with its modelling files (a toolkit architecture) or as
    transformers' own class; an architecture neither knows is an error naming it."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = ARCHITECTURES.get(model_type)
    if arch is not None and not arch.in_transformers:
        files, auto_map = remote_code_files(arch)
        return Route("remote-code", arch.model_class, model_type, files=files, auto_map=auto_map)
    class_name = arch.model_class.__name__ if arch else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if class_name is None or not hasattr(transformers, class_name):
        raise ExportError(
            f"model_type '{model_type}' is neither a toolkit architecture nor a causal LM transformers "
            f"{transformers.__version__} knows, so no Hub folder can be written for it"
        )
    return Route("native", getattr(transformers, class_name), model_type)


def write_plain_model_folder(folder: Path, out: Path, route: Route, dtype: str, max_shard_size: str) -> None:
    """A model that is not a language model, as a remote-code folder: config with its `auto_map`, weights in
    `dtype`, the modelling files."""
    import torch

    model = route.model_class.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.config.auto_map = route.auto_map
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for name, text in route.files.items():
        (out / name).write_text(text, encoding="utf-8")


def export_hf(
    src: str | Path,
    out: str | Path | None = None,
    *,
    dtype: str = "auto",
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    verify: bool = True,
) -> HFResult:
    """Export SRC (run, stage, HF or LoRA folder; an adapter is merged) to a self-contained Hub folder,
    verified in a clean process unless told not. Everything that can refuse does so before writing."""
    from export.verify import PROMPTS
    from export.verify_hf import source_reference, verify_folder, verify_outputs
    from toolkit.models import register_auto_classes

    register_auto_classes()
    started = time.perf_counter()
    source = resolve_source(src, prompts=PROMPTS)
    try:
        out_path = Path(out) if out is not None else source.output_folder("hf")
        if out_path.exists() and not force:
            raise ExportError(f"{out_path} exists; pass --force to replace it")
        config = json.loads((source.folder / "config.json").read_text())
        model_type = config.get("model_type", "?")
        route = hf_route(model_type)
        dtype = resolve_dtype(dtype, config)
        # A model that is not a language model (the lattice) has no tokenizer, no generation and no logits: its
        # folder holds config, weights and code, and is verified on its outputs for fixed inputs.
        language_model = ARCHITECTURES[model_type].is_language_model if model_type in ARCHITECTURES else True
        if language_model and not any(
            (source.folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
        ):
            raise ExportError(f"{source.folder} has no tokenizer files; the Hub folder needs its tokenizer")
        remote = route.form == "remote-code"
        with atomic_path(out_path, is_dir=True) as tmp:
            if language_model:
                eos = write_model_folder(source.folder, tmp, route, dtype, max_shard_size)
            else:
                eos = None
                write_plain_model_folder(source.folder, tmp, route, dtype, max_shard_size)
            report: dict[str, Any] = {
                "target": "hf",
                "source": str(source.folder),
                "run_dir": str(source.run_dir) if source.run_dir else None,
                "model_type": model_type,
                "remote_code": remote,
                "files": sorted(route.files),
                "auto_map": route.auto_map,
                "architecture": route.model_class.__name__,
                "dtype": dtype,
                "eos_token_id": eos,
                "lora_merged": bool(source.lora),
            }
            if verify:
                if language_model:
                    check = verify_folder(
                        tmp,
                        source.folder,
                        dtype=dtype,
                        remote_code=remote,
                        expected_class=route.expected_class,
                        source=source_reference(source.folder, dtype),
                    )
                else:
                    check = verify_outputs(
                        tmp, source.folder, dtype=dtype, expected_class=route.expected_class
                    )
                report["verification"] = {"model": check}
                report["verified_in"] = ["clean"]
                report["ok"] = check["ok"]
            report["seconds"] = time.perf_counter() - started
            write_json(tmp / "export_report.json", report)
        return HFResult(out_path, remote, dtype, report["seconds"], report)
    finally:
        source.cleanup()
