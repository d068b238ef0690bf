"""Export plans: how each architecture maps onto the formats its consumers already run.

A plan is data, read by the exporters (`export/gguf.py`, `export/vllm.py`): the llama.cpp
architecture name, which GGUF hyper-parameter key comes from which config field, a table from checkpoint
tensor names to GGUF tensor names (`{bid}` stands for the block index) with an optional transform per
tensor, and the config values the target graph cannot represent. The exporter holds no per-architecture
branches: supporting a new architecture means adding a plan, next to its model code.

This module also holds the plans of the native transformers architectures a user fine-tunes from the Hub
(`llama`, `mistral`, `qwen2`); `get_plan(model_type)` finds any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.errors import ExportError

Config = dict[str, Any]  # a model's config.json, as loaded


def config_value(config: Config, path: str) -> Any:
    """The value at a dotted path (`rope_parameters.rope_theta`), or None when any part is missing."""
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    return value


def head_dim(config: Config) -> int:
    """Per-head width: the explicit field when set (it may differ from hidden/heads), else the quotient."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def kv_heads(config: Config) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def rope_theta(config: Config) -> float:
    # transformers 5 nests it in `rope_parameters`; configs written by older versions keep `rope_theta`.
    return float(config_value(config, "rope_parameters.rope_theta") or config.get("rope_theta") or 10000.0)


def rope_type(config: Config) -> str:
    return (
        config_value(config, "rope_parameters.rope_type")
        or config_value(config, "rope_scaling.rope_type")
        or config_value(config, "rope_scaling.type")
        or "default"
    )


def rotary_dims(config: Config) -> int:
    """How many dimensions of each head RoPE rotates: all, or `partial_rotary_factor` of them (Phi-4-mini)."""
    factor = config_value(config, "rope_parameters.partial_rotary_factor") or config.get(
        "partial_rotary_factor"
    )
    return int(head_dim(config) * (factor or 1.0))


def rope_scaling_value(config: Config, key: str) -> Any:
    """A RoPE scaling parameter (`factor`, `low_freq_factor`, ...) from `rope_parameters` (transformers 5) or
    the older `rope_scaling`."""
    return config_value(config, f"rope_parameters.{key}") or config_value(config, f"rope_scaling.{key}")


def llama3_rope_factors(config: Config) -> np.ndarray | None:
    """Llama 3.1's RoPE scaling as llama.cpp reads it: one factor per rotary frequency (`rope_freqs.weight`),
    by which llama.cpp divides that frequency. transformers' `llama3` rope keeps high frequencies (wavelength
    below original context / high_freq_factor), divides low ones (wavelength above original context /
    low_freq_factor) by `factor`, and interpolates between; the factor is the default frequency over the
    scaled one. None for any other RoPE type (no tensor is written)."""
    if rope_type(config) != "llama3":
        return None
    dim = head_dim(config)
    inv_freq = 1.0 / rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor = float(rope_scaling_value(config, "factor"))
    low, high = (
        float(rope_scaling_value(config, "low_freq_factor")),
        float(rope_scaling_value(config, "high_freq_factor")),
    )
    context = float(rope_scaling_value(config, "original_max_position_embeddings"))
    wavelength = 2 * np.pi / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return (inv_freq / scaled).astype(np.float32)


def _longrope(config: Config) -> bool:
    return rope_type(config) in ("longrope", "su")


def longrope_factors(kind: str) -> Callable[[Config], np.ndarray | None]:
    """Phi-3's LongRoPE factor table `kind` (long or short) as llama.cpp reads it (`rope_factors_<kind>`): one
    divisor per rotary frequency, as transformers divides them. llama.cpp picks the long table when its context
    is longer than the original one, transformers when the sequence is; None without LongRoPE."""

    def factors(config: Config) -> np.ndarray | None:
        if not _longrope(config):
            return None
        return np.asarray(rope_scaling_value(config, f"{kind}_factor"), dtype=np.float32)

    return factors


def longrope_attn_factor(config: Config) -> float | None:
    """LongRoPE's cos/sin scale, as transformers computes it (sqrt(1 + log(factor) / log(original context)),
    factor the context over the original one unless given), for llama.cpp's rope.scaling.attn_factor."""
    if not _longrope(config):
        return None
    explicit = rope_scaling_value(config, "attention_factor")
    if explicit is not None:
        return float(explicit)
    original = float(rope_scaling_value(config, "original_max_position_embeddings"))
    factor = rope_scaling_value(config, "factor") or config["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_unsupported(config: Config) -> str | None:
    """A LongRoPE table llama.cpp cannot take: one not of one factor per rotary frequency."""
    if not _longrope(config):
        return None
    wanted = rotary_dims(config) // 2
    for kind in ("long", "short"):
        table = rope_scaling_value(config, f"{kind}_factor") or []
        if len(table) != wanted:
            return f"{kind}_factor has {len(table)} values, not one per rotary frequency ({wanted})"
    return None


def _yarn(config: Config) -> bool:
    return rope_type(config) == "yarn"


def yarn_factor(config: Config) -> float | None:
    """YaRN's context factor (transformers derives it from the two context lengths when the config has none)."""
    if not _yarn(config):
        return None
    factor = rope_scaling_value(config, "factor")
    if factor is None:
        factor = config["max_position_embeddings"] / rope_scaling_value(
            config, "original_max_position_embeddings"
        )
    return float(factor)


def yarn_original_context(config: Config) -> int | None:
    return int(rope_scaling_value(config, "original_max_position_embeddings")) if _yarn(config) else None


def _yarn_mscale_ratio(config: Config) -> bool:
    # transformers scales cos/sin by get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when both
    # are set, by get_mscale(factor) otherwise; llama.cpp does the first when the file has a log multiplier.
    return bool(rope_scaling_value(config, "mscale") and rope_scaling_value(config, "mscale_all_dim"))


def yarn_log_multiplier(config: Config) -> float | None:
    if not (_yarn(config) and _yarn_mscale_ratio(config)):
        return None
    return float(rope_scaling_value(config, "mscale_all_dim"))


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attn_factor(config: Config) -> float | None:
    """An explicit `attention_factor`, relative to the one llama.cpp computes itself (its attn_factor key
    multiplies that one)."""
    explicit = rope_scaling_value(config, "attention_factor")
    if not _yarn(config) or explicit is None:
        return None
    factor = yarn_factor(config)
    if _yarn_mscale_ratio(config):
        computed = _get_mscale(factor) / _get_mscale(
            factor, float(rope_scaling_value(config, "mscale_all_dim"))
        )
    else:
        computed = _get_mscale(factor)
    return float(explicit) / computed


def yarn_unsupported(config: Config) -> str | None:
    """What of a YaRN config llama.cpp's generic loaders fix otherwise (None when nothing): they keep
    beta_fast 32 and beta_slow 1, always truncate the correction range, and take mscale as 1."""
    if not _yarn(config):
        return None
    problems = []
    for key, fixed in (("beta_fast", 32), ("beta_slow", 1)):
        value = rope_scaling_value(config, key)
        if value is not None and float(value) != fixed:
            problems.append(f"{key} {value} (llama.cpp: {fixed})")
    if config_value(config, "rope_parameters.truncate") is False:
        problems.append("truncate false")
    if _yarn_mscale_ratio(config) and float(rope_scaling_value(config, "mscale")) != 1.0:
        problems.append(f"mscale {rope_scaling_value(config, 'mscale')} with mscale_all_dim (llama.cpp: 1)")
    if rope_scaling_value(config, "original_max_position_embeddings") is None:
        problems.append("no original_max_position_embeddings")
    return ", ".join(problems) or None


def _context_length(config: Config) -> int:
    # A sliding window shorter than the context is not part of llama.cpp's `llama` graph: advertising only
    # the window keeps every context llama.cpp will run identical to the source model.
    window = config.get("sliding_window")
    context = config["max_position_embeddings"]
    return min(context, window) if window else context


def _rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q/k projection from HF's rotate-half RoPE layout to llama.cpp's interleaved one.

    transformers rotates dimension i with i + head_dim/2; llama.cpp's `llama` graph (normal RoPE) rotates
    2i with 2i+1. Within each head, rows [first half | second half] become pairs (h0, h_half, h1, ...).
    Written here rather than imported because the exporter must not depend on a llama.cpp checkout.
    """
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def permute_q(tensor: np.ndarray, config: Config) -> np.ndarray:
    return _rope_permute(tensor, config["num_attention_heads"])


def permute_k(tensor: np.ndarray, config: Config) -> np.ndarray:
    return _rope_permute(tensor, kv_heads(config))


Transform = Callable[[np.ndarray, Config], np.ndarray]


@dataclass(frozen=True)
class HParam:
    """One GGUF metadata key (`{arch}` is replaced by the plan's arch) and where its value comes from."""

    key: str
    source: str | Callable[[Config], Any]  # a dotted config path, or a function of the config
    kind: str = "uint32"  # the GGUFWriter.add_<kind> used to write it: uint32, float32, bool, string
    optional: bool = False  # skip when the config has no value (instead of refusing)

    def value(self, config: Config) -> Any:
        return self.source(config) if callable(self.source) else config_value(config, self.source)


@dataclass(frozen=True)
class TensorRule:
    """Checkpoint tensor `source` becomes GGUF tensor `target`, through `transform` when set."""

    source: str  # e.g. "model.layers.{bid}.self_attn.q_proj.weight"
    target: str  # e.g. "blk.{bid}.attn_q.weight"
    transform: Transform | None = None
    # Optional tensors may be absent (a tied lm_head); required ones must exist for every block.
    optional: bool = False
    # For a tensor the target graph requires but the model may lack (the biases of a bias-free model): the
    # shape of the float32 zeros written in its place when the checkpoint has no `source`.
    zeros: Callable[[Config], tuple[int, ...]] | None = None
    # For a tensor no checkpoint holds, computed from the config (Llama 3's RoPE factors); None from the
    # function: the model needs none, nothing is written. `source` then only names it.
    generated: Callable[[Config], np.ndarray | None] | None = None


@dataclass(frozen=True)
class ConfigCheck:
    """A config value the target graph can represent only in the listed forms."""

    source: str | Callable[[Config], Any]
    allowed: tuple[Any, ...]
    component: str  # what the error names when the value is not allowed

    def value(self, config: Config) -> Any:
        return self.source(config) if callable(self.source) else config_value(config, self.source)


@dataclass(frozen=True)
class GGUFPlan:
    """How an architecture becomes a GGUF file that llama.cpp runs with its own graph."""

    arch: str  # llama.cpp's architecture name (general.architecture)
    hparams: tuple[HParam, ...]
    tensors: tuple[TensorRule, ...]
    checks: tuple[ConfigCheck, ...] = ()
    # Tensors that carry nothing llama.cpp needs (e.g. rotary caches saved by old transformers versions).
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class VLLMPlan:
    """How an architecture becomes a folder `vllm serve` accepts as it is (read by `export/vllm.py`).

    Two routes, either or both declared:
    - native: the transformers architecture vLLM implements itself (`architecture`, `model_type`), with the
      config keys and tensor names renamed into its layout. vLLM then runs its own, fastest implementation.
    - remote code: the model follows transformers' attention interface (`_supports_attention_backend`), so
      vLLM's Transformers backend serves a folder that carries the modelling source (`auto_map`).
    With neither, the export refuses and names `blocker`.
    """

    architecture: str | None = None  # e.g. "LlamaForCausalLM": a class name in `transformers`
    model_type: str | None = None  # that class's config model_type, e.g. "llama"
    # Source config key -> native key, or several native keys when one value feeds several (one dropout
    # rate -> Starcoder2's residual and embedding dropouts); keys not listed keep their name.
    config_keys: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    # (regex, replacement) applied in order to every tensor name (full weights and LoRA adapters alike,
    # so patterns should not be anchored at the start); empty when the names are already native.
    tensor_renames: tuple[tuple[str, str], ...] = ()
    # (regex, transform name) applied to the renamed tensor names, for layouts a rename cannot reach (GPT-2's
    # `Conv1D` stores [in, out]); the names are keys of `export.vllm.TENSOR_TRANSFORMS`.
    tensor_transforms: tuple[tuple[str, str], ...] = ()
    remote_code: bool = False
    blocker: str | None = None  # why neither route works, when that is the case


@dataclass(frozen=True)
class ExportPlan:
    """Everything an architecture declares about its exports; a format it cannot reach is None."""

    model_type: str
    gguf: GGUFPlan | None = None
    vllm: VLLMPlan | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Why there is no GGUF form (gguf is None), in the words the exporter refuses with.
    gguf_blocker: str | None = None


PLANS: dict[str, ExportPlan] = {}


def register_plan(plan: ExportPlan) -> None:
    """Make `plan` the export plan of its model_type."""
    PLANS[plan.model_type] = plan


def load_plans() -> dict[str, ExportPlan]:
    """Every export plan: those of the transformers architectures below and each registered architecture's
    (its `plan_module`, imported here; plan modules import no modelling code)."""
    import importlib

    from toolkit.models.registry import ARCHITECTURES

    for arch in list(ARCHITECTURES.values()):
        if arch is not None and arch.plan_module:
            importlib.import_module(arch.plan_module)
    return PLANS


def get_plan(model_type: str) -> ExportPlan:
    """The export plan of `model_type`; an architecture without one is an error that lists those with one."""
    if model_type not in PLANS:
        load_plans()
    if model_type not in PLANS:
        known = ", ".join(sorted(PLANS))
        raise ExportError(f"architecture '{model_type}' has no export plan; architectures with one: {known}")
    return PLANS[model_type]


# Hyper-parameters as llama.cpp's loaders read them; key names are gguf-py's `Keys.LLM` / `Keys.Attention` /
# `Keys.Rope`. Every graph reads the shape; RoPE graphs add the KV heads and rotary settings; each adds its norm.
SHAPE_HPARAMS: tuple[HParam, ...] = (
    HParam("{arch}.context_length", _context_length),
    HParam("{arch}.embedding_length", "hidden_size"),
    HParam("{arch}.feed_forward_length", "intermediate_size"),
    HParam("{arch}.block_count", "num_hidden_layers"),
    HParam("{arch}.vocab_size", "vocab_size"),
    HParam("{arch}.attention.head_count", "num_attention_heads"),
)
ROPE_HPARAMS: tuple[HParam, ...] = SHAPE_HPARAMS + (
    HParam("{arch}.attention.head_count_kv", kv_heads),
    HParam("{arch}.rope.dimension_count", head_dim),
    HParam("{arch}.rope.freq_base", rope_theta, "float32"),
)
LAYER_NORM_EPS = HParam("{arch}.attention.layer_norm_epsilon", "layer_norm_eps", "float32")

# The Llama family's: explicit key/value widths (a head_dim may differ from hidden/heads) and RMSNorm.
LLAMA_HPARAMS: tuple[HParam, ...] = ROPE_HPARAMS + (
    HParam("{arch}.attention.key_length", head_dim),
    HParam("{arch}.attention.value_length", head_dim),
    HParam("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
)

# YaRN (Qwen2.5/Qwen3 long context, Ministral 3) as llama.cpp's loaders read it for every graph; written only
# for a YaRN config.
YARN_HPARAMS: tuple[HParam, ...] = (
    HParam("{arch}.rope.scaling.type", lambda c: "yarn" if _yarn(c) else None, "string", optional=True),
    HParam("{arch}.rope.scaling.factor", yarn_factor, "float32", optional=True),
    HParam("{arch}.rope.scaling.original_context_length", yarn_original_context, optional=True),
    HParam("{arch}.rope.scaling.attn_factor", yarn_attn_factor, "float32", optional=True),
)
YARN_CHECK = ConfigCheck(
    yarn_unsupported, (None,), "YaRN RoPE scaling (rope_parameters: beta_fast, beta_slow, truncate, mscale)"
)

LLAMA_CHECKS: tuple[ConfigCheck, ...] = (
    ConfigCheck(rope_type, ("default", "llama3", "yarn"), "RoPE scaling (rope_parameters.rope_type)"),
    ConfigCheck("hidden_act", ("silu",), "activation (hidden_act)"),
    ConfigCheck("mlp_bias", (None, False), "MLP biases (mlp_bias)"),
)

LLAMA_CHECKS += (YARN_CHECK,)

# Graphs that read no RoPE factors: unscaled RoPE only.
DEFAULT_ROPE_CHECKS: tuple[ConfigCheck, ...] = (
    ConfigCheck(rope_type, ("default",), "RoPE scaling (rope_parameters.rope_type)"),
    LLAMA_CHECKS[1],
)
# Unscaled RoPE or YaRN.
YARN_ROPE_CHECKS: tuple[ConfigCheck, ...] = (
    ConfigCheck(rope_type, ("default", "yarn"), "RoPE scaling (rope_parameters.rope_type)"),
    LLAMA_CHECKS[1],
    YARN_CHECK,
)

_BLOCK = "model.layers.{bid}"


def _block_rules(q: Transform | None, k: Transform | None, qkv_bias_optional: bool) -> tuple[TensorRule, ...]:
    """The decoder-block tensors shared by the Llama and Qwen2 graphs, which differ in RoPE layout and biases."""
    attn, mlp = f"{_BLOCK}.self_attn", f"{_BLOCK}.mlp"
    return (
        TensorRule(f"{_BLOCK}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
        TensorRule(f"{attn}.q_proj.weight", "blk.{bid}.attn_q.weight", q),
        TensorRule(f"{attn}.k_proj.weight", "blk.{bid}.attn_k.weight", k),
        TensorRule(f"{attn}.v_proj.weight", "blk.{bid}.attn_v.weight"),
        TensorRule(f"{attn}.o_proj.weight", "blk.{bid}.attn_output.weight"),
        TensorRule(f"{attn}.q_proj.bias", "blk.{bid}.attn_q.bias", q, optional=qkv_bias_optional),
        TensorRule(f"{attn}.k_proj.bias", "blk.{bid}.attn_k.bias", k, optional=qkv_bias_optional),
        TensorRule(f"{attn}.v_proj.bias", "blk.{bid}.attn_v.bias", optional=qkv_bias_optional),
        TensorRule(f"{_BLOCK}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
        TensorRule(f"{mlp}.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
        TensorRule(f"{mlp}.up_proj.weight", "blk.{bid}.ffn_up.weight"),
        TensorRule(f"{mlp}.down_proj.weight", "blk.{bid}.ffn_down.weight"),
    )


_EDGE_RULES: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "token_embd.weight"),
    TensorRule("model.norm.weight", "output_norm.weight"),
    # Absent when tied: llama.cpp then reads token_embd as the output projection.
    TensorRule("lm_head.weight", "output.weight", optional=True),
)

_IGNORED = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)

# Llama 3.1-3.3's scaled RoPE: the factors llama.cpp's `llama` graph divides each frequency by.
ROPE_FREQS = TensorRule("<rope factors>", "rope_freqs.weight", generated=llama3_rope_factors)

# llama.cpp's `llama` graph: normal (interleaved) RoPE, so q and k rows are permuted; attention biases
# (LlamaConfig.attention_bias) optional, the output projection's included.
LLAMA_GGUF = GGUFPlan(
    arch="llama",
    hparams=LLAMA_HPARAMS + YARN_HPARAMS,
    tensors=_EDGE_RULES
    + _block_rules(permute_q, permute_k, qkv_bias_optional=True)
    + (
        TensorRule(f"{_BLOCK}.self_attn.o_proj.bias", "blk.{bid}.attn_output.bias", optional=True),
        ROPE_FREQS,
    ),
    checks=LLAMA_CHECKS,
    ignored=_IGNORED,
)

# llama.cpp's `qwen2` graph: NEOX RoPE (HF's own layout, no permutation) and q/k/v biases always present.
QWEN2_GGUF = GGUFPlan(
    arch="qwen2",
    hparams=LLAMA_HPARAMS + YARN_HPARAMS,
    tensors=_EDGE_RULES + _block_rules(None, None, qkv_bias_optional=False),
    checks=YARN_ROPE_CHECKS
    + (ConfigCheck("use_sliding_window", (None, False), "sliding-window attention (use_sliding_window)"),),
    ignored=_IGNORED,
)

# llama.cpp's `qwen3` graph: Qwen2's layout without the q/k/v biases, plus an RMSNorm over each head's query
# and key (QK-norm, `q_norm`/`k_norm`) before RoPE; the head width is the config's own `head_dim`.
QWEN3_GGUF = GGUFPlan(
    arch="qwen3",
    hparams=LLAMA_HPARAMS + YARN_HPARAMS,
    tensors=_EDGE_RULES
    + _block_rules(None, None, qkv_bias_optional=True)
    + (
        TensorRule(f"{_BLOCK}.self_attn.q_norm.weight", "blk.{bid}.attn_q_norm.weight"),
        TensorRule(f"{_BLOCK}.self_attn.k_norm.weight", "blk.{bid}.attn_k_norm.weight"),
    ),
    checks=YARN_ROPE_CHECKS
    + (
        ConfigCheck("attention_bias", (None, False), "attention biases (attention_bias)"),
        ConfigCheck("use_sliding_window", (None, False), "sliding-window attention (use_sliding_window)"),
    ),
    ignored=_IGNORED,
)

# llama.cpp's `olmo2` graph: OLMo 2's norms after each sublayer (`post_attention_layernorm` and
# `post_feedforward_layernorm` on the sublayer's output, none before it) and an RMSNorm over the whole query
# and key projections (not per head), NEOX RoPE.
_OLMO2_ATTN = f"{_BLOCK}.self_attn"
OLMO2_GGUF = GGUFPlan(
    arch="olmo2",
    hparams=LLAMA_HPARAMS,
    tensors=_EDGE_RULES
    + (
        TensorRule(f"{_OLMO2_ATTN}.q_proj.weight", "blk.{bid}.attn_q.weight"),
        TensorRule(f"{_OLMO2_ATTN}.k_proj.weight", "blk.{bid}.attn_k.weight"),
        TensorRule(f"{_OLMO2_ATTN}.v_proj.weight", "blk.{bid}.attn_v.weight"),
        TensorRule(f"{_OLMO2_ATTN}.o_proj.weight", "blk.{bid}.attn_output.weight"),
        TensorRule(f"{_OLMO2_ATTN}.q_norm.weight", "blk.{bid}.attn_q_norm.weight"),
        TensorRule(f"{_OLMO2_ATTN}.k_norm.weight", "blk.{bid}.attn_k_norm.weight"),
        TensorRule(f"{_BLOCK}.post_attention_layernorm.weight", "blk.{bid}.post_attention_norm.weight"),
        TensorRule(f"{_BLOCK}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
        TensorRule(f"{_BLOCK}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
        TensorRule(f"{_BLOCK}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
        TensorRule(f"{_BLOCK}.post_feedforward_layernorm.weight", "blk.{bid}.post_ffw_norm.weight"),
    ),
    checks=DEFAULT_ROPE_CHECKS
    + (ConfigCheck("attention_bias", (None, False), "attention biases (attention_bias)"),),
    ignored=_IGNORED,
)

# llama.cpp's `phi3` graph (Phi-3, Phi-3.5, Phi-4-mini): the checkpoint's fused query/key/value projection and
# fused gate/up projection as they are (llama.cpp splits them the same way: q, k, v rows in turn; the first
# half of gate_up gated by SiLU, times the second), NEOX RoPE over `partial_rotary_factor` of each head.
# Phi-3's long-context RoPE (`longrope`, Phi-3 128k and Phi-4-mini) as two factor tables, written once (llama.cpp
# shares them across blocks), and its attention factor.
PHI3_GGUF = GGUFPlan(
    arch="phi3",
    hparams=tuple(h for h in LLAMA_HPARAMS if h.key != "{arch}.rope.dimension_count")
    + (
        HParam("{arch}.rope.dimension_count", rotary_dims),
        # LongRoPE (Phi-3 128k, Phi-4-mini): the original context decides llama.cpp's choice of table.
        HParam(
            "{arch}.rope.scaling.original_context_length",
            lambda c: (
                int(rope_scaling_value(c, "original_max_position_embeddings")) if _longrope(c) else None
            ),
            optional=True,
        ),
        HParam("{arch}.rope.scaling.attn_factor", longrope_attn_factor, "float32", optional=True),
    ),
    tensors=_EDGE_RULES
    + (
        TensorRule(f"{_BLOCK}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
        TensorRule(f"{_BLOCK}.self_attn.qkv_proj.weight", "blk.{bid}.attn_qkv.weight"),
        TensorRule(f"{_BLOCK}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
        TensorRule(f"{_BLOCK}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
        TensorRule(f"{_BLOCK}.mlp.gate_up_proj.weight", "blk.{bid}.ffn_up.weight"),
        TensorRule(f"{_BLOCK}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
        TensorRule("<rope long factors>", "rope_factors_long.weight", generated=longrope_factors("long")),
        TensorRule("<rope short factors>", "rope_factors_short.weight", generated=longrope_factors("short")),
    ),
    checks=(
        ConfigCheck(rope_type, ("default", "longrope", "su"), "RoPE scaling (rope_parameters.rope_type)"),
        LLAMA_CHECKS[1],
        ConfigCheck(longrope_unsupported, (None,), "LongRoPE (rope_parameters.long_factor, short_factor)"),
    ),
    ignored=_IGNORED,
)


def no_rope_pattern(config: Config) -> str:
    """SmolLM3's NoPE layout, as llama.cpp's `smollm3` graph can run it: "every 4th" when the layers without RoPE
    are exactly every fourth one (3, 7, ...: the interval llama.cpp hard-codes), else the list itself."""
    layers = config.get("no_rope_layers")
    count = config.get("num_hidden_layers") or 0
    if layers is None:
        return "every 4th" if (config.get("no_rope_layer_interval") or 4) == 4 else "other"
    if list(layers) == [int((i + 1) % 4 != 0) for i in range(count)]:
        return "every 4th"
    return str(list(layers))


# llama.cpp's `smollm3` graph (SmolLM3): Llama's block and normal RoPE (q/k rows permuted as for `llama`),
# with RoPE left out of every fourth layer (NoPE). The checkpoint's `no_rope_layers` must be that pattern.
SMOLLM3_GGUF = GGUFPlan(
    arch="smollm3",
    hparams=LLAMA_HPARAMS,
    tensors=_EDGE_RULES
    + _block_rules(permute_q, permute_k, qkv_bias_optional=True)
    + (TensorRule(f"{_BLOCK}.self_attn.o_proj.bias", "blk.{bid}.attn_output.bias", optional=True),),
    checks=DEFAULT_ROPE_CHECKS
    + (
        ConfigCheck(no_rope_pattern, ("every 4th",), "layers without RoPE (no_rope_layers)"),
        ConfigCheck("use_sliding_window", (None, False), "sliding-window attention (use_sliding_window)"),
    ),
    ignored=_IGNORED,
)


def plus_one(tensor: np.ndarray, config: Config) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + weight); llama.cpp's graphs scale by the stored weight."""
    return tensor + 1


def gemma3_layer_pattern(config: Config) -> str:
    """Gemma 3's attention layout as llama.cpp's `gemma3` graph runs it: "5 sliding, 1 full" when every sixth
    layer is global and the rest sliding (the pattern llama.cpp hard-codes), else the list itself."""
    count = config.get("num_hidden_layers") or 0
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(count)]
    types = config.get("layer_types")
    return "5 sliding, 1 full" if types is None or list(types) == expected else str(list(types))


def gemma3_attention_scale(config: Config) -> str:
    """llama.cpp's `gemma3` graph scales attention by 1/sqrt(head_dim) (its 27B type aside): the config's
    query_pre_attn_scalar must be the head width."""
    scalar = config.get("query_pre_attn_scalar")
    return "head_dim" if scalar in (None, head_dim(config)) else f"{scalar} (head_dim {head_dim(config)})"


# llama.cpp's `gemma3` graph (Gemma 3 text models, model_type gemma3_text): embeddings scaled by sqrt(hidden) in
# the graph, as Gemma's scaled embedding does; four RMSNorms per block (before and after attention and MLP),
# each stored as 1 + weight; QK-norm per head; a GELU (tanh) gated MLP; NEOX RoPE; sliding-window layers with
# a global one every sixth, the global ones at the full-attention RoPE base and the local ones at 10000 (both
# as llama.cpp fixes them). The context is the model's: llama.cpp runs the window itself.
_GEMMA_ATTN = f"{_BLOCK}.self_attn"
GEMMA3_GGUF = GGUFPlan(
    arch="gemma3",
    hparams=(
        HParam("{arch}.context_length", "max_position_embeddings"),
        *SHAPE_HPARAMS[1:],
        HParam("{arch}.attention.head_count_kv", kv_heads),
        HParam("{arch}.rope.dimension_count", head_dim),
        HParam("{arch}.rope.freq_base", "rope_parameters.full_attention.rope_theta", "float32"),
        HParam("{arch}.attention.key_length", head_dim),
        HParam("{arch}.attention.value_length", head_dim),
        HParam("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "float32"),
        HParam("{arch}.attention.sliding_window", "sliding_window"),
    ),
    tensors=(
        TensorRule("model.embed_tokens.weight", "token_embd.weight"),
        TensorRule("model.norm.weight", "output_norm.weight", plus_one),
        TensorRule("lm_head.weight", "output.weight", optional=True),
        TensorRule(f"{_BLOCK}.input_layernorm.weight", "blk.{bid}.attn_norm.weight", plus_one),
        TensorRule(f"{_GEMMA_ATTN}.q_proj.weight", "blk.{bid}.attn_q.weight"),
        TensorRule(f"{_GEMMA_ATTN}.k_proj.weight", "blk.{bid}.attn_k.weight"),
        TensorRule(f"{_GEMMA_ATTN}.v_proj.weight", "blk.{bid}.attn_v.weight"),
        TensorRule(f"{_GEMMA_ATTN}.o_proj.weight", "blk.{bid}.attn_output.weight"),
        TensorRule(f"{_GEMMA_ATTN}.q_norm.weight", "blk.{bid}.attn_q_norm.weight", plus_one),
        TensorRule(f"{_GEMMA_ATTN}.k_norm.weight", "blk.{bid}.attn_k_norm.weight", plus_one),
        TensorRule(
            f"{_BLOCK}.post_attention_layernorm.weight", "blk.{bid}.post_attention_norm.weight", plus_one
        ),
        TensorRule(f"{_BLOCK}.pre_feedforward_layernorm.weight", "blk.{bid}.ffn_norm.weight", plus_one),
        TensorRule(f"{_BLOCK}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
        TensorRule(f"{_BLOCK}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
        TensorRule(f"{_BLOCK}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
        TensorRule(f"{_BLOCK}.post_feedforward_layernorm.weight", "blk.{bid}.post_ffw_norm.weight", plus_one),
    ),
    checks=(
        ConfigCheck("hidden_activation", ("gelu_pytorch_tanh", "gelu_new"), "activation (hidden_activation)"),
        ConfigCheck(
            "rope_parameters.full_attention.rope_type",
            ("default",),
            "RoPE scaling of the global layers (rope_parameters.full_attention.rope_type)",
        ),
        ConfigCheck(
            "rope_parameters.sliding_attention.rope_type",
            ("default",),
            "RoPE scaling of the sliding layers (rope_parameters.sliding_attention.rope_type)",
        ),
        ConfigCheck(
            "rope_parameters.sliding_attention.rope_theta",
            (10000.0, 10000),
            "RoPE base of the sliding layers (rope_parameters.sliding_attention.rope_theta)",
        ),
        ConfigCheck(
            gemma3_layer_pattern, ("5 sliding, 1 full",), "sliding/global layer pattern (layer_types)"
        ),
        ConfigCheck(gemma3_attention_scale, ("head_dim",), "attention scale (query_pre_attn_scalar)"),
        ConfigCheck("final_logit_softcapping", (None,), "final logit soft-capping (final_logit_softcapping)"),
        ConfigCheck("attn_logit_softcapping", (None,), "attention soft-capping (attn_logit_softcapping)"),
        ConfigCheck("attention_bias", (None, False), "attention biases (attention_bias)"),
        ConfigCheck(
            "use_bidirectional_attention",
            (None, False),
            "bidirectional attention (use_bidirectional_attention)",
        ),
    ),
    ignored=_IGNORED,
)

# llama.cpp's `mistral3` graph (Ministral 3): Llama's block with YaRN RoPE, its attention scale written as a
# log multiplier (mscale_all_dim), and Llama 4's position-dependent query scaling, 1 + beta * log(1 +
# floor(position / original context)), from `llama_4_scaling_beta`.
MINISTRAL3_GGUF = GGUFPlan(
    arch="mistral3",
    hparams=LLAMA_HPARAMS
    + YARN_HPARAMS
    + (
        HParam("{arch}.rope.scaling.yarn_log_multiplier", yarn_log_multiplier, "float32", optional=True),
        HParam(
            "{arch}.attention.temperature_scale",
            lambda c: rope_scaling_value(c, "llama_4_scaling_beta"),
            "float32",
            optional=True,
        ),
    ),
    tensors=_EDGE_RULES + _block_rules(permute_q, permute_k, qkv_bias_optional=True),
    checks=YARN_ROPE_CHECKS,
    ignored=_IGNORED,
)

# Native transformers folders are already what vLLM serves: the export copies and normalises them.
register_plan(ExportPlan("llama", gguf=LLAMA_GGUF, vllm=VLLMPlan("LlamaForCausalLM", "llama")))
register_plan(
    ExportPlan(
        "mistral",
        gguf=LLAMA_GGUF,
        vllm=VLLMPlan("MistralForCausalLM", "mistral"),
        notes=("a sliding window shorter than max_position_embeddings becomes the GGUF context length",),
    )
)
register_plan(
    ExportPlan(
        "ministral3",
        gguf=MINISTRAL3_GGUF,
        vllm=VLLMPlan(
            blocker="vLLM maps Ministral3ForCausalLM to its Mistral implementation; that route is not verified here "
            "yet, so the export does not offer it"
        ),
    )
)
register_plan(ExportPlan("qwen2", gguf=QWEN2_GGUF, vllm=VLLMPlan("Qwen2ForCausalLM", "qwen2")))
register_plan(ExportPlan("qwen3", gguf=QWEN3_GGUF, vllm=VLLMPlan("Qwen3ForCausalLM", "qwen3")))
register_plan(ExportPlan("olmo2", gguf=OLMO2_GGUF, vllm=VLLMPlan("Olmo2ForCausalLM", "olmo2")))
register_plan(ExportPlan("gemma3_text", gguf=GEMMA3_GGUF, vllm=VLLMPlan("Gemma3ForCausalLM", "gemma3_text")))
register_plan(ExportPlan("smollm3", gguf=SMOLLM3_GGUF, vllm=VLLMPlan("SmolLM3ForCausalLM", "smollm3")))
register_plan(
    ExportPlan(
        "phi3",
        gguf=PHI3_GGUF,
        vllm=VLLMPlan("Phi3ForCausalLM", "phi3"),
        notes=("a sliding window shorter than max_position_embeddings becomes the GGUF context length",),
    )
)

__all__ = [
    "ConfigCheck",
    "ExportPlan",
    "GGUFPlan",
    "HParam",
    "LAYER_NORM_EPS",
    "LLAMA_GGUF",
    "PLANS",
    "QWEN2_GGUF",
    "QWEN3_GGUF",
    "OLMO2_GGUF",
    "PHI3_GGUF",
    "ROPE_HPARAMS",
    "SHAPE_HPARAMS",
    "TensorRule",
    "VLLMPlan",
    "get_plan",
    "load_plans",
    "register_plan",
]
