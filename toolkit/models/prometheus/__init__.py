"""The `prometheus` architecture (GPT-2-style); its export plan lives beside it."""

from toolkit.models.registry import lazy_classes

# Imported on first access: the export plan (export_plan.py) is read without the modelling code.
__getattr__ = lazy_classes(
    __name__,
    {
        "PrometheusConfig": "configuration_prometheus",
        "PrometheusModel": "modeling_prometheus",
        "PrometheusForCausalLM": "modeling_prometheus",
        "PrometheusForSequenceClassification": "modeling_prometheus",
        "PrometheusPreTrainedModel": "modeling_prometheus",
    },
)

__all__ = [
    "PrometheusConfig",
    "PrometheusForCausalLM",
    "PrometheusModel",
    "PrometheusPreTrainedModel",
    "PrometheusForSequenceClassification",
]
