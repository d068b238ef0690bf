"""`accelerate launch -m toolkit.train` runs the same recipe on several processes (DDP over gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]


def test_two_process_ddp_run_matches_layout_and_writes_once(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(Path("data/corpus/train.jsonl").read_text().splitlines()[:100]) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(Path("data/sft/train.jsonl").read_text().splitlines()[:64]) + "\n")
    tiny = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 2}
    recipe = {
        "name": "ddp",
        "output_dir": str(tmp_path / "run"),
        "stages": [
            {
                "name": "tok",
                "method": "tokenizer",
                "data": {"sources": [str(corpus)]},
                "tokenizer": {"vocab_size": 300},
            },
            {
                "name": "pretrain",
                "method": "pretrain",
                "model": {"preset": "decoder-tiny", "config": tiny},
                "data": {"sources": [str(corpus)]},
                "train": {
                    "max_steps": 4,
                    "per_device_train_batch_size": 2,
                    "max_length": 32,
                    "logging_steps": 1,
                },
            },
            {
                "name": "sft",
                "method": "sft",
                "data": {"sources": [str(sft)]},
                "train": {
                    "max_steps": 3,
                    "per_device_train_batch_size": 2,
                    "max_length": 48,
                    "logging_steps": 1,
                },
            },
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    result = subprocess.run(
        [*launch, "-m", "toolkit.train", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    env = json.loads((run / "env.json").read_text())
    assert env["num_processes"] == 2
    for stage in ("pretrain", "sft"):
        assert (run / stage / "final" / "model.safetensors").exists()
        records = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps and len(steps) == len(set(steps)), "metrics written by more than one rank"
    assert result.stdout.count("Run ") == 1  # the summary comes from the main process only
