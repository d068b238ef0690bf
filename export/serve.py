"""`toolkit serve SRC [--run]`: the `vllm serve` command line that matches an exported folder.

SRC is a folder written by `toolkit export vllm` (or a run folder holding one in `vllm/`). The command carries
what the folder implies: its dtype, its context length as `--max-model-len`, its chat template, the
tensor-parallel size from the visible GPUs (the largest count that divides the attention heads), and
`--trust-remote-code` for a remote-code folder. For a LoRA export it serves the base with the adapter
(`--enable-lora --lora-modules NAME=adapter/`). `--run` replaces this process with that command.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from toolkit.errors import ExportError


def find_export(src: str | Path) -> Path:
    """The exported folder SRC names: SRC itself, or SRC/vllm for a run folder."""
    src = Path(src)
    for folder in (src, src / "vllm"):
        if any(
            (folder / name).exists()
            for name in ("config.json", "adapter/adapter_config.json", "merged/config.json")
        ):
            return folder
    raise ExportError(
        f"{src} holds no vLLM export (config.json, or base/ + adapter/); run `toolkit export vllm {src}` first"
    )


def visible_gpus() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def tensor_parallel_size(config: dict, gpus: int) -> int:
    """The largest GPU count up to `gpus` that splits the attention and KV heads evenly (vLLM requires it)."""
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads") or heads
    return max(
        [n for n in range(1, max(gpus, 1) + 1) if heads % n == 0 and (kv % n == 0 or n % kv == 0)], default=1
    )


def serve_command(
    src: str | Path,
    *,
    gpus: int | None = None,
    host: str | None = None,
    port: int | None = None,
    max_model_len: int | None = None,
    adapters: list[str] | None = None,
) -> list[str]:
    """The `vllm serve` argv for the export at SRC; `adapters` ("NAME=FOLDER") are LoRA adapters served
    beside it as they are (each checked against vLLM's LoRA rules first: `toolkit merge-adapter`'s verdict)."""
    from toolkit.train.adapters import adapter_tensors, lora_rank, vllm_verdict

    folder = find_export(src).resolve()
    lora = (folder / "adapter" / "adapter_config.json").exists()
    # A LoRA export serves base + adapter; one whose adapter vLLM cannot load has only merged/.
    model_dir = folder / "base" if lora else folder / "merged" if (folder / "merged").is_dir() else folder
    if not (model_dir / "config.json").exists():
        raise ExportError(f"{model_dir} has no config.json; the export looks incomplete, export it again")
    config = json.loads((model_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    context = max_model_len or config.get("max_position_embeddings")
    # A run's export is runs/<name>/vllm: the run's name is the one clients should see.
    name = folder.parent.name if folder.name == "vllm" else folder.name
    argv = ["vllm", "serve", str(model_dir), "--served-model-name", name, "--dtype", dtype]
    if context:
        argv += ["--max-model-len", str(context)]
    if (model_dir / "chat_template.jinja").exists():
        argv += ["--chat-template", str(model_dir / "chat_template.jinja")]
    argv += [
        "--tensor-parallel-size",
        str(tensor_parallel_size(config, visible_gpus() if gpus is None else gpus)),
    ]
    if "auto_map" in config:
        argv.append("--trust-remote-code")
    modules = {"adapter": folder / "adapter"} if lora else {}
    for item in adapters or []:
        name, _, path = item.partition("=")
        if not name or not path or not (Path(path) / "adapter_config.json").exists():
            raise ExportError(f"--lora {item}: give NAME=FOLDER, a folder holding adapter_config.json")
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        verdict = vllm_verdict(config, adapter_tensors(Path(path)))
        if verdict.startswith("no"):
            raise ExportError(f"--lora {item}: {verdict.removeprefix('no: ')}")
        modules[name] = Path(path).resolve()
    if modules:
        ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 8) for p in modules.values()]
        argv += ["--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in modules.items())]
        argv += ["--max-lora-rank", str(lora_rank(max(ranks)))]
    if host:
        argv += ["--host", host]
    if port:
        argv += ["--port", str(port)]
    return argv


def run(argv: list[str]) -> None:
    """Replace this process with `argv` (a `vllm serve` command), with the `vllm` on PATH or else the vLLM
    environment's (`make vllm-env`)."""
    from export.verify_vllm import SETUP, server_environ, vllm_executable

    executable = vllm_executable()
    if executable is None:
        raise ExportError(
            f"vllm is not installed here: `{SETUP}` sets up vLLM's own environment (the CPU build without a "
            "GPU), or `pip install vllm` on a machine with a CUDA GPU"
        )
    os.execve(executable, [str(executable), *argv[1:]], server_environ())


def format_command(argv: list[str]) -> str:
    return shlex.join(argv)
