"""The demo's recipe, `recipes/quickstart.yaml`, run whole with every stage cut to a few steps
(tests/recipes/test_quickstart_learns.py runs its training stages at size and checks that they learn)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

ROOT = Path(__file__).resolve().parents[2]


def test_the_whole_demo_recipe_ends_with_the_side_by_side_table(tmp_path):
    """Every stage of `recipes/quickstart.yaml`, cut to a few steps: the run ends with the evaluate stage's
    table (pretrain, sft, dpo in transformers; the q8_0 GGUF in llama.cpp), the win-rate below it, and the
    experiment log lists the run with those results."""
    from tests.tiny import head

    corpus = head("data/corpus/train.jsonl", 200, tmp_path / "corpus.jsonl")
    valid = head("data/corpus/valid.jsonl", 4, tmp_path / "valid.jsonl")
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"stages.tokenizer.data.sources=[{corpus}]",
        "stages.tokenizer.tokenizer.vocab_size=400",
        "stages.pretrain.train.max_steps=8",
        "stages.pretrain.train.warmup_steps=1",
        "stages.sft.train.max_steps=8",
        "stages.sft.train.warmup_steps=1",
        "stages.dpo.train.max_steps=4",
        "stages.evaluate.evaluate.limit=6",
        f"stages.evaluate.evaluate.perplexity={valid}",
        "stages.evaluate.evaluate.win_rate.limit=6",
        "stages.evaluate.evaluate.win_rate.max_new_tokens=8",
    ]
    for stage in ("pretrain", "sft", "dpo", "gguf"):
        overrides.append(f"stages.{stage}.eval.limit=4")
    overrides += [f"stages.{s}.eval.perplexity={valid}" for s in ("pretrain", "sft", "dpo")]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "train", "recipes/quickstart.yaml", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tail = done.stdout[done.stdout.index("Side by side (evaluate") :]
    table = [line for line in tail.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0].strip("| "): line for line in table}
    assert {"pretrain", "sft", "dpo", "gguf"} <= set(rows), tail
    assert "forge_heldout exact_match | forge_heldout_choice acc" in table[0] and "| perplexity |" in table[0]
    assert "| q8_0 |" in rows["gguf"] and "| float32 |" in rows["dpo"]
    assert (
        "win-rate of dpo against pretrain" in tail
        and "chat template on; limit 6; n forge_heldout 6 (test split)" in tail
    )

    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    dpo, gguf = results["dpo"], results["gguf"]
    assert gguf["kind"] == "gguf" and gguf["n"]["forge_heldout"] == 6
    # q8_0 moves perplexity a little, not a lot (the f32 bound of 0.1% is tests/eval/test_harness.py's).
    assert abs(gguf["perplexity"]["perplexity"] / dpo["perplexity"]["perplexity"] - 1) < 0.05
    winrate = json.loads((tmp_path / "run" / "evaluate" / "win-rate" / "winrate.json").read_text())
    assert winrate["n"] == 6 and winrate["model"]["src"] == "dpo"

    log = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "runs", str(tmp_path)], capture_output=True, text=True
    )
    line = next(row for row in log.stdout.splitlines() if row.startswith("| quickstart |"))
    assert "tokenizer → pretrain → sft → dpo → export → evaluate |" in line and "quickstart.yaml" in line
