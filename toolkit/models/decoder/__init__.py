"""The `decoder` architecture (Llama-style); its export plan lives beside it."""

from .configuration_decoder import DecoderConfig
from .modeling_decoder import DecoderForCausalLM, DecoderModel, DecoderPreTrainedModel

__all__ = ["DecoderConfig", "DecoderForCausalLM", "DecoderModel", "DecoderPreTrainedModel"]
from . import export_plan  # noqa: E402, F401  (registers the export plan)
