"""Perplexity of a causal LM on held-out text, over fixed-length windows of the concatenated token stream."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    window: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = 65536,
) -> dict[str, float]:
    """exp(mean next-token NLL) over non-overlapping `window`-token chunks of the texts joined by eos.

    Non-overlapping windows (no stride) make the figure comparable between models and cheap; it is higher
    than a sliding-window figure because early tokens of each window see little context.
    """
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if max_tokens and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    chunks = [stream[i : i + window] for i in range(0, len(stream) - window + 1, window)] or [stream]
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        ids = torch.tensor(chunks[start : start + batch_size], device=model.device)
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}
