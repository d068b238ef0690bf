"""Resume is exact: a run killed with SIGKILL (between checkpoints, or while one is being written) and
continued with `toolkit train --resume` ends with weights bit-identical to a run that was never interrupted.

Every run here is a fresh `toolkit` process. The kills come from a small harness that runs the same CLI with
one transformers function wrapped to SIGKILL its own process at a given step: after that step's optimizer
update (between saves; for GRPO, after a step's rollouts and update), or inside `_save_rng_state`, after the checkpoint's weights and optimizer are on disk
but before its RNG state and `trainer_state.json` (a checkpoint half written).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

ROOT = Path(__file__).resolve().parents[3]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")
HARNESS = """
import os, signal, sys
import transformers
from transformers.trainer_callback import CallbackHandler

mode, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if mode == "step":
    end = CallbackHandler.on_step_end
    def on_step_end(self, args, state, control):
        result = end(self, args, state, control)
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    CallbackHandler.on_step_end = on_step_end
else:
    save = transformers.Trainer._save_rng_state
    def _save_rng_state(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, output_dir)
    transformers.Trainer._save_rng_state = _save_rng_state
from toolkit.cli import main
sys.exit(main(argv))
"""

STAGES = ["pretrain", "sft", "grpo"]  # the trained stages of the recipe, in order
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def head(path: str, n: int, out: Path) -> str:
    out.write_text("\n".join((ROOT / path).read_text().splitlines()[:n]) + "\n")
    return str(out)


def recipe(tmp: Path) -> Path:
    corpus = head("data/corpus/train.jsonl", 200, tmp / "corpus.jsonl")
    train = {"per_device_train_batch_size": 4, "max_length": 32, "learning_rate": 3e-3, "logging_steps": 1}
    raw = {
        "name": "resume",
        "seed": 3,
        "stages": [
            {
                "name": "tok",
                "method": "tokenizer",
                "data": {"sources": [corpus]},
                "tokenizer": {"vocab_size": 300},
            },
            {
                "name": "pretrain",
                "method": "pretrain",
                "model": {"preset": "decoder-tiny", "config": {**TINY, "attention_dropout": 0.1}},
                "data": {"sources": [corpus]},
                "train": {**train, "max_steps": 24, "save_steps": 8, "save_total_limit": 2},
            },
            {
                "name": "sft",
                "method": "sft",
                "data": {"sources": [head("data/sft/train.jsonl", 200, tmp / "sft.jsonl")]},
                "train": {**train, "max_steps": 16, "save_steps": 8, "save_total_limit": 2},
            },
            {
                "name": "grpo",
                "method": "grpo",
                "data": {"sources": [head("data/rl/prompts.jsonl", 48, tmp / "rl.jsonl")]},
                "rewards": [{"builtin": "exact_answer"}, {"builtin": "length", "weight": 0.5}],
                "train": {
                    "per_device_train_batch_size": 4,
                    "logging_steps": 1,
                    "learning_rate": 1e-3,
                    "num_generations": 4,
                    "max_completion_length": 8,
                    "max_steps": 6,
                    "save_steps": 3,
                },
            },
        ],
    }
    path = tmp / "resume.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train(
    recipe_path: Path, out: Path, *extra: str, kill: tuple[str, int] | None = None
) -> subprocess.CompletedProcess:
    """`toolkit train RECIPE --output-dir OUT ...` in a fresh process; with `kill`, through the harness."""
    argv = ["train", str(recipe_path), "--output-dir", str(out), *extra]
    command = [sys.executable, "-c", HARNESS, kill[0], str(kill[1]), *argv] if kill else [TOOLKIT, *argv]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def weights(run: Path, stage: str) -> dict:
    return load_file(run / stage / "final" / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:3]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("reference")
    path = recipe(tmp)
    result = train(path, tmp / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return path, tmp / "run"


@pytest.mark.parametrize(
    ("kill", "stage"),
    [
        (("step", 12), "pretrain"),
        (("save", 16), "pretrain"),
        (("step", 4), "sft"),
        (("save", 8), "sft"),
        (("step", 4), "grpo"),
    ],
    ids=[
        "pretrain-between-saves",
        "pretrain-while-saving",
        "sft-between-saves",
        "sft-while-saving",
        "grpo-between-saves",
    ],
)
def test_killed_run_resumes_to_identical_weights(reference, tmp_path, kill, stage):
    recipe_path, reference_run = reference
    run = tmp_path / "run"
    later = STAGES[STAGES.index(stage) :]
    if stage != "pretrain":  # the stages before it done, as finished earlier stages would be
        shutil.copytree(reference_run, run)
        for name in later:
            shutil.rmtree(run / name)
        (run / stage).mkdir()
    killed = train(recipe_path, run, *(["--resume"] if stage != "pretrain" else []), kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / stage / "final").exists()
    resumed = train(recipe_path, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    if kill[0] == "save":  # the half-written checkpoint is named, removed, and the one before it taken
        assert f"checkpoint-{kill[1]} is incomplete" in resumed.stdout
        checkpoints = run / stage / "checkpoints"
        if kill[1] > 8:
            assert f"resuming from {checkpoints / f'checkpoint-{kill[1] - 8}'}" in resumed.stdout
        else:  # it was the first one: the stage starts again
            assert f"no complete checkpoint in {checkpoints}: the stage starts again" in resumed.stdout
    for name in STAGES:
        assert_identical(weights(run, name), weights(reference_run, name))
    logged = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == sorted(set(steps)), steps  # each step once, though some ran twice


def test_resume_with_a_changed_recipe_is_refused_unless_accepted(reference, tmp_path):
    recipe_path, reference_run = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "sft")
    shutil.rmtree(run / "grpo")
    raw = yaml.safe_load(recipe_path.read_text())
    raw["stages"][2]["train"]["max_steps"] = 10
    raw["stages"][2]["train"]["learning_rate"] = 1e-3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = train(changed, run, "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "changed: stages.sft.train.learning_rate, stages.sft.train.max_steps" in refused.stderr
    partly = train(changed, run, "--resume", "--resume-changed", "stages.sft.train.max_steps")
    assert partly.returncode == 2 and "changed: stages.sft.train.learning_rate." in partly.stderr
    accepted = train(changed, run, "--resume", "--resume-changed", "stages.sft.train")
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    history = yaml.safe_load((run / "resume.json").read_text())
    assert history[-1]["accepted"] == ["stages.sft.train.learning_rate", "stages.sft.train.max_steps"]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["stages"][2]["train"]["max_steps"] == 10
