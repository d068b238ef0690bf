"""Configuration of `decoder`: a Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).

The field names are those of transformers' `LlamaConfig` on purpose: a `decoder` checkpoint maps one to one
onto `LlamaForCausalLM` (and so onto llama.cpp's `llama` graph and vLLM's native Llama), which is what makes
its GGUF and vLLM exports exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class DecoderConfig(PreTrainedConfig):
    """Hyper-parameters of a `decoder` model; defaults are the `decoder-tiny` preset."""

    model_type = "decoder"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # What transformers reads when a config names no remote code. TRL looks `config.auto_map` up to rebuild a
    # reference model of a class it cannot find in `transformers` (RLOO, GRPO with beta > 0), and a config
    # without the attribute raises there. A class attribute, read-only and never serialized; a remote-code
    # export writes its own into config.json.
    auto_map: ClassVar[Mapping[str, str]] = MappingProxyType({})
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 4096
    hidden_size: int = 256
    # 3 x hidden: SwiGLU's three matrices then cost what a 4x GELU MLP costs; a multiple of 256 so that
    # every K-quant block fits.
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Declared here, not left to **kwargs: an undeclared field is dropped and the weights are silently untied.
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject shapes the attention cannot split (called by `@strict` validation)."""
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


__all__ = ["DecoderConfig"]
