"""The end-of-run report: a stage evaluated before it trained gets its own row, and an RL stage reports its
reward and the share of groups without reward variance at the start and at the end."""

from __future__ import annotations

import json

from toolkit.train.runner import StageResult
from toolkit.train.summary import format_summary


def tasks(accuracy: float, prediction: str) -> dict:
    samples = [{"prompt": "Add 2 and 3.", "answer": "5", "prediction": prediction}]
    return {"tasks": {"accuracy": accuracy, "answer_nll": 0.5, "n": 1, "samples": samples}}


def test_before_rows_and_rewards(tmp_path):
    stage = tmp_path / "grpo"
    (stage / "final").mkdir(parents=True)
    records = [{"step": i, "reward": 0.1 * (i > 10) + 0.2, "frac_reward_zero_std": 0.5} for i in range(1, 21)]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    evaluation = {**tasks(0.5, "5"), "before": tasks(0.25, "6")}
    text = format_summary(tmp_path, [StageResult("grpo", "grpo", stage / "final", evaluation)])
    lines = text.splitlines()
    assert any(line.split()[:3] == ["grpo", "(before)", "0.250"] for line in lines), text
    assert any(line.split()[:2] == ["grpo", "0.500"] for line in lines), text
    assert "grpo (before): '6'" in text and "grpo: '5'" in text
    assert "grpo: reward 0.200 (first 10 logged steps) -> 0.300 (last 10)" in text
    assert "zero reward variance 50% -> 50%" in text
