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
    stride: int | None = None,
) -> dict[str, float]:
    """exp(mean next-token NLL) over non-overlapping `window`-token chunks of the texts joined by eos; with
    `stride`, over a sliding window instead (`sliding_perplexity`).

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
    if stride is not None:
        return sliding_perplexity(model, stream, window, stride)
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


@torch.no_grad()
def sliding_perplexity(
    model: PreTrainedModel, stream: list[int], window: int, stride: int
) -> dict[str, float]:
    """Perplexity of a token stream with a window of `window` tokens moved `stride` at a time: each token from
    the second on is predicted once, in the first window that holds it as a new token, so with at least
    `window - stride` tokens of context once the window is full (the method of transformers' perplexity
    guide; smaller strides: more context, more compute)."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    was_training = model.training
    model.eval()
    total_nll, total_tokens, predicted_to = 0.0, 0, 1  # tokens before `predicted_to` are scored
    for begin in range(0, max(len(stream) - 1, 1), stride):
        end = min(begin + window, len(stream))
        if end <= predicted_to:
            continue
        ids = torch.tensor([stream[begin:end]], device=model.device)
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        new = slice(
            predicted_to - begin - 1, end - begin - 1
        )  # positions predicting tokens predicted_to..end-1
        total_nll -= logprobs[new].gather(1, targets[new, None]).sum().item()
        total_tokens += end - predicted_to
        predicted_to = end
        if end == len(stream):
            break
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "window": window,
        "stride": stride,
    }
