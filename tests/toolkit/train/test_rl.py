"""Online RL stages (GRPO, RLOO) through the stage registry: TRL's trainers with reward functions named in the
recipe, checked before anything trains; the reward rises, the per-step measures are plotted, and the
held-out accuracy is measured before and after. Every run is the `toolkit` command in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.export.conftest import save_preset_model

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

ROOT = Path(__file__).resolve().parents[3]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")
REWARDS = '''
def short(completions, **kwargs):
    """1 for an empty answer, 0 from 32 characters on: a reward a tiny model can raise in a few steps."""
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 - min(len(t), 32) / 32 for t in text]


def no_kwargs(completions):
    return [0.0 for _ in completions]


def words(completions, **kwargs):
    return ["good" for _ in completions]
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rl")
    save_preset_model("decoder-tiny", work / "model", train=True)
    rows = (ROOT / "data/rl/prompts.jsonl").read_text().splitlines()[:64]
    (work / "rl.jsonl").write_text("\n".join(rows) + "\n")
    held_out = (ROOT / "data/eval/heldout.jsonl").read_text().splitlines()[:16]
    (work / "heldout.jsonl").write_text("\n".join(held_out) + "\n")
    (work / "my_rewards.py").write_text(REWARDS)
    return work


def stage(method: str, **overrides) -> dict:
    train = {
        "max_steps": 20,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 12,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 1000,
    }
    return {
        "name": method,
        "method": method,
        "model": {"path": "model"},
        "data": {"sources": ["rl.jsonl"]},
        "rewards": [{"function": "my_rewards:short"}, {"builtin": "exact_answer", "weight": 0.5}],
        "train": train,
        **overrides,
    }


def toolkit_train(work: Path, name: str, *stages: dict) -> subprocess.CompletedProcess:
    (work / f"{name}.yaml").write_text(
        yaml.safe_dump({"name": name, "stages": list(stages)}, sort_keys=False)
    )
    return subprocess.run(
        [TOOLKIT, "train", f"{name}.yaml", "--overwrite"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )


def metrics(work: Path, name: str, stage: str) -> list[dict]:
    path = work / "runs" / name / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_raises_the_reward_and_reports_each_step(work):
    eval_section = {"tasks": "heldout.jsonl", "samples": 2, "before": True, "sampled": 2}
    result = toolkit_train(work, "g", stage("grpo", eval=eval_section))
    assert result.returncode == 0, result.stderr[-3000:]
    # 12 tokens cannot hold the tool calls among the 64 prompts: said before training, not discovered after
    assert "warning: stages.grpo.train.max_completion_length=12 is shorter than" in result.stdout
    rows = [r for r in metrics(work, "g", "grpo") if "reward" in r]
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert {"frac_reward_zero_std", "reward_std", "rewards/short/mean", "rewards/exact_answer/mean"} <= set(
        rows[0]
    )
    plots = {p.name for p in (work / "runs" / "g" / "grpo" / "plots").iterdir()}
    assert {
        "loss.png",
        "learning_rate.png",
        "grad_norm.png",
        "reward.png",
        "frac_reward_zero_std.png",
    } <= plots
    evaluation = json.loads((work / "runs" / "g" / "grpo" / "eval.json").read_text())
    assert evaluation["tasks"]["n"] == evaluation["before"]["tasks"]["n"] == 16
    for measured in (evaluation["tasks"], evaluation["before"]["tasks"]):  # the held-out expected reward
        assert 0.0 <= measured["sampled_accuracy"] <= 1.0 and measured["sampled"]["per_prompt"] == 2
    assert "sampled" in result.stdout.split("Held-out prompts")[0]  # its column in the summary's table
    config = json.loads((work / "runs" / "g" / "grpo" / "final" / "config.json").read_text())
    assert config["model_type"] == "decoder" and "auto_map" not in config


def test_rloo_trains_against_its_reference_model(work):
    result = toolkit_train(work, "r", stage("rloo", train={**stage("rloo")["train"], "max_steps": 4}))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metrics(work, "r", "rloo") if "reward" in r]
    assert len(rows) == 4 and all(
        "kl" in r for r in rows
    )  # RLOO's beta is 0.05: a reference model, KL logged
    assert (work / "runs" / "r" / "rloo" / "plots" / "kl.png").exists()


def test_bad_rewards_and_data_are_reported_before_anything_trains(work):
    (work / "qa.jsonl").write_text(
        '{"question": "What is 2 + 2?", "answer": "4"}\n{"question": "1+1?", "answer": "2"}\n'
    )
    (work / "no_answer.jsonl").write_text(
        '{"prompt": "What is 2 + 2?", "task": "addition"}\n{"prompt": "1+1?"}\n'
    )
    bad = stage(
        "grpo",
        rewards=[
            {"function": "missing_module:fn"},
            {"function": "my_rewards:no_kwargs"},
            {"function": "my_rewards:words"},
            {"builtin": "exact_answr"},
        ],
    )
    wrong_data = {**stage("grpo"), "name": "second", "data": {"sources": ["qa.jsonl"]}}
    no_answer = {**stage("grpo"), "name": "third", "data": {"sources": ["no_answer.jsonl"]}}
    result = toolkit_train(work, "bad", bad, wrong_data, no_answer)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (work / "runs" / "bad").exists()
    err = result.stderr
    assert err.startswith("error: 7 problems in bad.yaml:"), err
    assert "stages.grpo.rewards[0].function: cannot import 'missing_module:fn': ModuleNotFoundError" in err
    assert "stages.grpo.rewards[1]: reward 'no_kwargs' raised TypeError" in err
    assert "stages.grpo.rewards[2]: reward 'words' returned 'good' for a completion; expected a number" in err
    assert (
        "stages.grpo.rewards[3].builtin: unknown reward 'exact_answr' (did you mean 'exact_answer'?)" in err
    )
    assert "stages.second: grpo needs a `prompt` column; qa.jsonl has `answer`, `question`" in err
    assert (
        "stages.second.data.sources[0]: qa.jsonl:1: cannot tell the format from the columns question, answer"
        in err
    )
    assert (
        "stages.third.rewards[1]: exact_answer needs the column `answer`; no_answer.jsonl has `prompt`, `task`"
        in err
    )
