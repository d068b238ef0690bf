"""Configuration of `cognate`: one small block stack applied recursively (TRM), with a gated long-term memory
(Titans MAG) beside sliding-window attention, and a halting head (ACT).

The block fields are the `decoder`'s (Llama names: RMSNorm, RoPE, SwiGLU, grouped KV heads), so
`toolkit arch info` and the memory estimate read it like the others. What is new is how often the stack runs:
one forward pass makes `supervision_steps` refinement steps; each step runs `h_cycles` cycles of
(`l_cycles` latent updates z <- net(x + y + z), then one answer update y <- net(y + z)), so the stack runs
`supervision_steps * h_cycles * (l_cycles + 1)` times with the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

HALTING = ("fixed", "adaptive")


@strict
class CognateConfig(PreTrainedConfig):
    """Hyper-parameters of a `cognate` model; defaults are the `cognate-tiny` preset."""

    model_type = "cognate"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # See DecoderConfig: TRL reads `config.auto_map` to rebuild a reference model of a class outside transformers.
    auto_map: ClassVar[Mapping[str, str]] = MappingProxyType({})

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    # The depth of the stack that is applied recursively, not the depth of the computation.
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 512
    # Each position attends to itself and the `sliding_window - 1` before it; the long-term memory carries
    # what lies further back (Titans' MAG: attention for the short range, memory for the long one).
    sliding_window: int = 64
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None

    # Recursion (TRM): cycles per step, latent updates per cycle; gradients flow through the last cycle only.
    h_cycles: int = 2
    l_cycles: int = 2
    # Deep supervision: refinement steps per forward pass, each scored; the carry (y, z) is detached between
    # steps. Also the most steps inference runs.
    supervision_steps: int = 2
    # "fixed": every step runs and the last one answers. "adaptive": a row stops at the first step whose
    # halting probability (at its last position) reaches `halt_threshold`, and answers from that step.
    halting: str = "fixed"
    halt_threshold: float = 0.5
    # Long-term memory (Titans' neural memory, linear form): per head a `memory_dim` x `memory_dim` matrix
    # written at every token by a momentum gradient step on ||M k - v||^2 and read with the query.
    # memory_heads=0 removes the memory (attention alone).
    memory_heads: int = 4
    memory_dim: int = 32
    # The largest step size of a memory write (the learned per-token rate is a sigmoid times this).
    memory_lr: float = 0.5
    # The MAG gate's starting bias: 0 mixes attention and memory evenly; below 0 starts the blocks leaning on the
    # memory (sigmoid(-2) = 0.12 of each block's mixing from attention), the memory specialisation's prior.
    memory_gate_bias: float = 0.0
    # Loss weights: deep supervision (mean over the steps before the last), the halting head's BCE against
    # "this step's prediction is right", and the ponder cost (expected steps over the most steps).
    deep_supervision_weight: float = 0.5
    halting_loss_weight: float = 0.1
    ponder_cost_weight: float = 0.01

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    @property
    def applications_per_step(self) -> int:
        """How many times one refinement step runs the block stack."""
        return self.h_cycles * (self.l_cycles + 1)

    @property
    def cache_layers(self) -> int:
        """KV cache slots a full forward pass fills: one per block application."""
        return self.supervision_steps * self.applications_per_step * self.num_hidden_layers

    def validate_architecture(self):
        """Reject shapes and settings the model cannot run (called by `@strict` validation)."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        for name in ("h_cycles", "l_cycles", "supervision_steps", "sliding_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.halting not in HALTING:
            raise ValueError(f"halting must be one of {', '.join(HALTING)}, not {self.halting!r}")
        if self.memory_heads < 0 or (self.memory_heads and self.memory_dim < 1):
            raise ValueError("memory_heads must be 0 (no memory) or more, with memory_dim at least 1")


__all__ = ["CognateConfig"]
