"""Perplexity of a causal LM on held-out text, over fixed-length windows of the concatenated token stream: of
a transformers model, or of a GGUF file as llama.cpp computes it (its tokenizer, its logits)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

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
    stream = token_stream(
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
        texts,
        max_tokens,
    )
    was_training = model.training
    model.eval()
    try:
        return stream_perplexity(
            lambda batch: model(torch.tensor(batch, device=model.device)).logits.float(),
            stream,
            window,
            stride,
            batch_size,
        )
    finally:
        model.train(was_training)


def gguf_perplexity(
    path: str | Path,
    texts: list[str],
    window: int = 256,
    max_tokens: int | None = 65536,
    stride: int | None = None,
    n_threads: int | None = None,
) -> dict[str, float]:
    """`perplexity` of a GGUF file in llama.cpp: the same windows over the stream the file's own tokenizer
    makes, scored by llama.cpp's logits (f32 KV cache), so a checkpoint and its GGUF files compare directly."""
    from export.llama_cpp import llama_logits, load_for_verification

    llm = load_for_verification(Path(path), n_ctx=window, n_threads=n_threads)
    stream = token_stream(
        lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True),
        llm.token_eos(),
        texts,
        max_tokens,
    )
    return stream_perplexity(
        lambda batch: torch.stack([torch.from_numpy(llama_logits(llm, ids)) for ids in batch]),
        stream,
        window,
        stride,
        batch_size=1,
    )


def token_stream(
    encode: Callable[[str], list[int]], eos: int | None, texts: list[str], max_tokens: int | None
) -> list[int]:
    """The texts' tokens joined by `eos` (when there is one), cut at `max_tokens`."""
    sep = [eos] if eos is not None and eos >= 0 else []
    stream: list[int] = []
    for text in texts:
        stream += list(encode(text)) + sep
        if max_tokens and len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


Logits = Callable[
    [list[list[int]]], torch.Tensor
]  # equal-length token rows -> float logits [rows, len, vocab]


@torch.no_grad()
def stream_perplexity(
    logits_of: Logits, stream: list[int], window: int, stride: int | None, batch_size: int = 8
) -> dict[str, float]:
    """Non-overlapping `window`-token chunks of `stream` (or, with `stride`, `sliding_perplexity`)."""
    if stride is not None:
        return sliding_perplexity(logits_of, stream, window, stride)
    chunks = [stream[i : i + window] for i in range(0, len(stream) - window + 1, window)] or [stream]
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        ids = torch.tensor(batch)
        logits = logits_of(batch)[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}


@torch.no_grad()
def sliding_perplexity(logits_of: Logits, stream: list[int], window: int, stride: int) -> dict[str, float]:
    """Perplexity of a token stream with a window of `window` tokens moved `stride` at a time: each token from
    the second on is predicted once, in the first window that holds it as a new token, so with at least
    `window - stride` tokens of context once the window is full (the method of transformers' perplexity
    guide; smaller strides: more context, more compute)."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    total_nll, total_tokens, predicted_to = 0.0, 0, 1  # tokens before `predicted_to` are scored
    for begin in range(0, max(len(stream) - 1, 1), stride):
        end = min(begin + window, len(stream))
        if end <= predicted_to:
            continue
        logprobs = torch.log_softmax(logits_of([stream[begin:end]])[0, :-1].float(), dim=-1)
        targets = torch.tensor(stream[begin + 1 : end], device=logprobs.device)
        new = slice(
            predicted_to - begin - 1, end - begin - 1
        )  # positions predicting tokens predicted_to..end-1
        total_nll -= logprobs[new].gather(1, targets[new, None]).sum().item()
        total_tokens += end - predicted_to
        predicted_to = end
        if end == len(stream):
            break
    mean = total_nll / max(total_tokens, 1)
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "window": window,
        "stride": stride,
    }
