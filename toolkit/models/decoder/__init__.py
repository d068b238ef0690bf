"""The `decoder` architecture (Llama-style); its export plan lives beside it."""

from toolkit.models.registry import lazy_classes

# Imported on first access: the export plan (export_plan.py) is read without the modelling code.
__getattr__ = lazy_classes(
    __name__,
    {
        "DecoderConfig": "configuration_decoder",
        "DecoderModel": "modeling_decoder",
        "DecoderForCausalLM": "modeling_decoder",
        "DecoderForSequenceClassification": "modeling_decoder",
        "DecoderPreTrainedModel": "modeling_decoder",
    },
)

__all__ = [
    "DecoderConfig",
    "DecoderForCausalLM",
    "DecoderModel",
    "DecoderPreTrainedModel",
    "DecoderForSequenceClassification",
]
