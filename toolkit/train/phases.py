"""The `report` stage: the run's phases side by side in one markdown file, `runs/<name>/report.md`.

A long pipeline (the Agent Forge recipe: cognate, evolutionary merge, thought baking, thought RL, BitNet, export)
leaves its evidence in each stage's folder: `eval.json` (held-out accuracy, perplexity, the thought format,
the anti-theater verdict, a merge's champion), a stage's own `report.md` (the diversity comparison, the
evolution table) and `stage.json` (wall time). This stage reads them, stage by stage, under the phase titles
the recipe gives, and adds each phase's headline: diversity verdict, fitness gain over the best parent,
anti-theater verdict, compression and accuracy drop. It reads files only (no model is loaded), so it runs in
seconds and can be rerun on a finished run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.io import write_text
from toolkit.stages import StageContext, StageKind, StageOutcome, find_earlier, register_stage


@dataclass
class ReportOptions:
    """A report stage's `report:` section: phase title -> the earlier stages it gathers, in order."""

    title: str = ""
    phases: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError(
                "phases: give each phase a title and the stages it holds, e.g. {Merge: [evolve]}"
            )


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _accuracy(measured: dict[str, Any]) -> str | None:
    tasks = measured.get("tasks")
    if not tasks:
        return None
    line = f"held-out accuracy {tasks['accuracy']:.3f}"
    if "accuracy_without_thoughts" in tasks:
        line += f" (thought ablated {tasks['accuracy_without_thoughts']:.3f}; in the format {tasks['thought_format']:.2f})"
    if "answer_nll" in tasks:
        line += f", answer NLL {tasks['answer_nll']:.3f}"
    return line


def thought_lines(measured: dict[str, Any]) -> list[str]:
    """A thought stage's verdicts as sentences (the run summary's and the phase report's): whether baking
    reached the format bound, and the anti-theater verdict with its measures; the reasons for a THEATER
    verdict follow, indented."""
    lines = []
    if baked := measured.get("thoughts"):
        first = baked.get("first_passed_at")
        lines.append(
            f"thought format accuracy {baked['format_accuracy']:.2f} at step {baked['step']} (bound {baked['bound']}): "
            + ("passed" if baked["passed"] else "NOT reached")
            + (f", first at step {first}" if first is not None else "")
            + f"; answers right {baked['accuracy']:.2f}"
        )
    if theater := measured.get("theater"):
        verdict = "THEATER" if theater["theater"] else "the thoughts matter"
        lines.append(
            f"{verdict} (anti-theater: accuracy with thoughts {theater['accuracy']:.3f}, thought ablated "
            f"{theater['accuracy_ablated']:.3f}, gain {theater['ablation_gain']:+.3f}; divergence "
            f"{theater['divergence']:.2f}; dependence {theater['dependence']:.2f})"
        )
        lines += [f"  {reason}" for reason in theater.get("reasons", [])]
    return lines


def stage_lines(folder: Path, method: str) -> list[str]:
    """What one stage folder reports, as markdown lines."""
    lines: list[str] = []
    measured = _json(folder / "eval.json") or {}
    done = _json(folder / "stage.json") or {}
    before = measured.get("before")
    if before and _accuracy(before):
        lines.append(f"- before: {_accuracy(before)}")
    if _accuracy(measured):
        lines.append(f"- {_accuracy(measured)}")
        if before and before.get("tasks") and measured.get("tasks"):
            drop = before["tasks"]["accuracy"] - measured["tasks"]["accuracy"]
            lines.append(f"- accuracy change: {-drop:+.3f}")
    if (ppl := measured.get("perplexity", {}).get("perplexity")) is not None:
        lines.append(f"- perplexity {ppl:.2f}")
    lines += [
        f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in thought_lines(measured)
    ]
    if champion := measured.get("champion"):
        lines.append(
            f"- champion ({champion.get('combination')}): fitness {champion['fitness']:.4f}, "
            f"{champion.get('gain_over_best_parent_pct', float('nan')):+.1f}% over the best parent"
        )
    if "diverse" in measured:
        lines.append(f"- diversity: {'diverse' if measured['diverse'] else 'NOT diverse'}")
    for key, label in (("gguf", "GGUF"), ("hf", "Hub folder"), ("vllm", "vLLM folder")):
        if measured.get(key):
            lines.append(f"- {label}: {measured[key]}")
    if verified := measured.get("verification"):
        lines.append(
            f"- verified in llama.cpp: mean KL {verified['mean_kl']:.2e}, top-1 agreement {verified['top1_agreement']:.3f}"
        )
    if quant := _json(folder / "quantization.json"):  # staged BitNet: each group's verdict, the accuracy drop
        measure = quant["measure"]
        lines.append(f"- full precision: {measure} {quant['full_precision']['score']:.4g}")
        for group in quant["groups"]:
            verdict = "kept ternary" if group["ternary"] else group["decision"]
            score = f", {measure} {group['score']:.4g} ({group['drop']:+.1%})" if "score" in group else ""
            lines.append(f"- group {group['index']}: {group['layers']} layers, {verdict}{score}")
        full, now = quant["full_precision"]["eval"].get("tasks"), measured.get("tasks")
        if full and now and not before:
            lines.append(
                f"- accuracy change: {full['accuracy']:.3f} in full precision -> {now['accuracy']:.3f} "
                f"({now['accuracy'] - full['accuracy']:+.3f})"
            )
    if bitnet := measured.get("bitnet"):
        lines.append(
            f"- compression: {bitnet['compression_vs_f32']}x smaller than float32, "
            f"{bitnet['ternary_share']:.0%} of the parameters ternary, {bitnet['zero_fraction']:.1%} of their "
            "weights zero"
        )
    if done.get("seconds") is not None:
        lines.append(f"- wall time {done['seconds']:.0f} s")
    own = folder / "report.md"
    if own.exists():
        lines += ["", own.read_text().strip()]
    return lines


def run_report(ctx: StageContext) -> StageOutcome:
    """Write `runs/<name>/report.md` from the earlier stages' folders."""
    options = ctx.stage.options or {}
    methods = {s.name: s.method for s in ctx.recipe.stages}
    title = options.get("title") or f"{ctx.recipe.name}: {ctx.recipe.description}".rstrip(": ")
    lines = [f"# {title}", ""]
    for phase, stages in options["phases"].items():
        lines += [f"## {phase}", ""]
        for name in stages:
            folder = ctx.run_folder.path / name
            lines += [
                f"### {name} ({methods.get(name, '?')})",
                "",
                *stage_lines(folder, methods.get(name, "")),
                "",
            ]
    out = ctx.run_folder.path / "report.md"
    write_text(out, "\n".join(lines).rstrip() + "\n")
    write_text(ctx.folder.path / "report.md", "\n".join(lines).rstrip() + "\n")
    print(f"[{ctx.stage.name}] phase report: {out}", flush=True)
    return StageOutcome(final=ctx.folder.path, details={"report": str(out)})


def preflight_report(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """Every stage a phase names comes earlier in the recipe."""
    for phase, names in ((stage.options or {}).get("phases") or {}).items():
        for name in names:
            ref = find_earlier(recipe, stage, name)
            if ref.stage is None:
                where = "runs after it" if ref.later else f"is no stage (earlier: {', '.join(ref.earlier)})"
                problems.add(f"{at}.report.phases.{phase}: '{name}' {where}")


register_stage(
    StageKind(
        "report",
        run=run_report,
        description="the run's phases side by side in runs/<name>/report.md (measures, verdicts, stage reports)",
        section="report",
        schema=ReportOptions,
        preflight=preflight_report,
    )
)
