"""The `prometheus` architecture: a GPT-2-style causal LM written the transformers 5 way.

Token plus learned absolute position embeddings, pre-norm blocks with LayerNorm, multi-head attention whose
projections carry biases, a 4x GELU MLP, dropout on the embeddings, the residual branches and the attention
weights, and an LM head tied to the token embedding. Attention goes through `ALL_ATTENTION_FUNCTIONS`, so
eager, SDPA, flash and flex kernels and vLLM's Transformers backend plug in; `**kwargs` travel down to the
attention call for the same reason.

Parameter names (`model.embed_tokens`, `model.embed_positions`, `model.layers.{i}.input_layernorm`,
`self_attn.qkv_proj`, `self_attn.o_proj`, `post_attention_layernorm`, `mlp.up_proj`, `mlp.down_proj`,
`model.norm`, `lm_head`) follow the toolkit's `decoder`. q, k and v share one fused projection, in that
order along its output rows, because both consumers want them fused: llama.cpp's `gpt2` graph reads one
`attn_qkv` tensor and transformers' GPT-2 one `c_attn`. Every projection is an `nn.Linear` ([out, in]);
GPT-2's `Conv1D` stores [in, out], which the vLLM export plan transposes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_prometheus import PrometheusConfig

# The KV cache's name. transformers 5.24 calls the forward argument and the output field `cache` (as this file
# does, like its own Llama); earlier releases, vLLM's range (5.16-5.20) among them, call both
# `past_key_values`. The models take either name, and give transformers' mask builder and output classes the
# name of the release they run on: otherwise `generate` on one side of the rename hands over a cache that the
# model never reads, and decodes every new token without its context.
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention; used when `attn_implementation="eager"` (and to return attention weights)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class PrometheusAttention(nn.Module):
    """Multi-head causal self-attention with biased projections; the kernel is chosen by
    `config._attn_implementation`."""

    def __init__(self, config: PrometheusConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx  # the KV cache is indexed by layer
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (
            part.view(hidden_shape).transpose(1, 2) for part in self.qkv_proj(hidden_states).chunk(3, dim=-1)
        )
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class PrometheusMLP(nn.Module):
    """GELU feed-forward: down(act(up(x))), both projections biased."""

    def __init__(self, config: PrometheusConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class PrometheusLayer(GradientCheckpointingLayer):
    """x + drop(attn(ln(x))), then x + drop(mlp(ln(x))). `GradientCheckpointingLayer` makes it checkpointable."""

    def __init__(self, config: PrometheusConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PrometheusAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PrometheusMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = hidden_states + self.dropout(attn_output)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class PrometheusPreTrainedModel(PreTrainedModel):
    """Capabilities declared to transformers, Accelerate (FSDP wrapping) and the attention backends."""

    config: PrometheusConfig
    config_class = PrometheusConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PrometheusLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": PrometheusLayer, "attentions": PrometheusAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # GPT-2's scheme: each residual branch's output projection starts 1/sqrt(2 * layers) smaller, so the
        # residual stream's variance does not grow with depth at initialisation.
        if isinstance(module, PrometheusLayer):
            std = self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5
            init.normal_(module.self_attn.o_proj.weight, mean=0.0, std=std)
            init.normal_(module.mlp.down_proj.weight, mean=0.0, std=std)


class PrometheusModel(PrometheusPreTrainedModel):
    """Token and position embeddings, the stack of blocks and the final norm; returns hidden states."""

    def __init__(self, config: PrometheusConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([PrometheusLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[
                None
            ]

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE: cache},
        )
        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE: cache})


class PrometheusForCausalLM(PrometheusPreTrainedModel, GenerationMixin):
    """`PrometheusModel` plus the tied LM head; loss through `self.loss_function` (handles shifting and
    `num_items_in_batch` for gradient accumulation)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PrometheusConfig) -> None:
        super().__init__(config)
        self.model = PrometheusModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # Generation only needs the last position's logits: skip the vocabulary projection for the rest.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE: getattr(outputs, CACHE)},
        )


class PrometheusForSequenceClassification(GenericForSequenceClassification, PrometheusPreTrainedModel):
    """`PrometheusModel` plus a linear score head on the last non-pad token: a reward model (TRL's RewardTrainer,
    GRPO rewards), or a classifier; transformers' generic head, as its own architectures use."""


__all__ = [
    "PrometheusForCausalLM",
    "PrometheusModel",
    "PrometheusPreTrainedModel",
    "PrometheusForSequenceClassification",
]
