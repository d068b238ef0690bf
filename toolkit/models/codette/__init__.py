"""The `codette` architecture (RoPE, LayerNorm, GELU MLP; Starcoder2's block); its export plan lives beside it."""

from .configuration_codette import CodetteConfig
from .modeling_codette import CodetteForCausalLM, CodetteModel, CodettePreTrainedModel

__all__ = ["CodetteConfig", "CodetteForCausalLM", "CodetteModel", "CodettePreTrainedModel"]
from . import export_plan  # noqa: E402, F401  (registers the export plan)
