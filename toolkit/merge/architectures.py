"""What mergekit needs to know about the toolkit's architectures, read from each architecture's own classes.

mergekit plans a merge from an architecture definition: the weights before the layer stack (embeddings), one
template per layer (`model.layers.${layer_index}.…`), the weights after it (final norm, head), which of them
are indexed by token (so that a union vocabulary can remap their rows), which may be tied to another, and the
config key that counts layers (rewritten when slices change the depth). It ships JSON definitions for Hub
families; for an unknown one it guesses from tensor names, and the guess has no layer-count key (a
frankenmerge would keep the old depth in its config) and an unordered weight list.

Here the definition is built from the architecture itself, on the meta device: the layer stack is the
`ModuleList` of the class the model declares in `_no_split_modules`, token-indexed weights are those of
`get_input_embeddings()`/`get_output_embeddings()`, ties come from `_tied_weights_keys`. So any registered
architecture merges with no merge code written for it. mergekit's own definitions stay in charge of the Hub
families it knows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from mergekit.architecture import ModelArchitecture

    from toolkit.models.registry import Architecture

LAYER = "${layer_index}"


def layer_stack(model: Any) -> tuple[str, Any]:
    """(name, module) of the model's stack of blocks: the ModuleList whose items are its `_no_split_modules`."""
    import torch

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and type(module[0]).__name__ in blocks:
            return name, module
    raise ToolkitError(
        f"{type(model).__name__} declares no block class in _no_split_modules whose instances form a "
        "ModuleList: mergekit cannot be told where its layers are"
    )


def tensor_layout(model: Any) -> dict[str, Any]:
    """The model's saved tensors as mergekit sees them: pre weights, one layer's template, post weights (in
    state-dict order), token-indexed names, tied names (target -> source), and the stack's prefix."""
    stack, _ = layer_stack(model)
    prefix = f"{stack}."
    vocabulary = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if module is not None and any(parameter is p for p in module.parameters(recurse=False)):
                vocabulary.add(name)
    tied = dict(getattr(model, "_tied_weights_keys", None) or {})
    pre, layer, post = [], [], []
    for name in model.state_dict(keep_vars=True):
        if name.startswith(prefix):
            index, _, rest = name[len(prefix) :].partition(".")
            if index == "0":
                layer.append(f"{prefix}{LAYER}.{rest}")
        elif layer:
            post.append(name)
        else:
            pre.append(name)
    return {"stack": stack, "pre": pre, "layer": layer, "post": post, "vocabulary": vocabulary, "tied": tied}


def mergekit_architecture(arch: Architecture) -> ModelArchitecture:
    """mergekit's definition of `arch`, built from its classes on the meta device (one layer is enough)."""
    import torch
    from mergekit.architecture import ModelArchitecture, ModuleDefinition, WeightInfo
    from mergekit.architecture.json_definitions import (
        JsonLayerTemplates,
        JsonModuleArchDef,
        JsonModuleArchitecture,
    )

    config = arch.config_class(num_hidden_layers=1)
    with torch.device("meta"):
        model = arch.causal_lm_class(config)
    layout = tensor_layout(model)

    def weight(name: str) -> WeightInfo:
        source = layout["tied"].get(name)
        return WeightInfo(
            name=name,
            vocabulary_axis=0 if name in layout["vocabulary"] else None,
            # A tied head is not saved: it is read from (and written as) its source.
            optional=source is not None,
            tied_names=[source] if source else None,
        )

    definition = JsonModuleArchDef(
        model_type=arch.name,
        architectures=[arch.causal_lm_class.__name__],
        pre_weights=[weight(n) for n in layout["pre"]],
        layer_templates=JsonLayerTemplates(weights=[weight(n) for n in layout["layer"]]),
        post_weights=[weight(n) for n in layout["post"]],
        num_layers_config_key="num_hidden_layers",
    )
    module = JsonModuleArchitecture(definition=definition)
    return ModelArchitecture(
        modules={"default": ModuleDefinition(architecture=module)},
        architectures=definition.architectures,
        model_type=arch.name,
    )


_told = False


def tell_mergekit() -> None:
    """Add every registered architecture to mergekit's table of known ones (once per process), and register
    them with the Auto classes, through which mergekit reads their configs."""
    global _told
    if _told:
        return
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    from toolkit.models import ARCHITECTURES, register_auto_classes

    register_auto_classes()
    for arch in ARCHITECTURES.values():
        if not arch.is_language_model:  # mergekit merges language models
            continue
        info = mergekit_architecture(arch)
        for name in info.architectures:
            NAME_TO_ARCH[name] = [info]
    _told = True
