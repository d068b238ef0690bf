"""Per-step training time of `decoder` against transformers' native `LlamaForCausalLM` of the same shape.

Both run under the same `Trainer` on the same batches, interleaved (ours, theirs, ours, ...) so that machine
noise hits both; the ratio ours/theirs is the figure (goal <= 1.0).

    python bench/train_step.py [--preset decoder-tiny] [--steps 30] [--rounds 3] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from toolkit.models import build_config
from toolkit.models.decoder import DecoderForCausalLM


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step after the first few (warm-up excluded)."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def step_time(model: torch.nn.Module, data: Dataset, steps: int, batch: int) -> float:
    timer = StepTimer()
    args = TrainingArguments(
        output_dir="/tmp/bench-train-step",
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[timer]).train()
    return statistics.median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="decoder-tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = build_config(args.preset)
    ours = DecoderForCausalLM(config)
    llama_config = LlamaConfig(
        **{k: v for k, v in config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    )
    theirs = LlamaForCausalLM(llama_config)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(0, config.vocab_size, (args.batch * (args.steps + 1), args.seq))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    ours_times, theirs_times = [], []
    for _ in range(args.rounds):
        ours_times.append(step_time(ours, data, args.steps, args.batch))
        theirs_times.append(step_time(theirs, data, args.steps, args.batch))
    a, b = statistics.median(ours_times), statistics.median(theirs_times)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    print(f"preset {args.preset}, batch {args.batch} x {args.seq} tokens, {device}")
    print(f"{'model':<28}{'s/step (median)':>18}")
    print(f"{'decoder (forge-toolkit)':<28}{a:>18.4f}")
    print(f"{'LlamaForCausalLM (native)':<28}{b:>18.4f}")
    print(f"ratio decoder/native: {a / b:.3f}  (goal <= 1.0)")


if __name__ == "__main__":
    main()
