"""The `cognate` architecture (TRM recursion, Titans MAG memory, ACT halting); its export plan lives beside it."""

from toolkit.models.registry import lazy_classes

# Imported on first access: the export plan (export_plan.py) is read without the modelling code.
__getattr__ = lazy_classes(
    __name__,
    {
        "CognateConfig": "configuration_cognate",
        "CognateModel": "modeling_cognate",
        "CognateForCausalLM": "modeling_cognate",
        "CognateForSequenceClassification": "modeling_cognate",
        "CognatePreTrainedModel": "modeling_cognate",
    },
)

__all__ = [
    "CognateConfig",
    "CognateForCausalLM",
    "CognateModel",
    "CognatePreTrainedModel",
    "CognateForSequenceClassification",
]
