"""The recipe runner: the stage loop, resume, and the run folder's own files.

For each stage of the recipe, in order, the runner asks the stage registry (`toolkit.stages`) for its kind and
runs it, then the section hooks the stage carries (e.g. `eval:`, registered by the eval package) with the model
it made, and marks the stage done (`<stage>/stage.json`, written last and atomically). It names no method:
what a stage does is its kind's. The same code runs on one CPU (`toolkit train`) and under `accelerate launch
-m toolkit.train` on several devices: the trainers do the distribution, the runner keeps file writes on the
main process. Layout: `toolkit/run_folder.py`.

`--resume` skips the stages that are done and resumes the first unfinished one from its newest complete
checkpoint. A recipe that changed since the run began is refused, naming every changed key, unless each is
accepted with `--resume-changed KEY`; accepted changes are recorded in `resume.json`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import RecipeError
from toolkit.io import write_json, write_text
from toolkit.recipe import Recipe
from toolkit.run_folder import RunFolder
from toolkit.stages import StageContext, StageOutcome, get_stage, resolve, section_hooks

PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "gguf",
)


@dataclass
class StageResult:
    """What a stage left behind."""

    name: str
    method: str
    final: Path
    eval: dict[str, Any] | None
    skipped: bool = False


def distributed_state() -> Any:
    """Accelerate's process state. Its first creation fixes the backend for the whole process: on a CPU-only
    machine it must be told so, or processes started by `accelerate launch`/`torchrun` each run alone
    instead of joining one gloo group."""
    from accelerate import PartialState

    from toolkit.train.trainer_stage import cpu_only

    return PartialState(cpu=cpu_only())


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with every run so a result can be reproduced."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    state = distributed_state()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
    }


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved recipes; stages are matched by name."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        return [k for key in keys for k in changed_keys(before.get(key), after.get(key), f"{prefix}{key}.")]
    if (
        isinstance(before, list)
        and isinstance(after, list)
        and all(isinstance(s, dict) and "name" in s for s in [*before, *after])
    ):
        old, new = {s["name"]: s for s in before}, {s["name"]: s for s in after}
        if list(old) != list(new):
            return [prefix.rstrip(".")]  # stages added, removed or reordered
        return [k for name in old for k in changed_keys(old[name], new[name], f"{prefix}{name}.")]
    return [] if before == after else [prefix.rstrip(".")]


def _accept_changes(run: RunFolder, recipe: Recipe, accepted: list[str]) -> None:
    """Refuse a resumed recipe that differs from the run's, unless every changed key is accepted; record what
    was accepted."""
    # Where the run folder is does not change the run: a folder moved or copied resumes as it is.
    before = {**run.recipe(), "output_dir": None}
    after = {**json.loads(json.dumps(recipe.to_dict(), default=str)), "output_dir": None}
    changed = changed_keys(before, after)
    refused = [key for key in changed if not any(key == a or key.startswith(a + ".") for a in accepted)]
    if refused:
        raise RecipeError(
            f"{run.path} was run with another recipe; changed: {', '.join(refused)}. Resume with the recipe "
            f"it ran with, or accept each change: --resume-changed {' '.join(refused)}"
        )
    if changed:
        history = json.loads(run.resume_path.read_text()) if run.resume_path.exists() else []
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "accepted": changed})
        write_json(run.resume_path, history)


def run(
    recipe: Recipe, resume: bool = False, overwrite: bool = False, resume_changed: list[str] = ()
) -> list[StageResult]:
    """Run every stage of `recipe` in order; returns what each stage produced."""
    from transformers import set_seed

    state = distributed_state()
    folder = RunFolder(recipe.output_dir)
    earlier_run = folder.recipe_path.exists()
    state.wait_for_everyone()  # every rank looks before the main process writes
    if earlier_run and not (resume or overwrite):
        raise RecipeError(
            f"{folder.path} holds an earlier run; pass --resume to continue it or --overwrite to start over"
        )
    if resume and earlier_run:
        _accept_changes(folder, recipe, list(resume_changed))
    if state.is_main_process:
        if overwrite and folder.path.exists() and not resume:
            shutil.rmtree(folder.path)
        folder.path.mkdir(parents=True, exist_ok=True)
        write_text(folder.recipe_path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_json(
            folder.env_path,
            {**environment(), "recipe_file": str(recipe.source) if recipe.source else None},
        )
    state.wait_for_everyone()

    hooks = section_hooks()
    results: list[StageResult] = []
    for stage, stage_folder in zip(recipe.stages, folder.stages(), strict=True):
        set_seed(recipe.seed)
        if stage_folder.complete:
            print(f"[{stage.name}] already complete: {stage_folder.path}")
            results.append(
                StageResult(stage.name, stage.method, stage_folder.final, stage_folder.eval(), True)
            )
            continue
        print(f"[{stage.name}] {stage.method} -> {stage_folder.path}")
        kind = get_stage(stage.method)
        context = StageContext(recipe, stage, folder, stage_folder, resume=resume)
        hook = hooks.get("eval") if kind.produces_model and stage.eval else None
        before = None
        if hook is not None and hook.before is not None and stage.eval.get("before"):
            if state.is_main_process:
                before = resolve(hook.before)(context, stage.eval)
            state.wait_for_everyone()
        started = time.time()
        outcome: StageOutcome = resolve(kind.run)(context)
        evaluation = outcome.eval
        if hook is not None:
            if state.is_main_process:
                # What the stage reported itself (e.g. an evolution's table) stays beside the section's measures.
                evaluation = {**(outcome.eval or {}), **resolve(hook.run)(context, outcome, stage.eval)}
                if before is not None:
                    evaluation = {**evaluation, "before": before}
            state.wait_for_everyone()
        if state.is_main_process:
            if evaluation is not None:
                write_json(stage_folder.eval_path, evaluation)
            record = {
                "method": stage.method,
                "final": str(outcome.final) if outcome.final else None,
                "seconds": round(time.time() - started, 1),  # the stage's wall time, its evaluation included
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            write_json(stage_folder.done_path, {**record, **outcome.details})
        state.wait_for_everyone()
        results.append(StageResult(stage.name, stage.method, outcome.final or stage_folder.final, evaluation))
        del outcome
    return results
