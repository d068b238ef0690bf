"""The experiment log: `toolkit runs [DIR]` lists run folders as a table, `toolkit runs compare A B` diffs two
runs' recipes and results.

Everything is read from the run folders themselves (toolkit/run_folder.py): the resolved `recipe.yaml`,
`env.json`, each stage's `metrics.jsonl`, `eval.json` and `stage.json`, and the results `toolkit eval` saved
under `<run>/eval/<timestamp>/` (lm-eval's `results.json`, a win-rate's `winrate.json`). Nothing here imports
torch, so listing a hundred runs takes a moment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.run_folder import RunFolder, StageFolder, read_metrics


def find_runs(root: str | Path) -> list[RunFolder]:
    """Run folders at `root` or directly under it (or one level deeper), by path."""
    root = Path(root)
    if (root / "recipe.yaml").exists():
        return [RunFolder(root)]
    found = sorted({p.parent for pattern in ("*/recipe.yaml", "*/*/recipe.yaml") for p in root.glob(pattern)})
    return [RunFolder(p) for p in found]


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def stage_measures(stage: StageFolder) -> dict[str, Any]:
    """What a stage measured: steps, wall seconds, last loss, and its `eval.json` headline numbers."""
    records = read_metrics(stage.metrics)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    done = stage.outcome() or {}
    runtime = [r["train_runtime"] for r in records if isinstance(r.get("train_runtime"), (int, float))]
    measures: dict[str, Any] = {
        "complete": stage.complete,
        "steps": max(steps) if steps else None,
        "seconds": done.get("seconds", runtime[-1] if runtime else None),
        "loss": losses[-1] if losses else None,
    }
    evaluation = stage.eval() or {}
    tasks, perplexity = evaluation.get("tasks") or {}, evaluation.get("perplexity") or {}
    if "accuracy" in tasks:
        measures["accuracy"] = tasks["accuracy"]
    if "answer_nll" in tasks:
        measures["answer_nll"] = tasks["answer_nll"]
    for task, value in (tasks.get("per_task") or {}).items():
        measures[f"accuracy/{task}"] = value
    if "perplexity" in perplexity:
        measures["perplexity"] = perplexity["perplexity"]
    return measures


def saved_evaluations(run: RunFolder) -> dict[str, Any]:
    """The latest saved `toolkit eval` results of the run: lm-eval `task/metric` values and the win-rate."""
    found: dict[str, Any] = {}
    for stage in run.stages():  # evaluate stages: {artifact: result} in results.json, a win-rate beside
        side_by_side = _json(stage.path / "results.json") or {}
        for name, result in side_by_side.items():
            for task, metrics in (result.get("results") or {}).items() if isinstance(result, dict) else []:
                for key, value in metrics.items():
                    if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                        found[f"{name} {task}/{key.split(',')[0]}"] = value
            if isinstance(result, dict) and "perplexity" in (result.get("perplexity") or {}):
                found[f"{name} perplexity"] = result["perplexity"]["perplexity"]
        winrate = _json(stage.path / "win-rate" / "winrate.json")
        if winrate:
            found[f"{winrate['model']['src']} win-rate vs {winrate['base']['src']}"] = winrate["win_rate"]
    folder = run.path / "eval"
    for stamp in sorted(folder.iterdir()) if folder.is_dir() else []:
        results = _json(stamp / "results.json")
        for task, metrics in ((results or {}).get("results") or {}).items():
            for key, value in metrics.items():
                if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                    found[f"{task}/{key.split(',')[0]}"] = value
        winrate = _json(stamp / "winrate.json")
        if winrate:
            found[f"win-rate vs {winrate['base']['src']}"] = winrate["win_rate"]
    return found


def run_row(run: RunFolder) -> dict[str, Any]:
    """One row of the experiment log."""
    recipe = run.recipe()
    env = run.env() or {}
    stages = run.stages()
    measures = {s.name: stage_measures(s) for s in stages}
    sources: list[str] = []
    for stage in recipe.get("stages", []):
        data = stage.get("data") or {}
        for source in data.get("sources", []) if isinstance(data, dict) else []:
            name = source.get("path") if isinstance(source, dict) else source
            if name and str(name) not in sources:
                sources.append(str(name))
    trained = [m for m in measures.values() if m["loss"] is not None]
    evaluated = [m for m in measures.values() if any(k in m for k in ("accuracy", "perplexity"))]
    final = {k: v for k, v in (evaluated[-1] if evaluated else {}).items() if k in ("accuracy", "perplexity")}
    return {
        "path": str(run.path),
        "name": run.name,
        "recipe": env.get("recipe_file"),
        "stages": [s.method for s in stages],
        "done": sum(m["complete"] for m in measures.values()),
        "data": sources,
        "steps": sum(m["steps"] or 0 for m in measures.values()),
        "seconds": sum(m["seconds"] or 0 for m in measures.values()),
        "loss": trained[-1]["loss"] if trained else None,
        "final": final,
        "eval": saved_evaluations(run),
        "per_stage": measures,
    }


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _wall(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def runs_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table `toolkit runs` prints."""
    lines = [
        "| run | recipe | stages | data | steps | wall | loss | final | eval |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        stages = " → ".join(row["stages"])
        if row["done"] < len(row["stages"]):
            stages += f" ({row['done']}/{len(row['stages'])} done)"
        data = ", ".join(Path(s).name if "/" in s and Path(s).suffix else s for s in row["data"][:3])
        data += f" +{len(row['data']) - 3}" if len(row["data"]) > 3 else ""
        final = ", ".join(f"{k} {_number(v)}" for k, v in row["final"].items()) or "-"
        shown = list(row["eval"].items())
        evaluations = ", ".join(f"{k} {_number(v)}" for k, v in shown[:4]) or "-"
        evaluations += f" (+{len(shown) - 4}: --json)" if len(shown) > 4 else ""
        recipe = Path(row["recipe"]).name if row["recipe"] else "-"
        lines.append(
            f"| {row['name']} | {recipe} | {stages} | {data or '-'} | {row['steps']} | {_wall(row['seconds'])} "
            f"| {_number(row['loss'])} | {final} | {evaluations} |"
        )
    return "\n".join(lines)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a resolved recipe; stages keyed by their name, so that reordering reads as a change of
    `stages` and two runs' `sft` stages line up."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= flatten(item, f"{prefix}{key}.")
        return out
    if isinstance(value, list) and value and all(isinstance(s, dict) and "name" in s for s in value):
        out = {prefix.rstrip("."): [s["name"] for s in value]}
        for stage in value:
            out |= flatten({k: v for k, v in stage.items() if k != "name"}, f"{prefix}{stage['name']}.")
        return out
    return {prefix.rstrip("."): value}


def compare(a: RunFolder, b: RunFolder) -> dict[str, Any]:
    """The recipe keys whose values differ, and every measure of either run, side by side."""
    recipe_a, recipe_b = flatten(a.recipe()), flatten(b.recipe())
    ignored = {"output_dir", "name"}
    recipe = {
        key: (recipe_a.get(key), recipe_b.get(key))
        for key in sorted(set(recipe_a) | set(recipe_b))
        if key not in ignored and recipe_a.get(key) != recipe_b.get(key)
    }
    row_a, row_b = run_row(a), run_row(b)
    measures: dict[str, tuple[Any, Any]] = {}
    for stage in dict.fromkeys([*row_a["per_stage"], *row_b["per_stage"]]):
        left, right = row_a["per_stage"].get(stage, {}), row_b["per_stage"].get(stage, {})
        for key in dict.fromkeys([*left, *right]):
            if key != "complete":
                measures[f"{stage}/{key}"] = (left.get(key), right.get(key))
    for key in dict.fromkeys([*row_a["eval"], *row_b["eval"]]):
        measures[f"eval/{key}"] = (row_a["eval"].get(key), row_b["eval"].get(key))
    return {"a": str(a.path), "b": str(b.path), "recipe": recipe, "measures": measures}


def compare_text(diff: dict[str, Any]) -> str:
    """`toolkit runs compare` as two markdown tables: recipe changes, then measures with their difference."""
    lines = [f"A: {diff['a']}", f"B: {diff['b']}", "", "| recipe key | A | B |", "|---|---|---|"]
    lines += [f"| {k} | {_number(x)} | {_number(y)} |" for k, (x, y) in diff["recipe"].items()]
    if not diff["recipe"]:
        lines.append("| (same recipe) | | |")
    lines += ["", "| measure | A | B | B − A |", "|---|---:|---:|---:|"]
    for key, (x, y) in diff["measures"].items():
        delta = (
            _number(y - x)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool)
            else ""
        )
        lines.append(f"| {key} | {_number(x)} | {_number(y)} | {delta} |")
    return "\n".join(lines)


def run_folder(path: str | Path) -> RunFolder:
    """A run folder, or an error naming what is missing."""
    run = RunFolder(Path(path))
    if not run.recipe_path.exists():
        raise ToolkitError(f"{path} is not a run folder (no recipe.yaml)")
    return run
