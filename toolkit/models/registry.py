"""Architectures and named presets: name -> config class, model classes, and sizes.

An architecture names its classes as import paths ("module:Class"), so the table can be read (presets, export
plans, the GGUF exporter) without importing torch or any modelling code. `register_auto_classes()` imports
them and registers each architecture with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, so that
`from_pretrained` on a saved folder, `Trainer`, TRL and PEFT treat them like any Hub model. It is an explicit
call, made by everything in the toolkit that builds or loads a model, because registering imports torch and
transformers' modelling code (seconds), which `import toolkit` does not.
Presets are one table (as litgpt's `name_to_config`); their sizes are computed on the meta device, never
allocated.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolkit.errors import ToolkitError, nearest

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


def import_path(target: str | type) -> Any:
    """`"package.module:Name"` -> the object (a class given as such is returned as it is)."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Architecture:
    """One registered architecture. The classes are import paths ("module:Class") or the classes themselves;
    the `*_class` properties import them on first use."""

    name: str  # the config's model_type
    config: str | type
    base_model: str | type
    causal_lm: str | type | None  # None: not a language model (lattice maps embeddings to embeddings)
    description: str
    # The score-head model (reward models, classifiers), registered with AutoModelForSequenceClassification.
    sequence_classification: str | type | None = None
    # The linear layers inside its blocks, by module name: a LoRA adapter's default targets (PEFT knows
    # Hub architectures by model type, not ours). The LM head stays out, as PEFT's "all-linear" leaves it.
    adapter_targets: tuple[str, ...] = ()
    # Module whose import registers the architecture's export plan (toolkit/models/plans.py), if any.
    plan_module: str | None = None
    # The linear layers of a block that write into the residual stream (attention output, MLP output), by
    # name inside the block. In a pre-norm block with a final norm, scaling a block's input by w equals
    # scaling these layers (weight and bias) of it and of every later block by 1/w: how a DFS merge's layer
    # scales become ordinary weights (toolkit/merge/dfs.py). Empty: the architecture takes no DFS merge.
    residual_writers: tuple[str, ...] = ()

    @property
    def config_class(self) -> type[PreTrainedConfig]:
        return import_path(self.config)

    @property
    def in_transformers(self) -> bool:
        """Whether its model classes are transformers' own (a folder loads without this project's code)."""
        return self.model_class.__module__.startswith("transformers.")

    @property
    def base_model_class(self) -> type[PreTrainedModel]:
        return import_path(self.base_model)

    @property
    def causal_lm_class(self) -> type[PreTrainedModel]:
        if self.causal_lm is None:
            raise ToolkitError(
                f"architecture '{self.name}' is not a language model: it has no causal LM class"
            )
        return import_path(self.causal_lm)

    @property
    def is_language_model(self) -> bool:
        return self.causal_lm is not None

    @property
    def model_class(self) -> type[PreTrainedModel]:
        """The class a checkpoint of it loads as: the causal LM, or the base model for other architectures."""
        return self.causal_lm_class if self.is_language_model else self.base_model_class


@dataclass(frozen=True)
class Preset:
    """A named configuration of an architecture; `config` holds only what differs from the defaults."""

    name: str
    arch: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # A size its authors published, kept verbatim when it disagrees with the count computed from the shape.
    quoted: str | None = None


ARCHITECTURES: dict[str, Architecture] = {}
PRESETS: dict[str, Preset] = {}
_registered: set[str] = set()  # architectures the Auto classes already know
_lock = threading.RLock()


def register_architecture(arch: Architecture, presets: list[Preset]) -> None:
    """Add an architecture and its presets. The Auto classes learn it with `register_auto_classes()` (at once
    when they already know the others)."""
    with _lock:
        ARCHITECTURES[arch.name] = arch
        for preset in presets:
            PRESETS[preset.name] = preset
        if _registered:
            register_auto_classes()


def register_auto_classes() -> None:
    """Register every architecture with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and (where it has
    one) `AutoModelForSequenceClassification` (imports torch,
    transformers' modelling code and ours; a no-op for those already registered)."""
    with _lock:
        pending = [
            arch for name, arch in ARCHITECTURES.items() if name not in _registered and arch is not None
        ]
        if not pending:
            return
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )

        for arch in pending:
            AutoConfig.register(arch.name, arch.config_class, exist_ok=True)
            AutoModel.register(arch.config_class, arch.base_model_class, exist_ok=True)
            if arch.is_language_model:
                AutoModelForCausalLM.register(arch.config_class, arch.causal_lm_class, exist_ok=True)
            if arch.sequence_classification is not None:
                AutoModelForSequenceClassification.register(
                    arch.config_class, import_path(arch.sequence_classification), exist_ok=True
                )
            _registered.add(arch.name)


def lazy_classes(package: str, classes: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `classes` (name -> submodule) on first access, so importing an
    architecture's package (for its export plan) does not import its modelling code. Whoever reaches for a
    model class is about to use it with transformers: the Auto classes are registered first."""

    def __getattr__(name: str) -> Any:
        if name not in classes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        register_auto_classes()
        return getattr(importlib.import_module(f"{package}.{classes[name]}"), name)

    return __getattr__


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is an error that suggests the nearest one."""
    if name not in PRESETS:
        guess = nearest(name, PRESETS)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        raise ToolkitError(f"unknown preset '{name}'{hint}; `toolkit arch list` shows them all")
    return PRESETS[name]


def build_config(preset: str, **overrides: Any) -> PreTrainedConfig:
    """The config of a preset, with `overrides` (e.g. the tokenizer's vocab size) applied."""
    spec = get_preset(preset)
    config_class = ARCHITECTURES[spec.arch].config_class
    valid = set(config_class.__dataclass_fields__) if hasattr(config_class, "__dataclass_fields__") else None
    for key in overrides:
        if valid is not None and key not in valid:
            guess = nearest(key, valid)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise ToolkitError(f"unknown config field '{key}' for architecture '{spec.arch}'{hint}")
    return config_class(**{**spec.config, **overrides})


def meta_model(config: PreTrainedConfig) -> PreTrainedModel:
    """The model for `config` (its causal LM, or the base model of an architecture that is not a language
    model) with every tensor on the meta device: shapes without memory."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    register_auto_classes()
    arch = ARCHITECTURES.get(config.model_type)
    auto = AutoModel if arch is not None and not arch.is_language_model else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def count_parameters(config: PreTrainedConfig) -> int:
    """Trainable parameters; tied embeddings count once (`parameters()` yields shared tensors once)."""
    return sum(p.numel() for p in meta_model(config).parameters())


BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


# Full training with AdamW, bytes per parameter: fp32 keeps all in float32; bf16 mixed precision keeps bf16
# weights and grads plus fp32 master weights and moments.
TRAINING_BYTES_PER_PARAM = {
    "fp32": {"weights": 4, "gradients": 4, "optimizer": 8},
    "bf16-mixed": {"weights": 6, "gradients": 2, "optimizer": 8},
}


def memory_estimate(config: PreTrainedConfig) -> dict[str, Any]:
    """Memory needed to run and to train `config`, in bytes.

    Inference: weights per dtype, plus the KV cache for one sequence at full context in that dtype.
    Training with AdamW: weights, gradients and the two optimizer moments. fp32 keeps all in float32
    (4+4+8 bytes/param); bf16 mixed precision keeps bf16 weights and grads plus fp32 master weights and
    moments (2+2+4+8). Activations depend on batch and sequence length and are left out.
    """
    n = count_parameters(config)
    # A model that is not a language model (the lattice) has no context and no cache.
    context, stack_applications, kept, cache_values = 0, 1, 0, 0
    if getattr(config, "num_attention_heads", None) is not None:
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        context = getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0)
        # One KV slot per block application: a recursive architecture (cognate) names how many it fills
        # (`cache_layers`); a sliding window keeps only its last tokens.
        slots = getattr(config, "cache_layers", None) or config.num_hidden_layers
        stack_applications = slots // config.num_hidden_layers
        kept = min(context, getattr(config, "sliding_window", None) or context)
        kv_values = 2 * slots * kv_heads * head_dim * kept
        # A recurrent memory keeps fixed-size state per slot (cognate: two memory_dim^2 matrices per head).
        state_values = slots * 2 * getattr(config, "memory_heads", 0) * getattr(config, "memory_dim", 0) ** 2
        cache_values = kv_values + state_values
    # The KV cache stays 16-bit for 16-bit and quantized weights (what llama.cpp and vLLM do by default).
    inference = {
        dtype: {"weights": n * size, "kv_cache": cache_values * (4 if size == 4 else 2)}
        for dtype, size in BYTES_PER_PARAM.items()
    }
    training = {
        regime: {part: size * n for part, size in parts.items()}
        for regime, parts in TRAINING_BYTES_PER_PARAM.items()
    }
    for parts in training.values():
        parts["total"] = sum(parts.values())
    return {
        "parameters": n,
        "context": context,
        # Times the block stack runs per token (1 for a plain decoder), and the tokens each KV slot keeps.
        "stack_applications": stack_applications,
        "kv_tokens": kept,
        "inference": inference,
        "training": training,
    }
