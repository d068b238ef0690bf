"""A score head on transformers' BitNet model (reward models, classifiers), which transformers does not ship:
its generic sequence-classification head over `BitNetModel`, as transformers builds it for Llama."""

from transformers.modeling_layers import GenericForSequenceClassification
from transformers.models.bitnet.modeling_bitnet import BitNetPreTrainedModel


class BitNetForSequenceClassification(GenericForSequenceClassification, BitNetPreTrainedModel):
    pass


__all__ = ["BitNetForSequenceClassification"]
