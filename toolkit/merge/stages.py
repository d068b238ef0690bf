"""Merging in recipes: the `merge` and `evolve` stages, registered in the stage registry through the
`forge_toolkit.stages` entry point. Model references may name earlier stages (their `final/`).

    - name: merged
      method: merge
      merge:                       # a mergekit config (or several, as a list: named steps, then the output)
        merge_method: ties
        base_model: pretrain
        models:
          - {model: arithmetic, parameters: {weight: 0.5, density: 0.5}}
          - {model: units, parameters: {weight: 0.5, density: 0.5}}

    - name: evolve
      method: evolve
      evolve: {models: [arithmetic, units, copy], base_model: pretrain, generations: 20,
               fitness: {tasks: data/eval/heldout.jsonl, families: [addition, unit_conversion, copy]}}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from toolkit.errors import nearest
from toolkit.stages import StageContext, StageKind, StageOutcome, find_earlier, get_stage, register_stage


def parse_merge(raw: Any, at: str, problems: Any) -> list[dict[str, Any]]:
    """A `merge:` section: one mergekit config, or a list of them (named steps, then the output), each
    checked as `toolkit merge` checks a file."""
    from toolkit.merge.config import check

    documents = raw if isinstance(raw, list) else [raw]
    if not documents or not all(isinstance(d, dict) for d in documents):
        problems.add(f"{at}: a mergekit config (merge_method, models or slices, ...), or a list of them")
        return []
    for i, document in enumerate(documents):
        where = f"{at}[{i}]" if len(documents) > 1 else at
        body = {k: v for k, v in document.items() if k != "name"}
        for problem in check(body):
            problems.add(f"{where}: {problem}")
    return documents


def _stage_problem(recipe: Any, stage: Any, name: str) -> str | None:
    """Why `name` is not a model this stage can take (None when it is an earlier model stage, or a folder or
    Hub id for the merge to read)."""
    from toolkit.data.loading import local_path_problem

    ref = find_earlier(recipe, stage, name)
    if ref.stage is not None:
        return None if get_stage(ref.stage.method).produces_model else f"stage '{name}' makes no model"
    if ref.later:
        return f"stage '{name}' runs later (earlier: {', '.join(ref.earlier) or 'none'})"
    if Path(name).exists():
        return None
    earlier = ", ".join(ref.earlier) or "none"
    # A bare name is read as a stage name (Hub ids are org/name): a misspelt stage is the likely mistake.
    if "/" not in name:
        guess = nearest(name, ref.earlier)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        return f"'{name}' is no earlier stage{hint} (earlier: {earlier}) and no folder"
    problem = local_path_problem(name, folder=True)
    return f"'{name}' is no earlier stage (earlier: {earlier}) and {problem}" if problem else None


def merge_preflight(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """Every model the merge names is an earlier stage with a model, a step of the merge, or a folder."""
    from toolkit.merge.config import references

    steps = {d.get("name") for d in stage.options or [] if d.get("name")}
    for i, document in enumerate(stage.options or []):
        for where, container, key in references(document):
            name = str(container[key]).partition("+")[0]
            if name in steps:
                continue
            if problem := _stage_problem(recipe, stage, name):
                problems.add(f"{at}.merge{f'[{i}]' if len(stage.options) > 1 else ''}.{where}: {problem}")


def _stage_resolver(ctx: StageContext) -> Any:
    """Earlier stage names -> their final/ folders (other names are left to the merge: folders, Hub ids)."""
    earlier = {s.name for s in ctx.recipe.stages[: [s.name for s in ctx.recipe.stages].index(ctx.stage.name)]}

    def resolve(name: str, where: str = "") -> str | None:
        return str(ctx.run_folder.stage(name).final) if name in earlier else None

    return resolve


def run_merge_stage(ctx: StageContext) -> StageOutcome:
    """The merge into the stage's final/ (on the main process; the others wait for the runner's barrier)."""
    from toolkit.merge.run import format_report, merge_documents
    from toolkit.train.runner import distributed_state

    final = ctx.folder.final
    if distributed_state().is_main_process:
        report = merge_documents(
            ctx.stage.options, final, resolve=_stage_resolver(ctx), where=f"stages.{ctx.stage.name}.merge"
        )
        print(format_report(report), flush=True)
    return StageOutcome(final=final)


def parse_evolve(raw: Any, at: str, problems: Any) -> dict[str, Any]:
    from toolkit.errors import ToolkitError
    from toolkit.merge.evolve import parse_options

    if not isinstance(raw, dict):
        problems.add(f"{at}: a mapping (models, base_model, generations, fitness, ...)")
        return {}
    try:
        return dataclasses.asdict(parse_options(raw, at))
    except ToolkitError as error:
        problems.add(str(error))
        return {}


def evolve_preflight(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """The models and the base are earlier model stages or folders; the fitness files exist."""
    options = stage.options or {}
    for key, names in (("models", options.get("models") or []), ("base_model", [options.get("base_model")])):
        for name in names:
            if name and (problem := _stage_problem(recipe, stage, str(name))):
                problems.add(f"{at}.evolve.{key}: {problem}")
    for key in ("tasks", "perplexity"):
        path = (options.get("fitness") or {}).get(key)
        if path and not Path(path).is_file():
            problems.add(f"{at}.evolve.fitness.{key}: {path}: no such file")


def run_evolve_stage(ctx: StageContext) -> StageOutcome:
    """The evolution in the stage folder (evolve.json, evaluations.jsonl, plots/fitness.png, report.md), the
    champion as its final/."""
    from toolkit.merge.evolve import EvolveOptions, evolve
    from toolkit.train.runner import distributed_state

    if distributed_state().is_main_process:
        resolve = _stage_resolver(ctx)
        state = evolve(
            EvolveOptions(**ctx.stage.options),
            ctx.folder.path,
            champion=ctx.folder.final,
            resolve=resolve,
            resume=ctx.resume,
        )
        from toolkit.merge.evolve import report_table

        # Under "report", the run's summary prints the table whole, as an evaluate stage's.
        return StageOutcome(
            final=ctx.folder.final,
            eval={"report": report_table(state), "champion": state["champion"]},
            details={"champion": state["champion"]},
        )
    return StageOutcome(final=ctx.folder.final)


def register() -> None:
    register_stage(
        StageKind(
            "merge",
            run=run_merge_stage,
            description="a mergekit merge (any of its methods, or dfs) of earlier stages' models or folders",
            keys=("eval",),
            section="merge",
            schema=parse_merge,
            produces_model=True,
            preflight=merge_preflight,
        )
    )
    register_stage(
        StageKind(
            "evolve",
            run=run_evolve_stage,
            description="merge recipes evolved over earlier stages' models, scored by the eval suite",
            keys=("eval",),
            section="evolve",
            schema=parse_evolve,
            produces_model=True,
            preflight=evolve_preflight,
        )
    )
