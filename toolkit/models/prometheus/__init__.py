"""The `prometheus` architecture (GPT-2-style); its export plan lives beside it."""

from .configuration_prometheus import PrometheusConfig
from .modeling_prometheus import PrometheusForCausalLM, PrometheusModel, PrometheusPreTrainedModel

__all__ = ["PrometheusConfig", "PrometheusForCausalLM", "PrometheusModel", "PrometheusPreTrainedModel"]
from . import export_plan  # noqa: E402, F401  (registers the export plan)
