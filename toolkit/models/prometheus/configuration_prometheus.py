"""Configuration of `prometheus`: a GPT-2-style decoder (learned positions, pre-norm LayerNorm, GELU MLP).

Field names follow the rest of the toolkit (`hidden_size`, `num_hidden_layers`, ...) rather than GPT-2's
(`n_embd`, `n_layer`, ...), so that `toolkit arch info` and the memory estimate read every architecture alike;
the vLLM export plan renames them into `GPT2Config`'s keys (see export_plan.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class PrometheusConfig(PreTrainedConfig):
    """Hyper-parameters of a `prometheus` model; defaults are the `prometheus-tiny` preset."""

    model_type = "prometheus"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # What transformers reads when a config names no remote code. TRL looks `config.auto_map` up to rebuild a
    # reference model of a class it cannot find in `transformers` (RLOO, GRPO with beta > 0), and a config
    # without the attribute raises there. A class attribute, read-only and never serialized; a remote-code
    # export writes its own into config.json.
    auto_map: ClassVar[Mapping[str, str]] = MappingProxyType({})

    vocab_size: int = 4096
    hidden_size: int = 256
    # 4 x hidden, GPT-2's ratio; a multiple of 256 so that every K-quant block fits.
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # Learned absolute positions: this is a hard limit, the embedding table has exactly this many rows.
    max_position_embeddings: int = 512
    # GPT-2's tanh approximation of GELU; llama.cpp's `gpt2` graph and vLLM's GPT-2 compute the same one.
    hidden_act: str = "gelu_new"
    # GPT-2 applies one dropout rate after the embeddings and on both residual branches.
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Declared here, not left to **kwargs: an undeclared field is dropped and the weights are silently untied.
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        """Reject shapes the attention cannot split (called by `@strict` validation)."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )


__all__ = ["PrometheusConfig"]
