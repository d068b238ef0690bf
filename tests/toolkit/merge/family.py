"""Tiny model families for the merge tests: a base and fine-tune-like variants of it (the base's weights plus
noise, as fine-tunes are), with one tokenizer and chat template, saved as HF folders; and their remote-code
exports, which mergekit's own command loads without the toolkit (`--trust-remote-code`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.export.vllm_helpers import make_tokenizer, preset_config

LAYERS = 3


def save(model: Any, tokenizer: Any, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def family(root: Path, preset: str, variants: int = 2) -> list[Path]:
    """[base, variant 1, ...] of `preset` (3 layers), each variant the base plus its own noise; biases and norm
    weights random too, so that a wrong mapping of any tensor shows."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(preset_config(preset, tokenizer, LAYERS)).eval()
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
            elif param.dim() == 1:
                param.normal_(1.0, 0.1)
    folders = [save(base, tokenizer, root / f"{preset}-base")]
    for i in range(1, variants + 1):
        variant = AutoModelForCausalLM.from_config(base.config).eval()
        variant.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in variant.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        folders.append(save(variant, tokenizer, root / f"{preset}-{i}"))
    return folders


def llama_family(root: Path, variants: int = 2) -> list[Path]:
    """The same for transformers' own LlamaForCausalLM (untied head): what mergekit knows from its llama.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(root / "tokenizer")
    folders = []
    for i in range(variants + 1):
        torch.manual_seed(i)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
        folders.append(save(LlamaForCausalLM(config).eval(), tokenizer, root / f"llama-{i}"))
    return folders


def remote_code(folders: list[Path]) -> list[Path]:
    """Each folder as `toolkit export vllm --form remote-code` writes it (its modelling code inside)."""
    from export.vllm import export_vllm

    return [
        export_vllm(f, f.with_name(f.name + "-rc"), form="remote-code", verify=False).path for f in folders
    ]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        found.update(load_file(file))
    return found
