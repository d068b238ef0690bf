"""The source model computed the way llama.cpp's CPU backend computes it, so that verification can tell a file
that is wrong from a consumer that rounds differently.

A float GGUF (f32, f16, bf16) holds the source's weights exactly, or rounded to the stored type, yet llama.cpp's
logits differ from transformers' by more than that rounding, for two reasons read in ggml's CPU code
(ggml-cpu/vec.h, ggml-cpu.c):

- GELU (the tanh form, what every llama.cpp graph with a GELU calls) is looked up in a float16 table:
  `y = 0` for `x <= -10`, `y = x` for `x >= 10`, else `y = f16(gelu(f16(x)))`, gelu in float32.
- A matrix stored as F16 or BF16 is multiplied with activations first converted to that type (its
  `vec_dot_type`), the products summed in float32.

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
