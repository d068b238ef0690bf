"""The `export` stage of recipes: an earlier stage's model as a verified GGUF and Ollama Modelfile in the run's
`gguf/` folder, then (with `eval.tasks`) the held-out questions answered by llama.cpp through the chat
template inside the file. Registered in the stage registry through the `forge_toolkit.stages` entry point.

    - {name: gguf, method: export, export: {quant: q8_0}, eval: {tasks: data/eval/heldout.jsonl}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit.errors import ToolkitError, nearest
from toolkit.io import read_jsonl
from toolkit.stages import StageContext, StageKind, StageOutcome, register_stage


@dataclass
class ExportOptions:
    """An export stage's `export:` section."""

    target: str = "gguf"  # gguf: a GGUF + Modelfile in gguf/; vllm: a folder `vllm serve` takes, in vllm/
    quant: str = "q8_0"
    verify: bool = True  # in llama.cpp against the source; a missed bound stops the run
    system: str | None = None  # SYSTEM prompt for the Modelfile

    def __post_init__(self) -> None:
        from export.gguf import QUANTS

        if self.target not in ("gguf", "vllm"):
            guess = nearest(self.target, ("gguf", "vllm"))
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise ValueError(f"target '{self.target}' is not an export target{hint}; one of gguf, vllm")

        if self.quant not in QUANTS:
            guess = nearest(self.quant, QUANTS)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise ValueError(
                f"quant '{self.quant}' is not a GGUF type this exporter writes{hint}; one of {', '.join(QUANTS)}"
            )


def run_export(ctx: StageContext) -> StageOutcome:
    """GGUF + Modelfile of the `model.from` stage, verified; then `eval.tasks` through llama.cpp. A missed
    verification bound stops the run: an unverified file is not a result."""
    from export.llama_cpp import chat_answers
    from export.ollama import export_ollama
    from toolkit.data.tasks import score_answers
    from toolkit.train.runner import distributed_state

    if not distributed_state().is_main_process:
        return StageOutcome(final=ctx.run_folder.gguf_dir)
    spec = ctx.stage.options
    source = ctx.run_folder.stage(ctx.stage.model["from"]).final
    if spec["target"] == "vllm":
        return run_vllm_export(ctx, source, spec)
    result = export_ollama(
        source,
        ctx.run_folder.gguf_dir,
        spec["quant"],
        system=spec.get("system"),
        force=True,
        verify=spec["verify"],
    )
    if not result.ok:
        raise ToolkitError(
            f"stages.{ctx.stage.name}: the GGUF missed a verification bound; see {result.gguf.path}"
        )
    evaluation: dict[str, Any] = {
        "gguf": str(result.gguf.path),
        "verification": (result.gguf.report or {}).get("measures"),
    }
    options = ctx.stage.eval  # the eval package's EvalOptions, every field present
    if options and options["tasks"]:
        rows = read_jsonl(options["tasks"])[: options["limit"]]
        answers = chat_answers(result.gguf.path, [r["prompt"] for r in rows], options["max_new_tokens"])
        evaluation["tasks"] = {
            **score_answers(rows, answers, options["samples"]),
            "runtime": "llama.cpp",
        }
    details = {"gguf": str(result.gguf.path), "modelfile": str(result.modelfile)}
    return StageOutcome(final=ctx.run_folder.gguf_dir, eval=evaluation, details=details)


def run_vllm_export(ctx: StageContext, source: Any, spec: dict[str, Any]) -> StageOutcome:
    """`toolkit export vllm` of the stage's model into the run's vllm/ (a LoRA adapter merged, with base/ and
    adapter/ beside): verified in a clean process, and in vLLM itself where a vLLM environment exists."""
    from export.vllm import export_vllm

    result = export_vllm(source, ctx.run_folder.vllm_dir, force=True, verify=spec["verify"])
    if not result.ok:
        raise ToolkitError(
            f"stages.{ctx.stage.name}: the vLLM folder missed a verification bound; see "
            f"{result.path / 'export_report.json'}"
        )
    evaluation = {
        "vllm": str(result.path),
        "form": result.form,
        "verified_in": result.report.get("verified_in"),
        "checks": result.report.get("checks"),
    }
    details = {"vllm": str(result.path), "serve": str(result.model_dir)}
    return StageOutcome(final=result.path, eval=evaluation, details=details)


def preflight_export(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """`eval:` on an export stage answers the held-out questions in llama.cpp: a GGUF's only."""
    if (stage.options or {}).get("target") == "vllm" and stage.eval:
        problems.add(
            f"{at}.eval: a vLLM export is evaluated by an evaluate stage naming it "
            f"({{method: evaluate, evaluate: {{models: [{stage.name}], tasks: [...]}}}})"
        )


def register() -> None:
    register_stage(
        StageKind(
            "export",
            run=run_export,
            description="an earlier stage's model as a verified GGUF + Ollama Modelfile (gguf/) or vLLM folder "
            "(vllm/)",
            keys=("model", "eval"),
            section="export",
            schema=ExportOptions,
            preflight=preflight_export,
        )
    )
