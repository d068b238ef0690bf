"""`recipes/cognate.yaml` end to end, cut to a few steps, as a user runs it: three cognate specialisations through
the curriculum, the reasoning model as a Hub folder checked in a clean process, and the diversity report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eval.diversity import compare, relative_difference
from toolkit.errors import RecipeError
from toolkit.recipe import load

ROOT = Path(__file__).resolve().parents[2]
SPECIALISATIONS = ("reasoning", "memory", "speed")


def test_diversity_is_the_mean_relative_difference_of_each_pair():
    profiles = {
        "a": {"halting_steps": 1.0, "memory_use": 0.5, "tokens_per_second": 100.0},
        "b": {"halting_steps": 2.0, "memory_use": 0.5, "tokens_per_second": 25.0},
        "c": {"halting_steps": 4.0, "memory_use": 0.25, "tokens_per_second": 100.0},
    }
    verdict = compare(profiles, threshold=0.3)
    distances = {tuple(p["pair"]): p["distance"] for p in verdict["pairs"]}
    assert distances[("a", "b")] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert distances[("a", "c")] == pytest.approx((0.75 + 0.5 + 0) / 3)
    assert distances[("b", "c")] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    assert verdict["diverse"] is True  # every pair above 0.3
    assert compare(profiles, threshold=0.42)["diverse"] is False  # a / b and a / c are 0.417
    assert relative_difference(None, 1.0) is None and relative_difference(0.0, 0.0) == 0.0


def test_a_gguf_export_of_cognate_is_refused_before_anything_trains(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "cognate.yaml").read_text())
    recipe["stages"].append({"name": "gguf", "method": "export", "model": {"from": "speed-hard"}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as error:
        load(path)
    assert "stages.gguf.export.target: gguf: architecture 'cognate' cannot become a GGUF file" in str(
        error.value
    )


@pytest.mark.slow
@pytest.mark.integration_test
def test_the_recipe_end_to_end(tmp_path):
    from tests.tiny import head

    corpus = head("data/corpus/train.jsonl", 200, tmp_path / "corpus.jsonl")
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        f"stages.tokenizer.data.sources=[{corpus}]",
        "stages.tokenizer.tokenizer.vocab_size=400",
        "stages.diversity.diversity.limit=4",
        "stages.diversity.diversity.max_new_tokens=4",
    ]
    for name in SPECIALISATIONS:
        for stage, steps in (("foundation", 4), ("tasks", 2), ("hard", 2)):
            at = f"stages.{name}-{stage}.train"
            overrides += [f"{at}.max_steps={steps}", f"{at}.warmup_steps=1", f"{at}.logging_steps=1"]
        overrides.append(f"stages.{name}-hard.eval.limit=4")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "train", "recipes/cognate.yaml", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # Each specialisation is its own model, and the curriculum ran on top of it.
    for name in SPECIALISATIONS:
        config = json.loads((run / f"{name}-hard" / "final" / "config.json").read_text())
        assert config["model_type"] == "cognate"
        metrics = [
            json.loads(line)
            for line in (run / f"{name}-foundation" / "metrics.jsonl").read_text().splitlines()
        ]
        logged = [m for m in metrics if "loss" in m]
        assert logged and {"lm_loss", "halting_loss", "ponder_cost", "halting_steps"} <= set(logged[0])
        assert "tasks" in json.loads((run / f"{name}-hard" / "eval.json").read_text())
    reasoning = json.loads((run / "reasoning-hard" / "final" / "config.json").read_text())
    speed = json.loads((run / "speed-hard" / "final" / "config.json").read_text())
    assert (reasoning["h_cycles"], reasoning["supervision_steps"]) == (3, 3)
    assert (speed["h_cycles"], speed["l_cycles"], speed["supervision_steps"]) == (1, 1, 1)

    hub = json.loads((run / "hf" / "export_report.json").read_text())
    assert (
        hub["ok"] and hub["remote_code"] and hub["verification"]["model"]["measures"]["greedy_identical"] == 1
    )

    diversity = json.loads((run / "diversity" / "diversity.json").read_text())
    assert set(diversity["models"]) == {f"{name}-hard" for name in SPECIALISATIONS}
    for name, most in (("reasoning", 3), ("memory", 2), ("speed", 1)):
        profile = diversity["models"][f"{name}-hard"]
        assert 1 <= profile["halting_steps"] <= most and 0 < profile["memory_use"] < 1
        assert profile["tokens_per_second"] > 0
    assert diversity["models"]["speed-hard"]["halting_steps"] == 1
    # The memory specialisation's gates start on the memory side (memory_gate_bias -2); a few steps keep them there.
    assert (
        diversity["models"]["memory-hard"]["memory_use"]
        > diversity["models"]["speed-hard"]["memory_use"] + 0.2
    )
    assert len(diversity["pairs"]) == 3
    assert "| reasoning-hard / memory-hard |" in (run / "diversity" / "report.md").read_text()
    assert "diversity/report.md" in done.stdout and "hub: " in done.stdout
