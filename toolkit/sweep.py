"""`toolkit sweep RECIPE --grid KEY=V1,V2 ...`: a grid of runs of one recipe, each point an ordinary run
folder, then a table and a plot of a chosen measure against each swept key.

Every point is validated before the first one trains (a misspelt key fails at once, with the nearest valid
one). Points run one after another, each in a fresh `toolkit train` process, or under `--launch` (e.g.
"accelerate launch --config_file recipes/accelerate/ddp.yaml", one launch per point); `sweep.json` records
each point's state after it ends (written atomically), so `--resume` skips the finished points and continues
an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.io import write_text
from toolkit.run_folder import RunFolder

SWEEP_FILE = "sweep.json"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`KEY=V1,V2` items as key -> values (each value still YAML text, as an override takes it)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ToolkitError(f"--grid '{item}' must look like dotted.key=value1,value2")
        if key in grid:
            raise ToolkitError(f"--grid {key} is given twice")
        grid[key] = [v for v in values.split(",") if v != ""]
    if not grid:
        raise ToolkitError("toolkit sweep needs at least one --grid KEY=V1,V2")
    return grid


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in the order the keys and values were given."""
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


def measure(run_dir: Path, metric: str) -> float | None:
    """`metric` of a finished run: `STAGE.MEASURE`, or `MEASURE` of its last trained stage (loss,
    accuracy, perplexity, ...: what `toolkit runs` shows)."""
    from toolkit.runs import stage_measures

    run = RunFolder(run_dir)
    stage_name, _, key = metric.rpartition(".")
    stages = [s for s in run.stages() if s.complete]
    if stage_name:
        stages = [s for s in stages if s.name == stage_name]
    for stage in reversed(stages):
        value = stage_measures(stage).get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _key(point: dict[str, str]) -> str:
    return json.dumps(point, sort_keys=True)


def _state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def run_sweep(
    recipe_path: str | Path,
    grid: dict[str, list[str]],
    out: Path,
    metric: str = "loss",
    resume: bool = False,
    launch: str | None = None,
) -> dict[str, Any]:
    """Run every point of `grid` over the recipe; returns (and keeps in `out/sweep.json`) the sweep's state."""
    from toolkit import recipe as recipes

    grid_points = points(grid)
    # Every point checked before any trains.
    loaded = [recipes.load(recipe_path, overrides=[f"{k}={v}" for k, v in p.items()]) for p in grid_points]
    name = loaded[0].name
    state_path = out / SWEEP_FILE
    state = _state(state_path)
    if state and not resume:
        raise ToolkitError(
            f"{out} holds a sweep already: --resume continues it, or choose another --output-dir"
        )
    if state and state.get("grid") != grid:
        raise ToolkitError(
            f"{out}: the sweep there ran another grid ({state.get('grid')}); use another --output-dir"
        )
    # One entry per point, written in grid order: a point not reached yet has none.
    entries = {_key(p["overrides"]): p for p in state.get("points", [])}
    state = {"recipe": str(recipe_path), "grid": grid, "metric": metric, "points": []}
    for i, point in enumerate(grid_points):
        run_dir = out / f"{name}-{i:03d}"
        if entries.get(_key(point), {}).get("status") == "done":
            continue
        argv = [str(recipe_path), *(f"{k}={v}" for k, v in point.items()), "--output-dir", str(run_dir)]
        if run_dir.exists():
            argv.append("--resume")  # an interrupted point continues from its last checkpoint
        command = (
            [*shlex.split(launch), "-m", "toolkit.train", *argv]
            if launch
            else [sys.executable, "-m", "toolkit.cli", "train", *argv]
        )
        print(
            f"sweep point {i + 1}/{len(grid_points)}: {' '.join(f'{k}={v}' for k, v in point.items())}",
            flush=True,
        )
        code = subprocess.run(command).returncode
        entries[_key(point)] = {
            "overrides": point,
            "run_dir": str(run_dir),
            "status": "done" if code == 0 else f"failed (exit {code})",
            "value": measure(run_dir, metric) if code == 0 else None,
        }
        state["points"] = [entries[_key(p)] for p in grid_points if _key(p) in entries]
        write_text(state_path, json.dumps(state, indent=2) + "\n")
    state["points"] = [entries[_key(p)] for p in grid_points if _key(p) in entries]
    write_text(state_path, json.dumps(state, indent=2) + "\n")
    plot_sweep(state, out / "sweep.png")
    return state


def sweep_table(state: dict[str, Any]) -> str:
    """The sweep as a markdown table: one row per point, one column per swept key, the measure, the state."""
    keys = list(state["grid"])
    header = ["run", *keys, state["metric"], "status"]
    rows = [
        [
            Path(p["run_dir"]).name,
            *(p["overrides"][k] for k in keys),
            "-" if p["value"] is None else f"{p['value']:.4g}",
            p["status"],
        ]
        for p in state["points"]
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def plot_sweep(state: dict[str, Any], out_png: Path) -> Path | None:
    """One panel per swept key: the measure of every finished point against that key's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in state["points"] if p["value"] is not None]
    if not done:
        return None
    keys = list(state["grid"])
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        values = state["grid"][key]
        axis.scatter([values.index(p["overrides"][key]) for p in done], [p["value"] for p in done])
        axis.set_xticks(range(len(values)), values)
        axis.set_xlabel(key.rpartition(".")[2])
        axis.set_ylabel(state["metric"])
    figure.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(out_png)
    return out_png
