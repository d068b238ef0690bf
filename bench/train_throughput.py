"""SFT throughput on one model: packing against none, LoRA against full fine-tuning, QLoRA against LoRA.

    python bench/train_throughput.py [--steps 30] [--batch 16] [--seq 128] [--preset decoder-tiny]

Each variant is one `toolkit train` of an SFT stage on data/sft/train.jsonl from the same saved model (a
preset with random weights and a tokenizer trained on the shipped corpus), in its own process. Figures come
from the trainers' own logs: TRL's `num_tokens` (tokens that are not padding), transformers'
`num_input_tokens_seen` with "all" (every token of every batch, padding included) and `train_runtime`.
Tokens/s counts real tokens only; the padding share is 1 - num_tokens / num_input_tokens_seen (goal for
packing: real tokens >= 97%). Ratios are printed against the variant each is compared with. No assertions:
timings on a shared machine are figures to read, not tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")

VARIANTS = {
    "full, padded": {},
    "full, packed": {"train": {"packing": True}},
    "LoRA r16, padded": {"peft": {"method": "lora", "r": 16, "lora_alpha": 32}},
    "QLoRA r16 (nf4), padded": {
        "peft": {"method": "lora", "r": 16, "lora_alpha": 32},
        "model": {"quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
    },
}
COMPARED = {
    "full, packed": "full, padded",
    "LoRA r16, padded": "full, padded",
    "QLoRA r16 (nf4), padded": "LoRA r16, padded",
}


def base_model(work: Path, preset: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.data.tokenizer import train_tokenizer
    from toolkit.models import build_config, register_auto_classes

    register_auto_classes()
    folder = work / "base"
    tokenizer = train_tokenizer([str(ROOT / "data/corpus/valid.jsonl")], 2048, folder)
    torch.manual_seed(0)
    config = build_config(
        preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def run(work: Path, name: str, variant: dict, base: Path, args: argparse.Namespace) -> dict:
    train = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "max_length": args.seq,
        "learning_rate": 1e-4,
        "logging_steps": args.steps,
        "save_strategy": "no",
        "include_num_input_tokens_seen": "all",
        **variant.get("train", {}),
    }
    stage = {
        "name": "sft",
        "method": "sft",
        "model": {"path": str(base), **variant.get("model", {})},
        "data": {"sources": [str(ROOT / "data/sft/train.jsonl")]},
        "train": train,
        **({"peft": variant["peft"]} if "peft" in variant else {}),
    }
    slug = "".join(c if c.isalnum() else "-" for c in name)
    recipe = work / f"{slug}.yaml"
    recipe.write_text(yaml.safe_dump({"name": slug, "output_dir": str(work / slug), "stages": [stage]}))
    done = subprocess.run([TOOLKIT, "train", str(recipe)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / slug / "sft" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in reversed(records) if "num_input_tokens_seen" in r and "num_tokens" in r)
    runtime = next(r["train_runtime"] for r in records if "train_runtime" in r)
    return {
        "tokens_per_s": logged["num_tokens"] / runtime,
        "real_share": logged["num_tokens"] / logged["num_input_tokens_seen"],
        "runtime": runtime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--preset", default="decoder-tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_model(work, args.preset)
        results = {name: run(work, name, variant, base, args) for name, variant in VARIANTS.items()}
    print(f"{args.preset}, {args.steps} steps of {args.batch} x {args.seq}")
    print(f"{'variant':<26} {'tokens/s':>10} {'real tokens':>12} {'seconds':>8}  ratio")
    for name, result in results.items():
        against = COMPARED.get(name)
        ratio = (
            f"{result['tokens_per_s'] / results[against]['tokens_per_s']:.2f}x {against}" if against else ""
        )
        print(
            f"{name:<26} {result['tokens_per_s']:>10.0f} {result['real_share']:>11.1%} {result['runtime']:>8.1f}  {ratio}"
        )


if __name__ == "__main__":
    main()
