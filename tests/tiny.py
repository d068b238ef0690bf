"""Tiny recipes the training tests (and bench/ddp.py) build: a tokenizer stage trained on a slice of the shipped
corpus and a decoder-tiny pretrain stage, written as a recipe file that `toolkit train` or `accelerate launch`
runs in a subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# A decoder-tiny cut down further: the distributed tests start several processes on 2 cores.
TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}


def head(path: str | Path, n: int, out: Path) -> str:
    """The first `n` lines of `path` (relative to the repository) written to `out`; returns `out`."""
    lines = (ROOT / path).read_text().splitlines()[:n]
    out.write_text("\n".join(lines) + "\n")
    return str(out)


def tokenizer_stage(corpus: str, vocab_size: int = 300) -> dict[str, Any]:
    return {
        "name": "tok",
        "method": "tokenizer",
        "data": {"sources": [corpus]},
        "tokenizer": {"vocab_size": vocab_size},
    }


def pretrain_stage(corpus: str, config: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    """decoder-tiny (with `config` overrides) pretrained on `corpus`; `train` keys over a few-step default."""
    model: dict[str, Any] = {"preset": "decoder-tiny"}
    if config:
        model["config"] = config
    defaults = {"max_steps": 4, "per_device_train_batch_size": 2, "max_length": 32, "logging_steps": 1}
    return {
        "name": "pretrain",
        "method": "pretrain",
        "model": model,
        "data": {"sources": [corpus]},
        "train": {**defaults, **train},
    }


def write_recipe(path: Path, name: str, output_dir: Path, stages: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(output_dir), "stages": stages}))
    return path


def sft_stage(**sections: Any) -> Any:
    """One parsed SFT stage of a Hub-model recipe with `sections` (peft=..., train=...): what the unit tests
    of a stage's sections check, without training."""
    from toolkit import recipe as recipes

    raw = {
        "name": "sft",
        "method": "sft",
        "model": {"path": "m"},
        "data": {"sources": ["x.jsonl"]},
        **sections,
    }
    return recipes.parse({"name": "r", "stages": [raw]}).stages[0]
