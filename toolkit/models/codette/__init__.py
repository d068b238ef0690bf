"""The `codette` architecture (RoPE, LayerNorm, GELU MLP; Starcoder2's block); its export plan lives beside it."""

from toolkit.models.registry import lazy_classes

# Imported on first access: the export plan (export_plan.py) is read without the modelling code.
__getattr__ = lazy_classes(
    __name__,
    {
        "CodetteConfig": "configuration_codette",
        "CodetteModel": "modeling_codette",
        "CodetteForCausalLM": "modeling_codette",
        "CodetteForSequenceClassification": "modeling_codette",
        "CodettePreTrainedModel": "modeling_codette",
    },
)

__all__ = [
    "CodetteConfig",
    "CodetteForCausalLM",
    "CodetteModel",
    "CodettePreTrainedModel",
    "CodetteForSequenceClassification",
]
