"""`toolkit sweep`, as users run it: a 2-point grid of a tiny recipe, each point a run folder, a table and a
plot of the measure; `--resume` skips the finished points; a misspelt grid key fails before any point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import ROOT, TINY, head, pretrain_stage, tokenizer_stage, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TOOLKIT, "sweep", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_a_grid_runs_each_point_and_resume_skips_the_finished(tmp_path):
    corpus = head("data/corpus/train.jsonl", 80, tmp_path / "corpus.jsonl")
    stages = [tokenizer_stage(corpus), pretrain_stage(corpus, TINY, max_steps=3)]
    recipe = write_recipe(tmp_path / "grid.yaml", "grid", tmp_path / "unused", stages)
    out = tmp_path / "sweep"
    grid = "stages.pretrain.train.learning_rate=1e-4,3e-3"
    done = sweep(str(recipe), "--grid", grid, "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "sweep.json").read_text())
    assert [p["overrides"] for p in state["points"]] == [
        {"stages.pretrain.train.learning_rate": "1e-4"},
        {"stages.pretrain.train.learning_rate": "3e-3"},
    ]
    assert all(p["status"] == "done" and p["value"] > 0 for p in state["points"])
    low, high = (p["value"] for p in state["points"])
    assert high < low  # 3 steps at 3e-3 lower the loss more than at 1e-4
    for point in state["points"]:
        saved = (Path(point["run_dir"]) / "recipe.yaml").read_text()
        assert f"learning_rate: {float(point['overrides']['stages.pretrain.train.learning_rate'])}" in saved
    assert (out / "sweep.png").stat().st_size > 0
    assert "| run | learning_rate | loss | status |" in done.stdout.replace(
        "stages.pretrain.train.learning_rate", "learning_rate"
    )

    again = sweep(str(recipe), "--grid", grid, "--output-dir", str(out), "--resume")
    assert again.returncode == 0 and "sweep point" not in again.stdout
    refused = sweep(str(recipe), "--grid", grid, "--output-dir", str(out))
    assert refused.returncode == 2 and "--resume continues it" in refused.stderr


def test_a_misspelt_grid_key_fails_before_any_point(tmp_path):
    corpus = head("data/corpus/train.jsonl", 20, tmp_path / "corpus.jsonl")
    recipe = write_recipe(
        tmp_path / "g.yaml", "g", tmp_path / "u", [tokenizer_stage(corpus), pretrain_stage(corpus)]
    )
    done = sweep(
        str(recipe),
        "--grid",
        "stages.pretrain.train.learning_rat=1e-4,2e-4",
        "--output-dir",
        str(tmp_path / "s"),
    )
    assert done.returncode == 2 and "did you mean 'learning_rate'" in done.stderr
    assert not (tmp_path / "s").exists()
