"""Checks every architecture must pass the same way (transformers conventions), shared by the model tests."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def assert_checkpointing_keeps_gradients(model: PreTrainedModel, vocab: int) -> None:
    """Activation checkpointing recomputes the forward pass: the gradients must not change."""
    model.train()
    ids = torch.randint(0, vocab, (2, 12))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    # transformers 5.2x's name; earlier 5.x releases have only `gradient_checkpointing_enable`.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def randomize_norms_and_biases(model: PreTrainedModel) -> None:
    """Norm weights away from one and biases away from zero, so that a swapped norm or an unmapped bias
    cannot hide behind their initial values in a parity test."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.05)
