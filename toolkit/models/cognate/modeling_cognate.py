"""The `cognate` architecture: a causal LM that refines its answer by applying one small block stack recursively,
with a gated long-term memory beside sliding-window attention and a halting head that decides when to stop.

Two published designs, crossed:

- **TRM** (Jolicoeur-Martineau, "Less is More: Recursive Reasoning with Tiny Networks", 2025). Per position
  three streams: the input x (token embeddings), the answer y and the latent z (both start from learned
  vectors). One *cycle* refines the latent `l_cycles` times, z <- net(x + y + z), then the answer once,
  y <- net(y + z); a refinement *step* runs `h_cycles` cycles, all but the last without gradients; a forward
  pass runs `supervision_steps` steps with the carry (y, z) detached between them, and every step's answer is
  read out (norm, LM head) and scored: deep supervision. A halting head on the answer predicts whether the
  step's prediction is right (the paper's Q-head, ACT).
- **Titans** (Behrouz, Zhong and Mirrokni, "Titans: Learning to Memorize at Test Time", 2025), Memory as a
  Gate (MAG, section 4.2). Each block's token mixer is two branches: sliding-window attention for the short
  range and a neural long-term memory for the long one, combined through a learned gate. The memory here is
  the paper's linear case (one matrix per head, written by its update rule; section 3.1), written from the
  input stream x (normalised) once per forward pass and read by the block at every application:

      surprise   S_t = eta_t * S_{t-1} - theta_t * grad l(M_{t-1}; x_t),   l(M; x) = 1/2 ||M k_t - v_t||^2
                 grad l = (M_{t-1} k_t - v_t) k_t^T
      memory     M_t = (1 - alpha_t) * M_{t-1} + S_t
      read       m_t = M_t q_t                       (q_t from the block's current state h_t)
      gate       o_t = g_t * attn_t + (1 - g_t) * W_o m_t,    g_t = sigmoid(W_g h_t)

  with k_t, v_t, theta_t (write rate, at most `memory_lr`), eta_t (momentum) and alpha_t (forgetting) from
  x_t, q_t and k_t L2-normalised per head (as Titans normalises them). Titans writes the combination as
  `y (x) M(x)` with a non-linear gate; the convex gate above is the form this model uses.
  `tests/toolkit/models/test_cognate.py` checks a write and a read against a numpy transcription of these
  lines. Writing from x rather than from each application's state keeps the recurrence (a loop over
  positions) out of the recursion, where it would run steps x cycles x updates times per pass: x is the
  stream TRM's recursion never changes, so the memory holds the text, and the refinement queries it.

Written the transformers 5 way: attention through `ALL_ATTENTION_FUNCTIONS` with `**kwargs` passed down, a
`layer_idx` on every attention module (its block's index), SDPA/flash/flex, gradient checkpointing per block,
`GenerationMixin`. The KV cache holds one slot per block *application* (steps x cycles x updates x blocks),
each a transformers `LinearAttentionAndSlidingWindowAttentionLayer`: the window's keys and values, and in a
block's first slot the memory's two recurrent states, so beam search reorders them with the rest.

Inference runs `supervision_steps` steps ("fixed"), or stops each row at the first step whose halting
probability at its last position reaches `halt_threshold` ("adaptive": the batch runs until every row has
stopped; a row that stopped keeps the answer of its step). With a cache, the first call (the prompt) fixes
how many steps later calls run, because every later token must find each step's keys in the cache.

Modelling files import only torch, transformers and each other (the remote-code export copies this folder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    LinearAttentionAndSlidingWindowAttentionLayer,
)
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_cognate import CognateConfig

# The KV cache's name: `cache` from transformers 5.24, `past_key_values` before (see modeling_codette.py).
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class CognateModelOutput(BaseModelOutputWithPast):
    """The base model's output: the answer state that was read out, plus what the losses and reports need.

    step_hidden_states: each step's normalised answer state (deep supervision reads them all).
    halting_logits: (batch, seq, steps) halting logits, one per step.
    halting_steps: (batch,) steps each row ran before it answered.
    """

    step_hidden_states: tuple[torch.Tensor, ...] | None = None
    halting_logits: torch.Tensor | None = None
    halting_steps: torch.Tensor | None = None


@dataclass
class CognateCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the loss's parts (each also in `loss`) and the halting figures."""

    lm_loss: torch.Tensor | None = None
    deep_supervision_loss: torch.Tensor | None = None
    halting_loss: torch.Tensor | None = None
    ponder_cost: torch.Tensor | None = None
    halting_logits: torch.Tensor | None = None
    halting_steps: torch.Tensor | None = None


class CognateRMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the activation dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class CognateRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (rotate-half over the whole head); inverse frequencies recomputed in
    `_init_weights` after loading, as the other architectures do."""

    def __init__(self, config: CognateConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @property
    def rope_init_fn(self) -> Callable[..., tuple[torch.Tensor, float]]:
        if self.rope_type == "default":
            return self.compute_default_rope_parameters
        return ROPE_INIT_FUNCTIONS[self.rope_type]

    @staticmethod
    def compute_default_rope_parameters(config: CognateConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim) for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


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
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class CognateAttention(nn.Module):
    """Sliding-window multi-head attention with RoPE. `layer_idx` is the block's index; the cache slot of one
    application of the block (`cache_slot`) is passed in, since the same module runs many times per pass."""

    def __init__(self, config: CognateConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        cache_slot: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, cache_slot)

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
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class CognateMemory(nn.Module):
    """Titans' neural long-term memory, linear form (the update in the module docstring), of the input stream.

    `write` runs the recurrence once per forward pass over the token embeddings (TRM's input x, which the
    recursion never changes), returning the memory after every token; `read` queries those memories with the
    block's current state, at every application of the block. Writing once keeps the recurrence, a loop over
    positions, out of the recursion (it would otherwise run steps x cycles x updates times per pass) and
    gives the cache one memory state per block. Positions outside the attention mask (left padding) neither
    write nor move the momentum.
    """

    def __init__(self, config: CognateConfig) -> None:
        super().__init__()
        self.heads, self.dim = config.memory_heads, config.memory_dim
        width = self.heads * self.dim
        self.norm = CognateRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        # Per head: write rate theta, momentum eta, forgetting alpha (in that order), each a sigmoid.
        self.rates = nn.Linear(config.hidden_size, 3 * self.heads, bias=True)
        self.max_lr = config.memory_lr

    def write(
        self,
        inputs: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(batch, seq, heads, dim, dim) memories after each token, and the final (memory, momentum)."""
        batch, length, _ = inputs.shape
        shape = (batch, length, self.heads, self.dim)
        x = self.norm(inputs)
        k = nn.functional.normalize(self.k_proj(x).view(shape), dim=-1)
        v = self.v_proj(x).view(shape)
        theta, eta, alpha = torch.sigmoid(self.rates(x)).view(batch, length, 3, self.heads).unbind(2)
        theta = theta * self.max_lr
        if state is None:
            zeros = x.new_zeros(batch, self.heads, self.dim, self.dim)
            memory, surprise = zeros, zeros
        else:
            memory, surprise = state
        memories = []
        for t in range(length):
            k_t, v_t = k[:, t], v[:, t]  # (batch, heads, dim)
            error = torch.einsum("bhij,bhj->bhi", memory, k_t) - v_t
            gradient = error[..., :, None] * k_t[..., None, :]
            new_surprise = eta[:, t, :, None, None] * surprise - theta[:, t, :, None, None] * gradient
            new_memory = (1 - alpha[:, t, :, None, None]) * memory + new_surprise
            if token_mask is None:
                memory, surprise = new_memory, new_surprise
            else:
                keep = token_mask[:, t, None, None, None]
                memory = torch.where(keep, new_memory, memory)
                surprise = torch.where(keep, new_surprise, surprise)
            memories.append(memory)
        return torch.stack(memories, dim=1), (memory, surprise)

    def read(self, hidden_states: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
        """W_o (M_t q_t), with q_t from the block's current (normalised) state."""
        batch, length, _ = hidden_states.shape
        q = nn.functional.normalize(
            self.q_proj(hidden_states).view(batch, length, self.heads, self.dim), dim=-1
        )
        read = torch.einsum("bthij,bthj->bthi", memories, q)
        return self.o_proj(read.reshape(batch, length, self.heads * self.dim))


class CognateMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: CognateConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CognateLayer(GradientCheckpointingLayer):
    """x + mix(attn(n(x)), memory read(n(x))), then x + mlp(n(x)): a pre-norm block whose token mixer is MAG's
    two gated branches. `memories` are this block's memory after each token (written once per pass)."""

    def __init__(self, config: CognateConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = CognateRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = CognateAttention(config, layer_idx)
        self.memory = CognateMemory(config) if config.memory_heads else None
        self.memory_gate = (
            nn.Linear(config.hidden_size, config.hidden_size, bias=True) if self.memory else None
        )
        if self.memory_gate is not None:
            # Weight init visits the Linear itself after this block, so its bias start is set from there.
            self.memory_gate.is_memory_gate = True
        self.post_attention_layernorm = CognateRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = CognateMLP(config)
        # Mean of (1 - gate) in the last pass, how much the block read from memory: for reports, never trained.
        self.memory_use: float | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_slot: int = 0,
        memories: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        mixed, _ = self.self_attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            cache_slot=cache_slot,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.memory is not None:
            gate = torch.sigmoid(self.memory_gate(normed))
            mixed = gate * mixed + (1 - gate) * self.memory.read(normed, memories)
            self.memory_use = float((1 - gate).detach().mean())
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def prepare_cache(cache: Cache, slots: int, sliding_window: int) -> None:
    """Give `cache` one slot per block application: a sliding-window KV layer with two recurrent states (the
    memory and its momentum). A cache that `generate` built from the config holds one plain layer per block,
    still empty: those are replaced, and the missing slots appended."""
    for i in range(slots):
        if i < len(cache.layers) and isinstance(
            cache.layers[i], LinearAttentionAndSlidingWindowAttentionLayer
        ):
            continue
        layer = LinearAttentionAndSlidingWindowAttentionLayer(
            sliding_window=sliding_window, number_of_states=2
        )
        if i < len(cache.layers):
            if getattr(cache.layers[i], "is_initialized", False):
                raise ValueError(
                    f"cache slot {i} already holds keys from another layout: a cognate model needs its own cache "
                    "(let the model or `generate` create it)"
                )
            cache.layers[i] = layer
        else:
            cache.layers.append(layer)


def cached_steps(cache: Cache | None, slots_per_step: int) -> int:
    """How many refinement steps earlier calls left in `cache` (0 for an empty one)."""
    if cache is None:
        return 0
    filled = sum(bool(getattr(layer, "is_initialized", False)) for layer in cache.layers)
    return filled // slots_per_step


class CognatePreTrainedModel(PreTrainedModel):
    """Capabilities declared to transformers, Accelerate (FSDP wrapping) and the attention backends."""

    config: CognateConfig
    config_class = CognateConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CognateLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # The memory's loop over positions and the data-dependent number of steps rule out a full graph.
    _can_compile_fullgraph = False
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": CognateLayer, "attentions": CognateAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CognateRotaryEmbedding):
            inv_freq, _ = module.rope_init_fn(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        elif isinstance(module, CognateMemory):
            # Start as a slow-forgetting memory: write rate and momentum at one half, forgetting at
            # sigmoid(-4) = 0.018 per token, so what is written survives about fifty tokens.
            heads = module.heads
            bias = torch.cat([torch.zeros(2 * heads), torch.full((heads,), -4.0)])
            init.copy_(module.rates.bias, bias)
        elif isinstance(module, CognateModel):
            init.normal_(module.y_init, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.z_init, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.Linear) and getattr(module, "is_memory_gate", False):
            # An even mix of attention and memory at the start, unless the config leans one way.
            init.constant_(module.bias, self.config.memory_gate_bias)


class CognateModel(CognatePreTrainedModel):
    """Token embeddings, the recursively applied block stack, the final norm and the halting head; returns the
    answer state of the step each row answered from, and every step's state and halting logits."""

    def __init__(self, config: CognateConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([CognateLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = CognateRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = CognateRotaryEmbedding(config)
        # TRM's starting answer and latent: drawn once and kept fixed, as in the paper (saved with the
        # weights). Learned vectors would get no gradient whenever h_cycles > 1 (the first cycle runs without
        # gradients), which DDP reports as unused parameters.
        self.y_init = nn.Buffer(torch.zeros(config.hidden_size))
        self.z_init = nn.Buffer(torch.zeros(config.hidden_size))
        self.halt_head = nn.Linear(config.hidden_size, 1, bias=True)
        self.gradient_checkpointing = False
        self.post_init()

    def write_memories(
        self, inputs: torch.Tensor, token_mask: torch.Tensor | None = None, cache: Cache | None = None
    ) -> list[torch.Tensor | None]:
        """Each block's memory after every token of `inputs` (None for a block without memory), continuing
        from the state in the cache (kept in the block's first slot) and leaving the new state there."""
        written: list[torch.Tensor | None] = []
        for layer in self.layers[: self.config.num_hidden_layers]:
            if layer.memory is None:
                written.append(None)
                continue
            slot = cache.layers[layer.layer_idx] if cache is not None else None
            state = None
            if slot is not None and slot.is_recurrent_states_initialized[0]:
                state = (slot.recurrent_states[0], slot.recurrent_states[1])
            memories, (memory, surprise) = layer.memory.write(inputs, token_mask, state)
            if slot is not None:
                slot.update_recurrent_state(memory, state_idx=0)
                slot.update_recurrent_state(surprise, state_idx=1)
            written.append(memories)
        return written

    def _net(self, hidden_states: torch.Tensor, slot: int, memories: list, **block_kwargs) -> torch.Tensor:
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                cache_slot=slot + layer.layer_idx,
                memories=memories[layer.layer_idx],
                **block_kwargs,
            )
        return hidden_states

    def _cycle(
        self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, slot: int, memories: list, **block_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """TRM's latent recursion: `l_cycles` latent updates, then one answer update."""
        blocks = self.config.num_hidden_layers
        for _ in range(self.config.l_cycles):
            z = self._net(x + y + z, slot, memories, **block_kwargs)
            slot += blocks
        y = self._net(y + z, slot, memories, **block_kwargs)
        return y, z, slot + blocks

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
        steps: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CognateModelOutput:
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if use_cache and cache is None:
            cache = DynamicCache()
        per_step = config.applications_per_step * config.num_hidden_layers
        earlier = cached_steps(cache, per_step)
        # A cache fixes the step count its first call chose: every later token needs each step's keys.
        most = earlier or steps or config.supervision_steps
        adaptive = config.halting == "adaptive" and not self.training and not earlier
        if cache is not None:
            prepare_cache(cache, most * per_step, config.sliding_window)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[
                None
            ]
        mask = create_sliding_window_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE: cache},
        )
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1] :].bool()
        block_kwargs = dict(
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids=position_ids),
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )

        x = inputs_embeds
        memories = self.write_memories(x, token_mask, cache)
        y = self.y_init.to(x.dtype).expand_as(x)
        z = self.z_init.to(x.dtype).expand_as(x)
        batch = x.shape[0]
        answer = None
        halted_at = torch.full((batch,), most, dtype=torch.long, device=x.device)
        done = torch.zeros(batch, dtype=torch.bool, device=x.device)
        states, halts, slot = [], [], 0
        for step in range(most):
            with torch.no_grad():
                for _ in range(config.h_cycles - 1):
                    y, z, slot = self._cycle(x, y, z, slot, memories, **block_kwargs)
            y, z, slot = self._cycle(x, y, z, slot, memories, **block_kwargs)
            state = self.norm(y)
            states.append(state)
            halts.append(self.halt_head(state).squeeze(-1))
            y, z = y.detach(), z.detach()  # deep supervision: each step's gradient stays in its step
            if config.halting == "adaptive" and not self.training:
                stops = (torch.sigmoid(halts[-1][:, -1]) >= config.halt_threshold) & ~done
                halted_at = torch.where(stops, step + 1, halted_at)
                answer = state if answer is None else torch.where(stops[:, None, None], state, answer)
                done = done | stops
                if adaptive and bool(done.all()):
                    break
        if answer is None or not bool(done.all()):
            answer = state if answer is None else torch.where(done[:, None, None], answer, state)
        if cache is not None and len(states) < most:
            del cache.layers[len(states) * per_step :]  # the steps it did not run hold nothing
        return CognateModelOutput(
            last_hidden_state=answer,
            step_hidden_states=tuple(states),
            halting_logits=torch.stack(halts, dim=-1),
            halting_steps=halted_at,
            **{CACHE: cache},
        )


class CognateForCausalLM(CognatePreTrainedModel, GenerationMixin):
    """`CognateModel` plus the tied LM head. With labels, the loss is

        lm_loss + deep_supervision_weight * mean(loss of the steps before the last)
                + halting_loss_weight * BCE(halting logit, step's next-token prediction is right)
                + ponder_cost_weight * expected steps / most steps,

    each part also returned (and accumulated for the training log, `pop_loss_parts`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    LOSS_PARTS = ("lm_loss", "deep_supervision_loss", "halting_loss", "ponder_cost", "halting_steps")

    def __init__(self, config: CognateConfig) -> None:
        super().__init__(config)
        self.model = CognateModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._loss_sums: dict[str, float] = {}
        self._loss_count = 0
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
        steps: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CognateCausalLMOutput:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        outputs: CognateModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            steps=steps,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        parts: dict[str, torch.Tensor] = {}
        loss = None
        if labels is not None:
            parts = self._loss_parts(outputs, labels, **kwargs)
            config = self.config
            loss = (
                parts["lm_loss"]
                + config.deep_supervision_weight * parts["deep_supervision_loss"]
                + config.halting_loss_weight * parts["halting_loss"]
                + config.ponder_cost_weight * parts["ponder_cost"]
            )
            if self.training:
                self._record(parts, outputs.halting_steps)
        return CognateCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            halting_logits=outputs.halting_logits,
            halting_steps=outputs.halting_steps,
            **parts,
            **{CACHE: getattr(outputs, CACHE)},
        )

    def _loss_parts(
        self, outputs: CognateModelOutput, labels: torch.Tensor, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Every step's LM loss, the halting head's BCE and the ponder cost (see the class docstring)."""
        losses, hits = [], []
        targets = labels[:, 1:]
        scored = targets != -100
        for state in outputs.step_hidden_states:
            step_logits = self.lm_head(state)
            losses.append(
                self.loss_function(
                    logits=step_logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
                )
            )
            hits.append((step_logits[:, :-1].detach().argmax(-1) == targets).float())
        halting = outputs.halting_logits[:, :-1]  # (batch, seq - 1, steps): positions that predict a label
        right = torch.stack(hits, dim=-1)
        bce = nn.functional.binary_cross_entropy_with_logits(halting.float(), right, reduction="none")
        weights = scored[..., None].float()
        halting_loss = (bce * weights).sum() / weights.sum().clamp(min=1) / len(hits)
        # Expected steps run: step s runs when no earlier step halted, sum_s prod_{j<s} (1 - p_j).
        go_on = torch.cumprod(1 - torch.sigmoid(halting.float()), dim=-1)
        expected = 1 + go_on[..., :-1].sum(-1)
        ponder = (expected * scored).sum() / scored.sum().clamp(min=1) / len(hits)
        zero = losses[-1].new_zeros(())
        return {
            "lm_loss": losses[-1],
            "deep_supervision_loss": torch.stack(losses[:-1]).mean() if len(losses) > 1 else zero,
            "halting_loss": halting_loss,
            "ponder_cost": ponder,
        }

    def _record(self, parts: dict[str, torch.Tensor], halting_steps: torch.Tensor) -> None:
        values = {name: float(value.detach()) for name, value in parts.items()}
        values["halting_steps"] = float(halting_steps.float().mean())
        for name, value in values.items():
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value
        self._loss_count += 1

    def pop_loss_parts(self) -> dict[str, float]:
        """The mean of each loss part over the training forward passes since the last call (for the log)."""
        if not self._loss_count:
            return {}
        means = {name: total / self._loss_count for name, total in self._loss_sums.items()}
        self._loss_sums, self._loss_count = {}, 0
        return means


class CognateForSequenceClassification(GenericForSequenceClassification, CognatePreTrainedModel):
    """`CognateModel` plus a linear score head on the last non-pad token's answer state (reward models)."""


__all__ = [
    "CognateForCausalLM",
    "CognateModel",
    "CognatePreTrainedModel",
    "CognateForSequenceClassification",
]
