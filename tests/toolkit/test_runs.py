"""`toolkit runs` (the experiment log) and `toolkit runs compare`, run as a user runs them, on run folders as
the runner leaves them (tests/export/vllm_helpers.make_run) with a saved lm-eval result and win-rate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.export.vllm_helpers import make_run

BIN = Path(sys.executable).parent


def toolkit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "toolkit"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/tiny and runs/tiny-lr: the second with another learning rate, better accuracy and an lm-eval
    result and a win-rate saved by `toolkit eval`."""
    root = tmp_path_factory.mktemp("log") / "runs"
    first = make_run(root)
    second = root / "tiny-lr"
    shutil.copytree(first, second)
    recipe = yaml.safe_load((second / "recipe.yaml").read_text())
    recipe["name"] = "tiny-lr"
    recipe["stages"][1]["train"]["learning_rate"] = 2.0e-4
    (second / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    evaluation = json.loads((second / "sft" / "eval.json").read_text())
    evaluation["tasks"]["accuracy"] = 0.5
    (second / "sft" / "eval.json").write_text(json.dumps(evaluation))
    (second / "sft" / "stage.json").write_text(json.dumps({"method": "sft", "seconds": 90.0}))
    saved = second / "eval" / "20261202-120000"
    saved.mkdir(parents=True)
    lm_eval = {"results": {"forge_heldout": {"exact_match,none": 0.125, "exact_match_stderr,none": 0.05}}}
    (saved / "results.json").write_text(json.dumps(lm_eval))
    (saved / "winrate.json").write_text(json.dumps({"win_rate": 0.625, "base": {"src": "runs/tiny"}}))
    return root


def test_runs_lists_every_run_as_a_table(runs):
    done = toolkit(runs.parent, "runs")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| run | recipe | stages | data | steps | wall | loss | final | eval |")
    tiny = next(line for line in lines if line.startswith("| tiny |"))
    other = next(line for line in lines if line.startswith("| tiny-lr |"))
    # make_run: the sft stage is done-less (no stage.json): 0 of 2 stages done; 3 steps; last loss 4.25.
    assert "tokenizer → sft (0/2 done)" in tiny and "| 3 |" in tiny and "| 4.25 |" in tiny
    assert "accuracy 0.25, perplexity 123.5" in tiny and "train.jsonl, my-org/chat-data" in tiny
    assert "(1/2 done)" in other and "1.5 min" in other
    assert "forge_heldout/exact_match 0.125" in other and "win-rate vs runs/tiny 0.625" in other

    as_json = json.loads(toolkit(runs.parent, "runs", str(runs), "--json").stdout)
    assert [row["name"] for row in as_json] == ["tiny", "tiny-lr"]
    assert as_json[1]["per_stage"]["sft"]["accuracy"] == 0.5


def test_compare_diffs_recipes_and_results(runs):
    done = toolkit(runs.parent, "runs", "compare", str(runs / "tiny"), str(runs / "tiny-lr"))
    assert done.returncode == 0, done.stderr
    assert "| stages.sft.train.learning_rate | 0.001 | 0.0002 |" in done.stdout
    assert "| sft/accuracy | 0.25 | 0.5 | 0.25 |" in done.stdout
    assert "| eval/win-rate vs runs/tiny | - | 0.625 |  |" in done.stdout
    assert "name" not in [line.split(" | ")[0].strip("| ") for line in done.stdout.splitlines()]

    diff = json.loads(toolkit(runs.parent, "runs", "compare", "runs/tiny", "runs/tiny-lr", "--json").stdout)
    assert diff["recipe"] == {"stages.sft.train.learning_rate": [0.001, 0.0002]}


def test_not_a_run_folder_is_a_clear_error(runs, tmp_path):
    done = toolkit(tmp_path, "runs", "compare", str(runs / "tiny"), str(tmp_path))
    assert done.returncode == 2 and f"{tmp_path} is not a run folder (no recipe.yaml)" in done.stderr
    empty = toolkit(tmp_path, "runs")
    assert empty.returncode == 2 and "no run folders" in empty.stderr
