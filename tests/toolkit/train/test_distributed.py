"""`accelerate launch -m toolkit.train` runs the same recipe on several processes (DDP over gloo on CPU)."""

import json
import os
import subprocess
import sys

import pytest

from tests.tiny import TINY, head, pretrain_stage, tokenizer_stage, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]


def test_two_process_ddp_run_matches_layout_and_writes_once(tmp_path):
    corpus = head("data/corpus/train.jsonl", 100, tmp_path / "corpus.jsonl")
    sft = head("data/sft/train.jsonl", 64, tmp_path / "sft.jsonl")
    one_layer = {**TINY, "num_hidden_layers": 1}
    stages = [
        tokenizer_stage(corpus),
        pretrain_stage(corpus, one_layer),
        {
            "name": "sft",
            "method": "sft",
            "data": {"sources": [sft]},
            "train": {"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 48, "logging_steps": 1},
        },
    ]
    path = write_recipe(tmp_path / "recipe.yaml", "ddp", tmp_path / "run", stages)
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
