"""The `bitnet` family: transformers' own BitNet b1.58 model (`BitNetForCausalLM`: Llama's layout with an RMSNorm
before the attention output and the MLP down projection, squared-ReLU MLP), trained ternary from the start.

The modelling code is transformers'; this package adds only what transformers lacks, a score head for reward
models (modeling_bitnet.py), and the export plan (export_plan.py). A model built from a `bitnet-*` preset gets
BitNet's ternary layers (toolkit.quantization.bitnet) without a `quantization:` key, so its saved folder is a
BitNet checkpoint that plain transformers loads: `BitNetForCausalLM` with `quant_method: bitnet`.
"""

from toolkit.models.registry import lazy_classes

__getattr__ = lazy_classes(__name__, {"BitNetForSequenceClassification": "modeling_bitnet"})

__all__ = ["BitNetForSequenceClassification"]
