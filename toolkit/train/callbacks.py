"""Trainer callbacks that write a run's metrics (`metrics.jsonl`, while training) and the plots of them (at the end)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from toolkit.io import atomic_path
from toolkit.run_folder import read_metrics


class MetricsCallback(TrainerCallback):
    """Append every log event (loss, learning rate, DPO rewards, ...) as one JSON line; main process only."""

    def __init__(self, path: str | Path, step_offset: int = 0) -> None:
        self.path = Path(path)
        self.step_offset = step_offset  # steps of earlier trainers in the same stage (staged quantization)

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
        record = {"step": self.step_offset + state.global_step, "epoch": state.epoch, **logs}
        with self.path.open(
            "a"
        ) as handle:  # appending keeps earlier lines if a resumed run continues the file
            handle.write(json.dumps(record) + "\n")


class ModelLogCallback(TrainerCallback):
    """Adds to every training log event what the model reports of itself since the last one: a model with a
    `pop_loss_parts()` method (cognate: its loss parts and halting steps) gets them logged beside `loss`.
    Placed before `MetricsCallback`, which then writes them."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        pop = getattr(model, "pop_loss_parts", None)  # PEFT wrappers forward attribute lookups
        if logs is not None and "loss" in logs and callable(pop):
            logs.update({name: round(value, 6) for name, value in pop().items()})


def _figure(records: list[dict[str, Any]], keys: tuple[str, ...], title: str, out_png: Path) -> Path | None:
    """One PNG of `keys` against step; None when none of them was logged."""
    curves = {
        key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))] for key in keys
    }
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
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png


# What every training stage plots; a method adds its own measures (its TrainerSpec's `plots`).
COMMON_PLOTS: tuple[tuple[str, ...], ...] = (
    ("loss", "eval_loss"),
    ("learning_rate",),
    ("grad_norm",),
    # What a model logs of itself (ModelLogCallback); no plot when nothing was logged.
    ("lm_loss", "deep_supervision_loss", "halting_loss", "ponder_cost"),
    ("halting_steps",),
)


def plot_name(keys: tuple[str, ...]) -> str:
    """`loss.png`, `rewards-margins.png`, ...: the first key, made a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", keys[0]).strip("-") + ".png"


def plot_stage(
    metrics_path: str | Path, plots_dir: str | Path, title: str, extra: tuple[tuple[str, ...], ...] = ()
) -> list[Path]:
    """Plot a stage's `metrics.jsonl`: loss, learning rate, grad norm, then the method's own measures (each
    group of keys one PNG in `plots_dir`). Returns the files written."""
    records = read_metrics(metrics_path)
    written = []
    for keys in (*COMMON_PLOTS, *extra):
        path = _figure(records, keys, title, Path(plots_dir) / plot_name(keys))
        if path is not None:
            written.append(path)
    return written
