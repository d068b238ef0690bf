"""DFS merging: a path of layers through the input models, with a scale on the input of each layer.

Evolutionary model merge (Akiba et al., Sakana AI, 2024) searches two spaces: parameter space (weights mixed,
what mergekit's methods do) and data-flow space, where the merged model is a sequence of layers taken from
the inputs (a layer may repeat, models may alternate), and the hidden state entering a layer is multiplied
by a learned scale, which is what makes a layer of one model usable after a layer of another. mergekit has
no such method; the config style is mergekit's own: each output slice is a stretch of one model's layers,
and `parameters: {scale: S}` scales the input of the slice's first layer (the junction), or `scale: [s1,
s2, ...]` the input of each of its layers.

    merge_method: dfs
    slices:
      - sources: [{model: A, layer_range: [0, 2]}]
      - sources: [{model: B, layer_range: [1, 3]}]
        parameters: {scale: 0.8}

The result is an ordinary model of the same architecture, so the scales become weights: in a pre-norm block
with a final norm, every norm is blind to a positive scale of its input, so a block fed w·x returns
w·(x + A(x)/w + M(·)/w): the same as the block with its residual-writing layers (attention output, MLP
output; each architecture declares them as `residual_writers`) scaled by 1/w, times w. Carried along the
path, the layer at position p gets its writers scaled by 1/(w_0·…·w_p), and the final norm removes the
remaining overall factor. Exact up to the norms' epsilon (a test checks it against the scaled forward pass).
The compiled config is mergekit's passthrough with per-tensor `scale`, so mergekit writes every DFS merge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

DFS = "dfs"
DFS_PARAMETERS = {"scale"}

# Hub families whose blocks are pre-norm with a final norm, and the layers that write their residual stream
# (mergekit tensor names contain them). Post-norm families (Gemma 2/3, OLMo 2) are left out: a norm after the
# writer undoes a scale there, so no weight carries it.
HUB_RESIDUAL_WRITERS: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "starcoder2": ("self_attn.o_proj", "mlp.c_proj"),
}


def residual_writers(model_type: str) -> tuple[str, ...]:
    """The residual-writing layers of a model type: a registered architecture's own declaration, else the
    Hub table; a type with none cannot take a DFS merge."""
    from toolkit.models import ARCHITECTURES

    arch = ARCHITECTURES.get(model_type)
    writers = arch.residual_writers if arch is not None else HUB_RESIDUAL_WRITERS.get(model_type, ())
    if not writers:
        raise ToolkitError(
            f"merge_method dfs: model type '{model_type}' declares no residual-writing layers (a pre-norm "
            "block with a final norm is what lets a layer's input scale become weights); it takes "
            "passthrough slices without scales"
        )
    return writers


def _scales(value: Any, length: int) -> list[float] | None:
    """One input scale per layer of a slice (a number scales the first, the junction), or None if malformed."""
    if value is None:
        return [1.0] * length
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] + [1.0] * (length - 1)
    if isinstance(value, list) and len(value) == length and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    return None


def dfs_problems(raw: dict[str, Any]) -> list[str]:
    """What keeps a dfs config from compiling: no slices, several sources in a slice, a bad scale."""
    problems = []
    if raw.get("models") or not raw.get("slices"):
        return ["merge_method dfs: give the layer path as `slices` (one source each), not `models`"]
    for i, out in enumerate(raw["slices"]):
        sources = out.get("sources") or [] if isinstance(out, dict) else []
        if len(sources) != 1:
            problems.append(f"slices[{i}]: a dfs slice takes exactly one source (a stretch of one model)")
            continue
        start, end = (sources[0].get("layer_range") or [0, 0])[:2]
        scale = (out.get("parameters") or {}).get("scale")
        scales = _scales(scale, max(end - start, 0))
        if scales is None:
            problems.append(
                f"slices[{i}].parameters.scale: {scale!r}; a number (the input of the slice's first layer) "
                f"or a list of {end - start} numbers (one per layer)"
            )
        elif any(not math.isfinite(s) or s <= 0 for s in scales):
            problems.append(f"slices[{i}].parameters.scale: {scale!r}; scales are positive")
        if isinstance(sources[0].get("parameters"), dict) and sources[0]["parameters"]:
            problems.append(f"slices[{i}].sources[0].parameters: dfs takes its scale on the slice")
    return problems


def _model_type(reference: str) -> str:
    path = Path(reference.partition("+")[0]) / "config.json"
    if not path.exists():
        raise ToolkitError(f"merge_method dfs: {path} not found (dfs reads each input's model type)")
    return str(json.loads(path.read_text()).get("model_type"))


def compile_dfs(raw: dict[str, Any]) -> dict[str, Any]:
    """The dfs config as mergekit passthrough: one output slice per layer of the path, the layer's residual
    writers scaled by the inverse of the product of every input scale up to it. Inputs must be local folders
    (resolved) by now."""
    path: list[tuple[str, int, float]] = []
    for out in raw["slices"]:
        source = out["sources"][0]
        start, end = source["layer_range"][:2]
        scales = _scales((out.get("parameters") or {}).get("scale"), end - start)
        path += [
            (source["model"], layer, scale) for layer, scale in zip(range(start, end), scales, strict=True)
        ]
    types = {_model_type(model) for model, _, _ in path}
    if len(types) != 1:
        raise ToolkitError(f"merge_method dfs: the path mixes model types {sorted(types)}")
    writers = residual_writers(types.pop())
    compiled = {k: v for k, v in raw.items() if k not in ("slices", "merge_method", "parameters")}
    compiled["merge_method"] = "passthrough"
    compiled["slices"] = []
    product = 1.0
    for model, layer, scale in path:
        product *= scale
        source: dict[str, Any] = {"model": model, "layer_range": [layer, layer + 1]}
        if product != 1.0:
            source["parameters"] = {"scale": [{"filter": w, "value": 1.0 / product} for w in writers]}
        compiled["slices"].append({"sources": [source]})
    return compiled
