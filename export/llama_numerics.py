"""The source model computed the way llama.cpp's CPU backend computes it, so that verification can tell a file
that is wrong from a consumer that rounds differently.

A float GGUF (f32, f16, bf16) holds the source's weights exactly, or rounded to the stored type, yet llama.cpp's
logits differ from transformers' by more than that rounding, for two reasons read in ggml's CPU code
(ggml-cpu/vec.h, ggml-cpu.c):

- GELU (the tanh form, what every llama.cpp graph with a GELU calls) is looked up in a float16 table:
  `y = 0` for `x <= -10`, `y = x` for `x >= 10`, else `y = f16(gelu(f16(x)))`, gelu in float32.
- A matrix stored as F16 or BF16 is multiplied with activations first converted to that type (its
  `vec_dot_type`), the products summed in float32.

A BitNet model (transformers' AutoBitLinear layers) computes each layer on its weights ternarized and its
inputs quantized per token to 8 bits. llama.cpp multiplies what the file stores (the ternary weights, at their
type) with the inputs quantized as that type's `vec_dot_type` says: not at all for F32, rounded to float16 for
F16, per block of 32 to 8 bits with a float16 scale for Q8_0 (q = round(x · 127 / amax)), per block of 256
for TQ1_0/TQ2_0 (Q8_K: q = min(127, round(-127 · x / m)), m the block's signed value of largest magnitude).
`bitnet_numerics` gives the layers those weights and that input rounding instead.

`llama_cpp_numerics` applies both to a loaded transformers model in place: the export is then compared with
a model that rounds as llama.cpp does, and a tight bound proves the file exact, while the difference to the
exact model is reported beside it as information. Only what is stored in the file is rounded: the types come
from the export's own tensor jobs (norms and vectors stay F32). Written here because no library emulates a
consumer's numerics; the emulation is checked against llama.cpp itself in tests/export.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# transformers' activations that compute GELU's tanh form (the `hidden_act` names llama.cpp's GELU serves).
TANH_GELU_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate")
# GGUF tensor types whose matrix products round the activations to the stored type first.
ROUNDED_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (`ggml_vec_gelu_f32` with GGML_GELU_FP16): a float16 table, clamped at +-10."""
    half = x.half().float()
    table = 0.5 * half * (1.0 + torch.tanh(0.7978845608028654 * half * (1.0 + 0.044715 * half * half)))
    y = table.half().float()
    y = torch.where(x >= 10.0, x, y)
    return torch.where(x <= -10.0, torch.zeros_like(y), y).to(x.dtype)


class GgmlGelu(nn.Module):
    """Stands in for a tanh-GELU activation module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_gelu(x)


def _tanh_gelu_classes() -> tuple[type, ...]:
    from transformers.activations import ACT2CLS

    classes = []
    for name in TANH_GELU_ACTS:
        entry = ACT2CLS.get(name)
        if entry is not None:
            classes.append(entry[0] if isinstance(entry, tuple) else entry)
    return tuple(classes)


def _round_inputs(dtype: torch.dtype) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].to(dtype).to(args[0].dtype), *args[1:])

    return hook


@torch.no_grad()
def llama_cpp_numerics(model: nn.Module, stored: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Make `model` (float32, loaded for verification only) compute as llama.cpp does; `stored` gives each
    source tensor name with the GGUF type it was written as. Returns what was changed, for the report."""
    gelu_classes = _tanh_gelu_classes()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, gelu_classes):
                setattr(parent, name, GgmlGelu())
                replaced += 1
    parameters = dict(model.named_parameters(remove_duplicate=False))
    rounded: dict[int, torch.dtype] = {}
    for source, qtype in stored:
        dtype = ROUNDED_TYPES.get(qtype)
        param = parameters.get(source)
        if dtype is None or param is None or param.dim() != 2:
            continue
        param.copy_(param.to(dtype).float())
        rounded[id(param)] = dtype
    hooked = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in rounded:
            module.register_forward_pre_hook(_round_inputs(rounded[id(module.weight)]))
            hooked += 1
    return {"gelu_tables": replaced, "rounded_matrices": len(rounded), "rounded_products": hooked}


# Block size of the activation quantization llama.cpp uses for a weight type (its `vec_dot_type`).
ACTIVATION_BLOCKS = {"Q8_0": ("q8_0", 32), "TQ1_0": ("q8_k", 256), "TQ2_0": ("q8_k", 256)}
BITNET_TYPES = ("F32", "F16", "BF16", *ACTIVATION_BLOCKS)


def quantize_activations(x: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """Inputs as llama.cpp quantizes them for a matrix product (ggml-cpu quantize_row_q8_0 / q8_K_ref)."""
    shape = x.shape
    v = x.float().reshape(-1, block)
    if kind == "q8_0":
        amax = v.abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        out = (v * scale).round() * (amax / 127.0).half().float()
    else:
        signed = v.gather(-1, v.abs().argmax(-1, keepdim=True))
        iscale = torch.where(signed != 0, -127.0 / signed, torch.zeros_like(signed))
        q = (iscale * v).round().clamp(max=127)
        out = torch.where(iscale != 0, q / iscale, torch.zeros_like(v))
    return out.reshape(shape).to(x.dtype)


def _stored_weight(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """The weight as the file holds it (gguf-py's quantizers are byte-identical to ggml's)."""
    import gguf
    import numpy as np

    if qtype == "F32":
        return weight
    kind = gguf.GGMLQuantizationType[qtype]
    data = weight.detach().float().numpy().astype(np.float32)
    back = gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)
    return torch.from_numpy(np.ascontiguousarray(back.reshape(weight.shape))).to(weight.dtype)


@torch.no_grad()
def bitnet_numerics(model: nn.Module, stored: Iterable[tuple[str, str]]) -> dict[str, int] | None:
    """Make a BitNet `model`'s ternary layers compute as llama.cpp computes the file: each becomes a plain
    linear layer holding its ternary weight as stored, its input rounded as llama.cpp rounds it for that
    type. `stored`: (source tensor, GGUF type). None (nothing changed) when a layer is of a type not emulated."""
    from transformers.integrations.bitnet import AutoBitLinear

    from toolkit.quantization.bitnet import ternarize

    types = dict(stored)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AutoBitLinear)]
    if any(types.get(f"{n}.weight") not in BITNET_TYPES for n, _ in layers):
        return None
    for name, module in layers:
        qtype = types[f"{name}.weight"]
        values, gamma = ternarize(module.weight)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight.copy_(_stored_weight(values * gamma, qtype))
        if module.bias is not None:
            plain.bias.copy_(module.bias)
        if qtype in ROUNDED_TYPES:
            plain.register_forward_pre_hook(_round_inputs(ROUNDED_TYPES[qtype]))
        elif qtype in ACTIVATION_BLOCKS:
            kind, block = ACTIVATION_BLOCKS[qtype]
            plain.register_forward_pre_hook(
                lambda m, args, k=kind, b=block: (quantize_activations(args[0], k, b), *args[1:])
            )
        model.set_submodule(name, plain)
    # The other matrices of a quantized type (an embedding or head stored Q8_0): their weights as stored,
    # the inputs of their products rounded the same way. Float16 ones are llama_cpp_numerics' to round.
    parameters = dict(model.named_parameters(remove_duplicate=False))
    blocked: dict[int, tuple[str, int]] = {}
    for source, qtype in types.items():
        param = parameters.get(source)
        if qtype in ACTIVATION_BLOCKS and param is not None and param.dim() == 2 and id(param) not in blocked:
            param.copy_(_stored_weight(param, qtype))
            blocked[id(param)] = ACTIVATION_BLOCKS[qtype]
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in blocked:
            kind, block = blocked[id(module.weight)]
            module.register_forward_pre_hook(
                lambda m, args, k=kind, b=block: (quantize_activations(args[0], k, b), *args[1:])
            )
    return {"bitnet_layers": len(layers), "quantized_matrices": len(blocked)}
