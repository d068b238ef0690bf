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

    quant: str = "q8_0"
    verify: bool = True  # in llama.cpp against the source; a missed bound stops the run
    system: str | None = None  # SYSTEM prompt for the Modelfile

    def __post_init__(self) -> None:
        from export.gguf import QUANTS

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


def register() -> None:
    register_stage(
        StageKind(
            "export",
            run=run_export,
            description="verified GGUF and Ollama Modelfile of an earlier stage's model, in the run's gguf/",
            keys=("model", "eval"),
            section="export",
            schema=ExportOptions,
        )
    )
