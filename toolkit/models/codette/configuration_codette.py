"""Configuration of `codette`: a RoPE decoder with pre-norm LayerNorm, biased attention and a 4x GELU MLP.

Field names follow the rest of the toolkit (`layer_norm_eps`, `dropout`, `bias`) rather than Starcoder2's
(`norm_epsilon`, `residual_dropout`, `use_bias`), so that `toolkit arch info` and the memory estimate read
every architecture alike; the vLLM export plan renames them into `Starcoder2Config`'s keys (see
export_plan.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class CodetteConfig(PreTrainedConfig):
    """Hyper-parameters of a `codette` model; defaults are the `codette-tiny` preset."""

    model_type = "codette"
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
        "layers.*.mlp.c_fc": "colwise",
        "layers.*.mlp.c_proj": "rowwise",
    }

    vocab_size: int = 4096
    hidden_size: int = 256
    # 4 x hidden, the project's ratio; a multiple of 256 so that every K-quant block fits.
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # None means one KV head per query head (plain multi-head attention, what the project trains).
    num_key_value_heads: int | None = None
    # The project uses exact erf GELU (`nn.GELU()`), but every llama.cpp graph with RoPE, LayerNorm and a
    # non-gated GELU MLP computes the tanh approximation, so that is the default: exact in llama.cpp and
    # vLLM. `hidden_act="gelu"` gives the project's erf GELU; GGUF export then refuses, naming the
    # activation, while the vLLM export still works (Starcoder2 reads `hidden_act` as it is).
    hidden_act: str = "gelu_pytorch_tanh"
    # RoPE has no position table: this is the trained context, not a hard limit.
    max_position_embeddings: int = 512
    # One rate after the embeddings, on both residual branches and after the MLP's activation (as the
    # project applies it); a second one on the attention probabilities.
    dropout: float = 0.0
    attention_dropout: float = 0.0
    # The project's value; far below float32's resolution of a unit-variance row, so it only guards zero rows.
    layer_norm_eps: float = 1e-12
    # Biases on every linear layer (q, k, v, o and both MLP projections); LayerNorms always carry one.
    bias: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Declared here, not left to **kwargs: an undeclared field is dropped and the weights are silently untied.
    tie_word_embeddings: bool = True
    # None becomes {"rope_type": "default", "rope_theta": 10000.0} (transformers' standardisation).
    rope_parameters: RopeParameters | dict | None = None

    def __post_init__(self, **kwargs):
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


__all__ = ["CodetteConfig"]
