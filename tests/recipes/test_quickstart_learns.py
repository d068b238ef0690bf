"""The demo's recipe learns: `recipes/quickstart.yaml` itself, its tokenizer, pretraining and SFT stages with
their data and hyper-parameters, SFT cut to half its steps, must bring held-out answers within a floor.

Measured at this size (first 120 held-out rows), one thread: answer NLL 0.64, accuracy 0.042 (5 right) on an
AVX2 machine, where the pretrained model's validation perplexity is 108 as in the README's table; 0.53 and
0.15 on an earlier AVX-512 machine. With SFT at 3e-3 and the loss on every token (what the runner did while it
missed the template's `{%- generation %}` markers), the same run gave 0.76 and 0.008 (1 right): the floors sit
between. Halving pretraining too (200 steps, SFT 300) gives 0.89 and 0.008, so the steps stay the recipe's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit.recipe import read_yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

ROOT = Path(__file__).resolve().parents[2]
NLL_FLOOR = 0.70
ACCURACY_FLOOR = 0.025


def test_quickstart_pretrain_and_sft_learn_the_held_out_tasks(tmp_path):
    raw = read_yaml((ROOT / "recipes" / "quickstart.yaml").read_text())
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("tokenizer", "pretrain", "sft")]
    pretrain, sft = raw["stages"][1], raw["stages"][2]
    pretrain.pop("eval")
    sft["train"].update(
        max_steps=sft["train"]["max_steps"] // 2, warmup_steps=sft["train"]["warmup_steps"] // 2
    )
    sft["eval"] = {"tasks": "data/eval/heldout.jsonl", "limit": 120, "samples": 0}
    raw["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "quickstart-short.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "train", str(recipe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,  # about 30 minutes on one busy core
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tasks = json.loads((tmp_path / "run" / "sft" / "eval.json").read_text())["tasks"]
    assert tasks["n"] == 120
    assert tasks["answer_nll"] <= NLL_FLOOR, tasks
    assert tasks["accuracy"] >= ACCURACY_FLOOR, tasks
