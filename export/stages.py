"""The `export` stage of recipes: an earlier stage's model as a verified GGUF and Ollama Modelfile in the run's
`gguf/` folder, then (with `eval.tasks`) the held-out questions answered by llama.cpp through the chat
template inside the file; or a vLLM folder (`vllm/`), or a Hub folder that loads without the toolkit (`hf/`).
Registered in the stage registry through the `forge_toolkit.stages` entry point.

    - {name: gguf, method: export, export: {quant: q8_0}, eval: {tasks: data/eval/heldout.jsonl}}
    - {name: hub, method: export, export: {target: hf}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit.errors import ToolkitError, nearest
from toolkit.io import read_jsonl
from toolkit.stages import StageContext, StageKind, StageOutcome, register_stage

TARGETS = ("gguf", "vllm", "hf")


@dataclass
class ExportOptions:
    """An export stage's `export:` section."""

    # gguf: a GGUF + Modelfile in gguf/; vllm: a folder `vllm serve` takes, in vllm/; hf: a Hub folder in hf/
    target: str = "gguf"
    quant: str = "q8_0"
    verify: bool = True  # in llama.cpp against the source; a missed bound stops the run
    system: str | None = None  # SYSTEM prompt for the Modelfile

    def __post_init__(self) -> None:
        from export.gguf import QUANTS

        if self.target not in TARGETS:
            guess = nearest(self.target, TARGETS)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise ValueError(
                f"target '{self.target}' is not an export target{hint}; one of {', '.join(TARGETS)}"
            )

        if self.quant not in QUANTS:
            guess = nearest(self.quant, QUANTS)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise ValueError(
                f"quant '{self.quant}' is not a GGUF type this exporter writes{hint}; one of {', '.join(QUANTS)}"
            )


def gguf_task_scores(
    path: Any, source: Any, rows: list[dict[str, Any]], options: dict[str, Any]
) -> dict[str, Any]:
    """Held-out answers from llama.cpp, scored. A model with thought tokens thinks first (more tokens), its
    control tokens rendered so that the answer after the thought is what is scored, and the thought is shown
    in the samples with `show_thoughts`."""
    from transformers import AutoTokenizer

    from export.llama_cpp import chat_answers, chat_completions
    from toolkit.data.tasks import score_answers
    from toolkit.data.thoughts import THOUGHT_BUDGET, has_thought_tokens, score_completions
    from toolkit.data.tokenizer import answer_budget

    prompts = [r["prompt"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(source)
    budget = options["max_new_tokens"] or answer_budget(tokenizer, [r["answer"] for r in rows])
    if not has_thought_tokens(tokenizer):
        return score_answers(rows, chat_answers(path, prompts, budget), options["samples"])
    completions = chat_completions(path, prompts, budget + THOUGHT_BUDGET)
    return score_completions(rows, completions, options["samples"], options.get("show_thoughts", False))


def run_export(ctx: StageContext) -> StageOutcome:
    """GGUF + Modelfile of the `model.from` stage, verified; then `eval.tasks` through llama.cpp. A missed
    verification bound stops the run: an unverified file is not a result."""
    from export.ollama import export_ollama
    from toolkit.train.runner import distributed_state

    if not distributed_state().is_main_process:
        return StageOutcome(final=ctx.run_folder.gguf_dir)
    spec = ctx.stage.options
    source = ctx.run_folder.stage(ctx.stage.model["from"]).final
    if spec["target"] == "vllm":
        return run_vllm_export(ctx, source, spec)
    if spec["target"] == "hf":
        return run_hf_export(ctx, source, spec)
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
    if bitnet := (result.gguf.report or {}).get("bitnet"):
        evaluation["bitnet"] = bitnet  # ternary share, zero weights, compression against float32
    options = ctx.stage.eval  # the eval package's EvalOptions, every field present
    if options and options["tasks"]:
        rows = read_jsonl(options["tasks"])[: options["limit"]]
        evaluation["tasks"] = {
            **gguf_task_scores(result.gguf.path, source, rows, options),
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


def run_hf_export(ctx: StageContext, source: Any, spec: dict[str, Any]) -> StageOutcome:
    """`toolkit export hf` of the stage's model into the run's hf/, verified in a clean process."""
    from export.hf import export_hf

    result = export_hf(source, ctx.run_folder.hf_dir, force=True, verify=spec["verify"])
    if not result.ok:
        raise ToolkitError(
            f"stages.{ctx.stage.name}: the Hub folder missed a verification bound; see "
            f"{result.path / 'export_report.json'}"
        )
    evaluation = {
        "hf": str(result.path),
        "remote_code": result.remote_code,
        "checks": (result.report.get("verification") or {}).get("model", {}).get("measures"),
    }
    return StageOutcome(final=result.path, eval=evaluation, details={"hf": str(result.path)})


def origin_architecture(stage: Any, recipe: Any) -> str | None:
    """The architecture the stage's model is, when the recipe builds it from a preset (following `from`
    back); None for a checkpoint or Hub model, whose type is known only once it is there."""
    from toolkit.models import PRESETS

    stages = {s.name: s for s in (recipe.stages if recipe is not None else [])}
    seen: set[str] = set()
    model = stage.model or {}
    while "from" in model and model["from"] in stages and model["from"] not in seen:
        seen.add(model["from"])
        model = stages[model["from"]].model or {}
    preset = model.get("preset")
    return PRESETS[preset].arch if preset in PRESETS else None


def preflight_export(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """Before any stage trains: the target must be reachable for the architecture the recipe builds
    (`toolkit arch check`'s verdict), and `eval:` on an export stage answers the held-out questions in
    llama.cpp: a GGUF's only."""
    from export.gguf import gguf_plan
    from export.vllm import choose_route
    from toolkit.errors import ExportError

    target = (stage.options or {}).get("target")
    arch = origin_architecture(stage, recipe)
    if arch is not None and target in ("gguf", "vllm"):
        try:
            gguf_plan(arch) if target == "gguf" else choose_route(arch)
        except ExportError as error:
            problems.add(
                f"{at}.export.target: {target}: {error}; `toolkit export hf` serves every architecture"
            )
    if target in ("vllm", "hf") and stage.eval:
        problems.add(
            f"{at}.eval: a {target} export is evaluated by an evaluate stage naming it "
            f"({{method: evaluate, evaluate: {{models: [{stage.name}], tasks: [...]}}}})"
        )


def register() -> None:
    register_stage(
        StageKind(
            "export",
            run=run_export,
            description="an earlier stage's model as a verified GGUF + Ollama Modelfile (gguf/), vLLM folder "
            "(vllm/) or Hub folder (hf/)",
            keys=("model", "eval"),
            section="export",
            schema=ExportOptions,
            preflight=preflight_export,
        )
    )
