"""`recipes/lattice.yaml` end to end, cut to a few steps, as a user runs it: a teacher, the lattice distilled
from its embeddings (measured on held-out pairs, loss parts logged), the Hub folder checked in a clean process;
and a second run that reads the teacher's embeddings from the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.errors import RecipeError
from toolkit.recipe import load

ROOT = Path(__file__).resolve().parents[2]


def test_a_teacher_that_is_not_an_earlier_model_stage_is_refused(tmp_path):
    with pytest.raises(
        RecipeError,
        match=r"stages.lattice.distill.teacher.from: stage 'tokenizer' \(tokenizer\) makes no model",
    ):
        load(ROOT / "recipes/lattice.yaml", overrides=["stages.lattice.distill.teacher={from: tokenizer}"])
    with pytest.raises(
        RecipeError, match=r"stages.lattice.distill: pooling: one of mean, last, hierarchical"
    ):
        load(ROOT / "recipes/lattice.yaml", overrides=["stages.lattice.distill.pooling=max"])


@pytest.mark.slow
def test_the_recipe_end_to_end(tmp_path):
    from tests.tiny import head

    corpus = head("data/corpus/train.jsonl", 200, tmp_path / "corpus.jsonl")

    def train(run: Path, *more: str) -> subprocess.CompletedProcess:
        overrides = [
            f"output_dir={run}",
            f"stages.tokenizer.data.sources=[{corpus}]",
            "stages.tokenizer.tokenizer.vocab_size=400",
            f"stages.teacher.data.sources=[{corpus}]",
            "stages.teacher.train.max_steps=5",
            "stages.lattice.train.max_steps=12",
            "stages.lattice.train.logging_steps=4",
            "stages.lattice.distill.eval_every=4",
            "stages.lattice.distill.limit=64",
            "stages.lattice.distill.heldout_limit=20",
            f"stages.lattice.distill.cache_dir={tmp_path / 'embeddings'}",
            "stages.lattice.model.config.dialogue_weight=0.5",  # the loss weights are the recipe's
            *more,
        ]
        return subprocess.run(
            [str(Path(sys.executable).parent / "toolkit"), "train", "recipes/lattice.yaml", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
        )

    done = train(tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "teacher embeddings: computed" in done.stdout
    run = tmp_path / "run"
    evaluation = json.loads((run / "lattice" / "eval.json").read_text())
    assert evaluation["heldout_pairs"] == 20 and evaluation["chance_retrieval"] == 0.05
    assert {"heldout_cosine", "heldout_retrieval"} <= set(evaluation["after"]) and evaluation[
        "pooling"
    ] == "hierarchical"
    logged = [json.loads(line) for line in (run / "lattice" / "metrics.jsonl").read_text().splitlines()]
    parts = {
        "reconstruction_loss",
        "consistency_loss",
        "dialogue_loss",
        "heldout_cosine",
        "heldout_retrieval",
    }
    assert [m["step"] for m in logged if parts <= set(m)] == [4, 8, 12]
    assert (run / "lattice" / "plots" / "heldout_retrieval.png").exists()
    config = json.loads((run / "lattice" / "final" / "config.json").read_text())
    assert config["model_type"] == "lattice" and config["teacher"].endswith("teacher/final")
    assert (config["dialogue_weight"], config["reconstruction_weight"]) == (0.5, 0.3)
    hub = json.loads((run / "hf" / "export_report.json").read_text())
    assert hub["ok"] and hub["verification"]["model"]["measures"]["max_abs_output_delta"] == 0

    # Another run distilling from the same teacher files reads the embeddings back and runs no teacher.
    again = train(tmp_path / "again", f"stages.lattice.distill.teacher={{path: {run / 'teacher' / 'final'}}}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher embeddings: read from the cache" in again.stdout
    assert json.loads((tmp_path / "again" / "lattice" / "eval.json").read_text())["embeddings_cached"] is True
