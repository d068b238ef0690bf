"""Trainer callbacks that write a run's metrics: `metrics.jsonl` while training, a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from toolkit.io import atomic_path


class MetricsCallback(TrainerCallback):
    """Append every log event (loss, learning rate, DPO rewards, ...) as one JSON line; main process only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open(
            "a"
        ) as handle:  # appending keeps earlier lines if a resumed run continues the file
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file ([] when absent)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Plot training loss (and eval loss when logged) against step; None when there is nothing to plot."""
    records = read_metrics(metrics_path)
    curves = {key: [(r["step"], r[key]) for r in records if key in r] for key in ("loss", "eval_loss")}
    curves = {key: points for key, points in curves.items() if points}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, points in curves.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(out_png)
