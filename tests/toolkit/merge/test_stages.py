"""The `merge` and `evolve` recipe stages, run by `toolkit train` in a fresh process: two specialists
fine-tuned from one pretrained model, merged with TIES and evolved; stage names stand for their `final/`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import TINY, head, pretrain_stage, tokenizer_stage, write_recipe

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[3]


def specialist(name: str, task: str, sft: Path) -> dict:
    return {
        "name": name,
        "method": "sft",
        "model": {"from": "pretrain"},
        "data": {"sources": [{"path": str(sft), "where": {"task": task}}]},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 64, "learning_rate": 3e-3},
    }


MERGE = {
    "name": "merged",
    "method": "merge",
    "merge": {
        "merge_method": "ties",
        "base_model": "pretrain",
        "models": [
            {"model": "add", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "cp", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "dtype": "float32",
    },
}


def stages(tmp: Path) -> list[dict]:
    corpus = head("data/corpus/train.jsonl", 200, tmp / "corpus.jsonl")
    sft = head("data/sft/train.jsonl", 120, tmp / "sft.jsonl")
    tasks = str(ROOT / "data/eval/heldout.jsonl")
    return [
        tokenizer_stage(corpus),
        pretrain_stage(corpus, TINY, max_steps=4),
        specialist("add", "addition", Path(sft)),
        specialist("cp", "copy", Path(sft)),
        {**MERGE, "eval": {"tasks": tasks, "limit": 4, "max_new_tokens": 4}},
        {
            "name": "evolve",
            "method": "evolve",
            "evolve": {
                "models": ["add", "cp"],
                "base_model": "pretrain",
                "generations": 1,
                "population": 2,
                "elite": 1,
                "fitness": {
                    "tasks": tasks,
                    "families": ["addition", "copy"],
                    "limit": 2,
                    "max_new_tokens": 4,
                },
            },
        },
        {"name": "gguf", "method": "export", "model": {"from": "evolve"}, "export": {"quant": "f32"}},
    ]


@pytest.mark.slow
@pytest.mark.integration_test
def test_merge_and_evolve_stages_take_earlier_stages(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "merging", tmp_path / "run", stages(tmp_path))
    done = subprocess.run(
        [str(BIN / "toolkit"), "train", str(recipe)], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "merged" / "final" / "merge_report.json").read_text())
    assert {i["path"] for i in report["inputs"]} == {
        str(run / s / "final") for s in ("pretrain", "add", "cp")
    }
    assert report["config"]["base_model"] == "pretrain"  # as written in the recipe
    assert json.loads((run / "merged" / "eval.json").read_text())["tasks"]["n"] == 4
    state = json.loads((run / "evolve" / "evolve.json").read_text())
    assert state["champion"]["folder"] == str(run / "evolve" / "final")
    assert (run / "evolve" / "final" / "merge.yaml").exists() and (
        run / "evolve" / "plots" / "fitness.png"
    ).exists()
    gguf = json.loads((run / "gguf" / "merging-f32.gguf.report.json").read_text())
    assert gguf["ok"] is True


def test_a_merge_naming_a_later_or_unknown_stage_is_refused_before_any_stage_runs(tmp_path):
    later = {**MERGE, "merge": {**MERGE["merge"], "models": [{"model": "add"}, {"model": "cpp"}]}}
    evolve = {
        "name": "evolve",
        "method": "evolve",
        "evolve": {
            "models": ["add", "later"],
            "base_model": "pretrain",
            "fitness": {"tasks": "nowhere.jsonl"},
        },
    }
    plan = stages(tmp_path)[:3] + [later, evolve, {**MERGE, "name": "later"}]
    recipe = write_recipe(tmp_path / "r.yaml", "merging", tmp_path / "run", plan)
    done = subprocess.run(
        [str(BIN / "toolkit"), "train", str(recipe)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert "stages.merged.merge.models[1].model: 'cpp' is no earlier stage" in done.stderr
    assert "stages.evolve.evolve.models: stage 'later' runs later" in done.stderr
    assert "stages.evolve.evolve.fitness.tasks: nowhere.jsonl: no such file" in done.stderr
    bad_method = {**MERGE, "merge": {**MERGE["merge"], "merge_method": "tiess"}}
    recipe.write_text(
        yaml.safe_dump({"name": "m", "output_dir": str(tmp_path / "run"), "stages": plan[:3] + [bad_method]})
    )
    done = subprocess.run(
        [str(BIN / "toolkit"), "train", str(recipe)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "unknown method 'tiess' (did you mean 'ties'?)" in done.stderr
