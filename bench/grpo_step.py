"""Seconds per GRPO step of `decoder` against transformers' native `LlamaForCausalLM` with the same weights.

Both run under the same TRL `GRPOTrainer` (same config, prompts, reward functions and seed), interleaved
(ours, theirs, theirs, ours, ...) so that machine noise hits both. The learning rate is 0, so the two models
keep identical weights and sample the same completions: the steps do the same work. Prints the median
seconds per step of each, the ratio ours/theirs (goal <= 1.0), and the share of a step spent generating
(rollouts through `generate`, as on a CPU without vLLM).

    python bench/grpo_step.py [--preset decoder-tiny] [--steps 8] [--rounds 3] [--batch 8] [--generations 4]
                              [--completion 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer

from toolkit.data.tokenizer import train_tokenizer
from toolkit.models import build_config
from toolkit.models.decoder import DecoderForCausalLM
from toolkit.train.rewards import exact_answer, length

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(TrainerCallback):
    """Wall time of each step after the first (warm-up excluded), and the time `generate` took within it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.steps: list[float] = []
        self.generating: list[float] = []
        self._start = self._generating = 0.0
        generate = model.generate

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self._generating += time.perf_counter() - start

        model.generate = timed_generate

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._generating = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 1:
            self.steps.append(time.perf_counter() - self._start)
            self.generating.append(self._generating)


def grpo_steps(model, tokenizer, data, args: argparse.Namespace, out: str) -> StepTimer:
    timer = StepTimer(model)
    config = GRPOConfig(
        output_dir=out,
        max_steps=args.steps + 1,
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.completion,
        learning_rate=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=0,
    )
    set_seed(0)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact_answer, length],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="decoder-tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-grpo-")
    tokenizer = train_tokenizer(
        [str(ROOT / "data/corpus/train.jsonl")], out_dir=f"{work}/tokenizer", vocab_size=2048
    )
    config = build_config(args.preset, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    ours = DecoderForCausalLM(config)
    llama_config = LlamaConfig(
        **{k: v for k, v in config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    )
    theirs = LlamaForCausalLM(llama_config)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for model in (ours, theirs):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    data = load_dataset("json", data_files=str(ROOT / "data/rl/prompts.jsonl"), split="train")
    data = data.select(range(args.batch * (args.steps + 1)))

    timers: dict[str, list[StepTimer]] = {"ours": [], "theirs": []}
    for round_ in range(args.rounds):
        order = [("ours", ours), ("theirs", theirs)]
        for name, model in order if round_ % 2 == 0 else order[::-1]:
            timers[name].append(grpo_steps(model, tokenizer, data, args, f"{work}/{name}"))

    def median(name: str, what: str) -> float:
        return statistics.median(x for t in timers[name] for x in getattr(t, what))

    ours_s, theirs_s = median("ours", "steps"), median("theirs", "steps")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    print(
        f"preset {args.preset}, {args.batch} completions per step ({args.generations} per prompt), "
        f"up to {args.completion} new tokens, {device}, generation through transformers"
    )
    print(f"{'model':<28}{'s/step (median)':>18}{'generating':>14}")
    for label, name, seconds in (
        ("decoder (forge-toolkit)", "ours", ours_s),
        ("LlamaForCausalLM (native)", "theirs", theirs_s),
    ):
        share = median(name, "generating") / seconds
        print(f"{label:<28}{seconds:>18.4f}{share:>13.0%}")
    print(f"ratio decoder/native: {ours_s / theirs_s:.3f}  (goal <= 1.0)")


if __name__ == "__main__":
    main()
