"""BitNet b1.58 quantization-aware training on any registered architecture or Hub causal LM.

The linear layers of attention and MLP become transformers' `AutoBitLinear` in its "online" mode
(`transformers.integrations.bitnet`): the latent weights stay in full precision and train; every forward
uses them ternarized by their absmean, W_q = RoundClip(W / γ, -1, 1) · γ with γ = mean|W| (one scale per
tensor), and the input activations quantized per token to 8 bits by their absmax,
x_q = Round(x · 127 / max|x|) · max|x| / 127; both with the straight-through estimator (the backward
pass is the identity). Embeddings, the LM head, norms and any excluded layer stay as they are.

The model's config gets transformers' `BitNetQuantConfig(linear_class="autobitlinear",
quantization_mode="online", modules_to_not_convert=[...])` naming every linear layer left in full precision,
so the saved folder reloads, in plain transformers too, into the same layers with the same weights: the same
logits. The quantizer is transformers' own; what is ours is choosing the layers (the architecture's declared
linear layers, its `adapter_targets`, or every linear but the head for a Hub model) and the exclusions, and
`ternarize`, the same absmean rule applied to a saved latent weight by the GGUF export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.errors import ToolkitError

# Heads that map hidden states to outputs stay in full precision, as BitNet keeps its LM head.
HEADS = ("lm_head", "score", "classifier")


@dataclass
class BitNetOptions:
    """`model.quantization: {method: bitnet, ...}`."""

    method: str = "bitnet"
    # Linear layers kept in full precision: a module name, a prefix up to a module boundary ("model.layers.0"),
    # a suffix ("down_proj") or a regular expression, as transformers' modules_to_not_convert reads them.
    exclude: list[str] = field(default_factory=list)
    # Staged quantization (toolkit/quantization/staged.py): the layers made ternary group by group, each group
    # followed by `train.max_steps` steps and the stage's `eval:` suite. A number splits the blocks (the
    # numbered layers) into that many consecutive groups; a list gives each group as module names/patterns.
    groups: int | list[list[str]] | None = None
    max_drop: float = 0.10  # the largest relative drop of `measure` from the full-precision model accepted
    measure: str | None = None  # perplexity | accuracy | answer_nll (default: perplexity if eval has it)
    # A group past the bound: "fallback" keeps it in full precision and goes on; "stop" keeps the rest so too.
    on_drop: str = "fallback"


def _excluded(name: str, patterns: list[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return bool(patterns) and not should_convert_module(name, patterns)


def plan_layers(model: torch.nn.Module, exclude: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(converted, kept): the names of the model's linear layers that become BitLinear, and the others."""
    from toolkit.models import ARCHITECTURES

    arch = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
    targets = set(arch.adapter_targets) if arch is not None else None
    head = model.get_output_embeddings()
    converted, kept = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_target = leaf in targets if targets is not None else module is not head and leaf not in HEADS
        (converted if is_target and not _excluded(name, exclude or []) else kept).append(name)
    if not converted:
        raise ToolkitError(
            f"model.quantization: no linear layer of {type(model).__name__} is left to quantize "
            f"(exclude: {exclude or []}; linear layers: {', '.join(kept[:8])})"
        )
    return converted, kept


def to_bitnet(model: torch.nn.Module, exclude: list[str] | None = None) -> list[str]:
    """Replace the model's attention and MLP linear layers with trainable `AutoBitLinear` (online) layers
    holding the same weights, and record transformers' BitNet quantization config; returns their names."""
    converted, _ = plan_layers(model, exclude)
    convert_layers(model, converted)
    return converted


def convert_layers(model: torch.nn.Module, names: list[str]) -> None:
    """Make the named linear layers `AutoBitLinear` (online) with the same weight and bias tensors (so an
    optimizer holding them goes on updating them), and record the config that reloads the model so."""
    from transformers.integrations.bitnet import AutoBitLinear

    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, AutoBitLinear):
            continue
        # Built where the layer is (its initialisation draws from the same random stream as it always did, so
        # a seeded run stays the run it was), then given the layer's own tensors.
        new = AutoBitLinear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
            online_quant=True,
        )
        new.weight, new.bias = old.weight, old.bias
        model.set_submodule(name, new)
    record_config(model)


def revert_layers(model: torch.nn.Module, names: list[str]) -> None:
    """The named BitNet layers back to full-precision `nn.Linear` with the same tensors (a staged
    quantization's fallback), and the config recorded again."""
    for name in names:
        old = model.get_submodule(name)
        with torch.device("meta"):
            new = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight, new.bias = old.weight, old.bias
        model.set_submodule(name, new)
    record_config(model)


def ternary_layer_names(model: torch.nn.Module) -> list[str]:
    """The model's linear layers that run ternary (online `AutoBitLinear`)."""
    from transformers.integrations.bitnet import AutoBitLinear

    return [n for n, m in model.named_modules() if isinstance(m, AutoBitLinear) and m.online_quant]


def record_config(model: torch.nn.Module) -> None:
    """transformers' `BitNetQuantConfig` (online) naming every linear layer left in full precision, exact names
    anchored: a reload converts every linear layer except these (transformers reads each as a prefix, a suffix
    or a pattern; re.escape keeps "layers.1" from matching "layers.11")."""
    from transformers.utils.quantization_config import BitNetQuantConfig

    ternary = set(ternary_layer_names(model))
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in ternary]
    model.config.quantization_config = BitNetQuantConfig(
        linear_class="autobitlinear",
        quantization_mode="online",
        modules_to_not_convert=[re.escape(name) for name in kept],
    )


def bitnet_layers(folder: str | Path) -> set[str]:
    """The linear layers (module names) whose weights a saved model's forward pass uses ternarized: those its
    BitNet quantization config converts, found on the model built on the meta device, as transformers'
    quantizer finds them. Empty for a model without BitNet quantization."""
    import json

    raw = json.loads((Path(folder) / "config.json").read_text())
    quantization = raw.get("quantization_config") or {}
    if quantization.get("quant_method") != "bitnet":
        return set()
    if quantization.get("quantization_mode", "offline") != "online":
        raise ToolkitError(
            "quantization_config: a BitNet checkpoint in offline mode stores packed weights; only the online "
            "(trainable) form, which stores the latent weights, is read here"
        )
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.quantizers_utils import should_convert_module

    from toolkit.models import register_auto_classes

    register_auto_classes()
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = quantization.get("modules_to_not_convert")
    if skip is None:  # transformers' default: the output head
        skip = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, skip)
    }


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """transformers' WeightQuant, as the forward pass computes it: (ternary values in {-1, 0, 1}, γ) with
    weight ≈ ternary · γ, γ = mean|W| (float32)."""
    w = weight.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1), float(1.0 / scale)
