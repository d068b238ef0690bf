"""Training throughput of 2-process DDP against one process at the same global batch, through the commands a
user runs: `toolkit train RECIPE` and `accelerate launch --config_file recipes/accelerate/ddp.yaml -m
toolkit.train RECIPE` (and `--multi_gpu --num_processes 2` without a config file), on the quickstart's
pretrain shape. Each run's steps/s comes from its trainer's own `train_runtime`; the ratio against one process
is the figure (goal >= 0.9x on 2 cores: the two ranks split the batch, gloo averages the gradients).

    python bench/ddp.py [--steps 40] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny recipes the tests build
from tests.tiny import pretrain_stage, tokenizer_stage, write_recipe  # noqa: E402

TOOLKIT = str(Path(sys.executable).parent / "toolkit")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def recipe(work: Path, name: str, steps: int, per_device: int, seq: int) -> Path:
    stage = pretrain_stage(
        str(ROOT / "data/corpus/train.jsonl"),
        max_steps=steps,
        per_device_train_batch_size=per_device,
        max_length=seq,
        logging_steps=steps,
        save_strategy="no",
    )
    stage["tokenizer"] = str(work / "tok" / "tok" / "final")
    return write_recipe(work / f"{name}.yaml", name, work / name, [stage])


def steps_per_second(command: list[str], steps: int) -> float:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    runtime = float(re.search(r"'train_runtime': '([0-9.]+)'", result.stdout + result.stderr).group(1))
    return steps / runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stages = [tokenizer_stage(str(ROOT / "data/corpus/train.jsonl"), vocab_size=2048)]
        write_recipe(work / "tok.yaml", "tok", work / "tok", stages)
        subprocess.run([TOOLKIT, "train", str(work / "tok.yaml")], check=True, capture_output=True, cwd=ROOT)
        single = recipe(work, "single", args.steps, args.batch, args.seq)
        double = recipe(work, "ddp", args.steps, args.batch // 2, args.seq)
        runs = {
            "1 process": [TOOLKIT, "train", str(single)],
            "2 processes, --config_file ddp.yaml": [
                *LAUNCH,
                "--config_file",
                str(ROOT / "recipes/accelerate/ddp.yaml"),
                "-m",
                "toolkit.train",
                str(double),
                "--overwrite",
            ],
            "2 processes, --multi_gpu": [
                *LAUNCH,
                "--multi_gpu",
                "--num_processes",
                "2",
                "-m",
                "toolkit.train",
                str(double),
                "--overwrite",
            ],
        }
        rates = {label: steps_per_second(command, args.steps) for label, command in runs.items()}
    base = rates["1 process"]
    print(f"decoder-tiny pretrain, global batch {args.batch} x {args.seq} tokens, {args.steps} steps")
    for label, rate in rates.items():
        print(f"  {label:38s} {rate:6.2f} steps/s  {rate / base:5.2f}x")
    print(json.dumps({label: round(rate, 3) for label, rate in rates.items()}))


if __name__ == "__main__":
    main()
