"""Decode speed and training step time of `cognate` against a plain `decoder` of equal parameter count, and how
both scale with depth of computation: more refinement steps for cognate, more layers for the decoder.

    python bench/cognate.py [--preset cognate-tiny] [--steps 1,2,4] [--tokens 64] [--batch 8] [--length 128]

The decoder has cognate's width, heads and vocabulary and the number of layers that brings its parameter count
nearest to cognate's. Each cognate row runs `supervision_steps` = N (the block stack runs
N x h_cycles x (l_cycles + 1) times per token, with the same weights); the decoder row beside it stacks as many
distinct layers as cognate applies blocks per token (num_hidden_layers x N x h_cycles x (l_cycles + 1)), the
same compute per token with that many more parameters, and its base row is the equal-parameter decoder.
Printed: greedy decode tokens/s with the KV cache (one prompt of 16 tokens, `--tokens` new tokens, best of 3)
and one training step (forward + backward + AdamW at `--batch` x `--length`, best of 3), with the ratio of
cognate to the equal-parameter decoder. Random weights; figures to read, no assertions.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from toolkit.models import build_config, count_parameters, register_auto_classes


def best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def decode_rate(model: torch.nn.Module, tokens: int) -> float:
    prompt = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        seconds = best_of(lambda: model.generate(prompt, **kwargs))
    return tokens / seconds


def step_time(model: torch.nn.Module, batch: int, length: int) -> float:
    model.train()
    ids = torch.randint(
        1, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    seconds = best_of(step)
    model.eval()
    return seconds


def build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cognate-tiny")
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    register_auto_classes()

    base = build_config(args.preset)
    shape = dict(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        max_position_embeddings=base.max_position_embeddings,
    )
    target = count_parameters(base)
    layers = min(
        range(1, 64),
        key=lambda n: abs(
            count_parameters(build_config("decoder-tiny", **shape, num_hidden_layers=n)) - target
        ),
    )
    equal = build_config("decoder-tiny", **shape, num_hidden_layers=layers)
    reference = build(equal)
    ref_rate, ref_step = decode_rate(reference, args.tokens), step_time(reference, args.batch, args.length)
    print(
        f"{args.preset}: {target:,} parameters; decoder of equal size: {layers} layers, "
        f"{count_parameters(equal):,} parameters: {ref_rate:.1f} tok/s, {ref_step:.3f} s/step\n"
        f"torch threads: {torch.get_num_threads()}, decode {args.tokens} tokens, training step "
        f"{args.batch} x {args.length}\n"
    )
    header = (
        f"{'steps':>5} {'block runs':>10} {'cognate tok/s':>13} {'vs dec':>7} {'cognate s/step':>14} "
        f"{'vs dec':>7} {'deep dec layers':>15} {'tok/s':>7} {'s/step':>7}"
    )
    print(header)
    for steps in (int(s) for s in args.steps.split(",")):
        config = build_config(args.preset, supervision_steps=steps)
        runs = config.cache_layers  # block applications per token
        model = build(config)
        rate, step = decode_rate(model, args.tokens), step_time(model, args.batch, args.length)
        deep = build(build_config("decoder-tiny", **shape, num_hidden_layers=runs))
        deep_rate, deep_step = decode_rate(deep, args.tokens), step_time(deep, args.batch, args.length)
        print(
            f"{steps:>5} {runs:>10} {rate:>13.1f} {rate / ref_rate:>6.2f}x {step:>14.3f} {step / ref_step:>6.2f}x "
            f"{runs:>15} {deep_rate:>7.1f} {deep_step:>7.3f}"
        )


if __name__ == "__main__":
    main()
