"""Analysis of a model beyond its scores: how its generations read, where its attention goes, what it costs.

    generations   distinct-1/2 (unique n-grams over all n-grams, Li et al. 2016), repetition (seq-rep-4: the
                  share of repeated 4-grams within a generation, Welleck et al. 2019), mean length in tokens
    attention     entropy (nats) of each head's attention distribution, per layer and head, averaged over the
                  query positions of a text sample; saved as a heat-map PNG
    cost          parameters; FLOPs per token, measured by torch's FlopCounterMode on a forward pass beside the
                  estimate 2N + 2·layers·context·width (Kaplan et al. 2020); tokens/s of greedy generation;
                  memory for inference (weights, peak rise during a forward) and training (peak rise during one
                  AdamW step), measured beside the architecture's estimate (`toolkit.models.memory_estimate`)

Memory is measured as CUDA's peak allocation on a GPU and as the peak of the process's resident set (sampled
every millisecond) on a CPU, so CPU figures include the allocator's slack.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(generations: list[list[str]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled across generations (0 when there are none)."""
    grams = [g for tokens in generations for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(tokens: list[str], n: int = 4) -> float:
    """seq-rep-n of one generation: 1 − unique n-grams / n-grams (0 for a text shorter than n)."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def generation_measures(tokens: list[list[str]]) -> dict[str, Any]:
    """distinct-1, distinct-2, mean seq-rep-4 and mean length over generations given as token strings."""
    n = len(tokens)
    return {
        "n": n,
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "repetition_4": sum(repetition(t) for t in tokens) / n if n else 0.0,
        "mean_length": sum(map(len, tokens)) / n if n else 0.0,
    }


def entropy_rows(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy per head of attention [batch, heads, queries, keys] over the real query positions
    (mask [batch, queries]; the first position, which can only attend to itself, is left out)."""
    p = attention.float().clamp_min(1e-12)
    entropy = -(attention.float() * p.log()).sum(-1)  # [batch, heads, queries]
    weight = mask[:, None, :].float().clone()
    weight[..., 0] = 0
    return (entropy * weight).sum((0, 2)) / weight.sum((0, 2)).clamp_min(1)


@torch.no_grad()
def attention_entropy(
    model: Any, tokenizer: Any, texts: list[str], max_tokens: int = 128
) -> list[list[float]]:
    """[layer][head] mean attention entropy on `texts` (eager attention, so the weights exist)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
        batch = batch.to(model.device)
        output = model(**batch, output_attentions=True)
        return [entropy_rows(layer, batch["attention_mask"]).tolist() for layer in output.attentions]
    finally:
        model.set_attn_implementation(previous)


def heatmap(entropy: list[list[float]], path: Path, title: str) -> Path:
    """The [layer][head] entropies as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.io import atomic_path

    layers, heads = len(entropy), len(entropy[0])
    figure, axes = plt.subplots(figsize=(1.5 + 0.45 * heads, 1.2 + 0.35 * layers))
    image = axes.imshow(entropy, cmap="viridis", aspect="auto", origin="lower")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(heads))
    axes.set_yticks(range(layers))
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="entropy (nats)")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return path


def flops_estimate(model: Any, context: int) -> int:
    """Forward FLOPs per token at `context` tokens: 2 per weight of every matrix product (the output
    projection counted also when tied to the embedding, the embedding lookup not), plus attention's
    2·layers·context·width."""
    config = model.config
    n = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    head = output.weight.numel() if output is not None else 0
    shared = output is not None and output.weight is model.get_input_embeddings().weight
    matmul = n - embedding + (head if shared else 0)
    return int(2 * matmul + 2 * config.num_hidden_layers * context * config.hidden_size)


@torch.no_grad()
def flops_measured(model: Any, ids: torch.Tensor) -> float:
    """FLOPs per token of one forward pass on `ids` [1, T], counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids)
    return counter.get_total_flops() / ids.shape[1]


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """{"peak_rise": bytes} over the block: CUDA's peak allocation, or the process's resident set sampled
    every millisecond on a CPU."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_rise"] = torch.cuda.max_memory_allocated(device) - start
        return
    import psutil

    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_rise"] = max(peak[0], process.memory_info().rss) - start


def measured_memory(model: Any, ids: torch.Tensor) -> dict[str, int]:
    """Bytes: the weights and buffers held, the peak rise of a forward on `ids`, and of one AdamW training step on a copy
    of the model (gradients, the optimizer's moments, activations)."""
    import copy

    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    buffers = sum(t.numel() * t.element_size() for t in model.buffers())  # e.g. rotary frequencies
    with torch.no_grad(), peak_memory(ids.device) as forward:
        model(input_ids=ids)
    trainable = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-5)
    with peak_memory(ids.device) as step:
        trainable(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    del trainable, optimizer
    return {
        "weights": weights,
        "buffers": buffers,
        "inference_peak_rise": forward["peak_rise"],
        "training_step_peak_rise": step["peak_rise"],
    }


def tokens_per_second(generate: Callable[[], int]) -> dict[str, float]:
    """Runs `generate` (returns the number of new tokens) and times it."""
    start = time.perf_counter()
    tokens = generate()
    seconds = time.perf_counter() - start
    return {
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else math.nan,
    }


def analyse(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    texts: list[str],
    *,
    max_new_tokens: int = 48,
    heatmap_path: Path | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Every measure of the module docstring for a transformers model: generations for `prompts` (greedy,
    chat template), attention and cost on `texts`."""
    from eval.accuracy import generate_answers
    from toolkit.models import memory_estimate

    model.eval()
    answers: list[str] = []
    answer_ids: list[list[int]] = []

    def generate() -> int:
        answers.extend(generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens))
        answer_ids.extend(tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers)
        return sum(map(len, answer_ids))

    speed = tokens_per_second(generate)
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in answer_ids]
    entropy = attention_entropy(model, tokenizer, texts)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    ids = tokenizer(texts[0], return_tensors="pt", truncation=True, max_length=min(context or 256, 256))
    ids = ids["input_ids"].to(model.device)
    estimate = memory_estimate(model.config)
    dtype = str(model.dtype).removeprefix("torch.")
    result = {
        "generations": generation_measures(tokens)
        | {"samples": answers[:3], "max_new_tokens": max_new_tokens},
        "speed": speed | {"decoding": "greedy, batch 32", "device": str(model.device)},
        "attention_entropy": {"per_layer_head": entropy, "texts": len(texts), "max_tokens": 128},
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": {
            "measured": flops_measured(model, ids),
            "measured_at_tokens": int(ids.shape[1]),
            "estimate_at_those_tokens": flops_estimate(model, int(ids.shape[1])),
            "estimate_at_context": flops_estimate(model, context),
            "context": context,
        },
        "memory": {
            "measured": measured_memory(model, ids) | {"tokens": int(ids.shape[1])},
            "estimate": {
                "inference": estimate["inference"].get(dtype, estimate["inference"]["float32"]),
                "training": estimate["training"]["fp32" if dtype == "float32" else "bf16-mixed"],
            },
            "dtype": dtype,
        },
    }
    if heatmap_path is not None:
        result["attention_entropy"]["heatmap"] = str(heatmap(entropy, heatmap_path, title))
    return result


def analysis_text(result: dict[str, Any]) -> str:
    """A short report of `analyse`'s result."""
    g, s, f = result["generations"], result["speed"], result["flops_per_token"]
    m = result["memory"]
    mib = 2**20
    lines = [
        f"parameters {result['parameters']:,}",
        f"generations (n {g['n']}): distinct-1 {g['distinct_1']:.3f}, distinct-2 {g['distinct_2']:.3f}, "
        f"seq-rep-4 {g['repetition_4']:.3f}, mean length {g['mean_length']:.1f} tokens",
        f"speed: {s['tokens_per_second']:.1f} tokens/s ({s['new_tokens']} tokens in {s['seconds']:.2f} s, {s['device']})",
        f"FLOPs/token: measured {f['measured']:.4g} at {f['measured_at_tokens']} tokens "
        f"(estimate {f['estimate_at_those_tokens']:.4g}); estimate at context {f['context']}: "
        f"{f['estimate_at_context']:.4g}",
        f"memory ({m['dtype']}): weights {m['measured']['weights'] / mib:.1f} MiB "
        f"(estimate {m['estimate']['inference']['weights'] / mib:.1f}), forward peak rise "
        f"{m['measured']['inference_peak_rise'] / mib:.1f} MiB, training step peak rise "
        f"{m['measured']['training_step_peak_rise'] / mib:.1f} MiB (estimate without activations "
        f"{m['estimate']['training']['total'] / mib:.1f})",
    ]
    entropy = result["attention_entropy"]
    means = [sum(row) / len(row) for row in entropy["per_layer_head"]]
    lines.append("attention entropy per layer (nats, mean of heads): " + ", ".join(f"{v:.2f}" for v in means))
    if entropy.get("heatmap"):
        lines.append(f"heat-map: {entropy['heatmap']}")
    return "\n".join(lines)
