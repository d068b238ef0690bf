"""Evaluation in recipes, registered in the stage registry through the `forge_toolkit.stages` entry point, so
that the runner runs it without importing this package.

The `eval:` section of a training stage: what the stage's model scores on held-out data, in its `eval.json`.

    eval: {tasks: data/eval/heldout.jsonl, perplexity: data/corpus/valid.jsonl, samples: 4}

The `evaluate` stage: earlier stages' artifacts (a stage's model, an export stage's GGUF or vLLM folder) or
any model `toolkit eval` takes, side by side on lm-eval tasks and perplexity, and a win-rate of one against
another; the table in `<run>/<stage>/report.md`, every number in `results.json`.

    - name: evaluate
      method: evaluate
      evaluate:
        models: [sft, dpo, gguf]
        tasks: [forge_heldout, forge_heldout_choice]
        perplexity: data/corpus/valid.jsonl
        win_rate: {model: dpo, against: sft, prompts: data/eval/heldout.jsonl}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.io import read_jsonl
from toolkit.stages import SectionHook, register_section


@dataclass
class EvalOptions:
    """A stage's `eval:` section."""

    tasks: str | None = field(
        default=None, metadata={"input": "file"}
    )  # checkable tasks: task, prompt, answer
    perplexity: str | None = field(default=None, metadata={"input": "file"})  # jsonl with a text column
    stride: int | None = None  # perplexity over a sliding 256-token window moved this far (default: none)
    max_new_tokens: int | None = None  # default: the longest right answer in `tasks` + 8 (answer_budget)
    limit: int | None = None  # the first N rows of `tasks`
    batch_size: int = 32
    samples: int = 5  # answers kept in eval.json to read
    before: bool = False  # also the stage's starting model, before it trains (kept under "before")
    show_thoughts: bool = False  # a thought model's samples carry its whole completion, thought included
    sampled: int = 0  # also N answers per prompt drawn at `temperature`: their mean score (an RL reward)
    temperature: float = 1.0


def load_model_folder(folder: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an HF model folder, any registered architecture, weights from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import register_auto_classes

    register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True), AutoTokenizer.from_pretrained(
        folder
    )


def evaluate_model(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Task accuracy on a checkable-task file and/or perplexity on a text file, for a model in memory; `spec`
    is an `eval:` section (EvalOptions, every field present)."""
    from eval.accuracy import task_accuracy
    from eval.perplexity import perplexity

    result: dict[str, Any] = {}
    if spec["tasks"]:
        rows = read_jsonl(spec["tasks"])[: spec["limit"]]
        result["tasks"] = task_accuracy(
            model,
            tokenizer,
            rows,
            max_new_tokens=spec["max_new_tokens"],
            batch_size=spec["batch_size"],
            samples=spec["samples"],
            show_thoughts=spec.get("show_thoughts", False),
            sampled=spec.get("sampled", 0),
            temperature=spec.get("temperature", 1.0),
        )
    if spec["perplexity"]:
        texts = [r["text"] for r in read_jsonl(spec["perplexity"])]
        result["perplexity"] = perplexity(model, tokenizer, texts, stride=spec["stride"])
    return result


def evaluate_stage(context: Any, outcome: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The hook: the stage's model as it left training (or reloaded from its `final/`)."""
    model, tokenizer = outcome.model, outcome.tokenizer
    if model is None:
        model, tokenizer = load_model_folder(outcome.final)
    return evaluate_model(model, tokenizer, spec)


def evaluate_start(context: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The same measures on the model the stage starts from (its `model:`), before training."""
    from toolkit.train.trainer_stage import load_model, load_tokenizer

    run_dir = context.run_folder.path
    tokenizer = load_tokenizer(context.stage, run_dir)
    return evaluate_model(load_model(context.stage, run_dir, tokenizer), tokenizer, spec)


WIN_RATE_KEYS = ("model", "against", "prompts", "judge", "judge_model", "max_new_tokens", "limit")


@dataclass
class EvaluateOptions:
    """An evaluate stage's `evaluate:` section."""

    models: list[str] = field(default_factory=list)  # stage names, folders, GGUF files or Hub ids
    # lm-eval task names: the toolkit's own (eval/tasks/) or any lm-eval knows
    tasks: list[str] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)  # folders of lm-eval task YAMLs
    limit: int | None = None  # documents per task
    chat_template: bool = False
    perplexity: str | None = field(default=None, metadata={"input": "file"})  # jsonl with a text column
    stride: int | None = None
    # {model (default: the last of `models`), against, prompts, judge, judge_model, max_new_tokens, limit}
    win_rate: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from toolkit.errors import unknown_key_message

        if not self.models:
            raise ValueError("models: name the stages (or folders, GGUF files, Hub ids) to evaluate")
        if not (self.tasks or self.perplexity or self.win_rate):
            raise ValueError("nothing to measure: give tasks, perplexity or win_rate")
        if self.win_rate is not None:
            unknown = [k for k in self.win_rate if k not in WIN_RATE_KEYS]
            if unknown:
                raise ValueError("win_rate: " + unknown_key_message(unknown[0], WIN_RATE_KEYS, "win_rate"))
            for key in ("against", "prompts"):
                if not self.win_rate.get(key):
                    raise ValueError(f"win_rate.{key} is required")
            if not Path(self.win_rate["prompts"]).is_file():
                raise ValueError(f"win_rate.prompts: file not found: {self.win_rate['prompts']}")


def preflight_evaluate(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """Names in `models` and `win_rate` that are stages must be earlier stages (a later one has no artifact
    yet); a name that is no stage must be a path that exists or a Hub id."""
    from eval.artifacts import HUB_ID
    from toolkit.stages import find_earlier

    options = stage.options or {}
    named = [("models", m) for m in options.get("models") or []]
    named += [(f"win_rate.{k}", (options.get("win_rate") or {}).get(k)) for k in ("model", "against")]
    for key, name in named:
        if not isinstance(name, str):
            continue
        ref = find_earlier(recipe, stage, name)
        if ref.later:
            problems.add(f"{at}.evaluate.{key}: stage '{name}' runs after this one")
        elif not ref.is_stage and not Path(name).exists() and not HUB_ID.match(name):
            from toolkit.errors import nearest

            guess = nearest(name, ref.earlier)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            problems.add(f"{at}.evaluate.{key}: '{name}' is no earlier stage, path or Hub id{hint}")


def stage_artifact(ctx: Any, name: str) -> Any:
    """The artifact a name in `evaluate:` stands for: an earlier stage's model (its `final/`), an export
    stage's GGUF or vLLM folder, else what `toolkit eval` takes; results go under this stage's folder."""
    from eval.artifacts import resolve

    stages = {s.name: s for s in ctx.run_folder.stages()}
    if name in stages:
        stage = stages[name]
        done = stage.outcome() or {}
        target = done.get("gguf") or done.get("vllm") or (str(stage.final) if stage.has_model else None)
        if target is None:
            from toolkit.errors import ToolkitError

            raise ToolkitError(f"stages.{ctx.stage.name}.evaluate: stage '{name}' left no model to evaluate")
        artifact = resolve(target)
    else:
        artifact = resolve(name)
    artifact.src = name
    artifact.eval_dir = ctx.folder.path / name.replace("/", "--")
    return artifact


def run_evaluate(ctx: Any) -> Any:
    """The side-by-side table (and the win-rate) of the stage's `evaluate:` section."""
    from eval.compare import save_table, side_by_side
    from toolkit.stages import StageOutcome
    from toolkit.train.runner import distributed_state

    folder = ctx.folder.path
    if not distributed_state().is_main_process:
        return StageOutcome(final=folder)
    spec = ctx.stage.options
    artifacts = [stage_artifact(ctx, name) for name in spec["models"]]
    rows = {}
    if spec["tasks"] or spec["perplexity"]:
        rows = side_by_side(
            artifacts,
            tasks=spec["tasks"],
            include_path=spec["include_path"],
            limit=spec["limit"],
            chat_template=spec["chat_template"],
            perplexity=spec["perplexity"],
            stride=spec["stride"],
        )
    extra, evaluation = "", {}
    if spec["win_rate"]:
        evaluation["win_rate"] = stage_win_rate(ctx, spec["win_rate"], spec["models"][-1])
        extra = evaluation["win_rate"]["table"]
    report = save_table(rows, folder, extra) if rows else extra
    if not rows:
        from toolkit.io import write_text

        write_text(folder / "report.md", report + "\n")
    evaluation |= {"report": report, "artifacts": {name: r["saved"] for name, r in rows.items()}}
    print(f"[{ctx.stage.name}] side-by-side table: {folder / 'report.md'}")
    return StageOutcome(final=folder, eval=evaluation, details={"report": str(folder / "report.md")})


def stage_win_rate(ctx: Any, spec: dict[str, Any], default_model: str) -> dict[str, Any]:
    """`win_rate:` of an evaluate stage: winrate.json, verdicts.jsonl in `<stage>/win-rate/`."""
    from eval.winrate import evaluate_win_rate, save_win_rate

    result, verdicts = evaluate_win_rate(
        stage_artifact(ctx, spec.get("model") or default_model),
        stage_artifact(ctx, spec["against"]),
        spec["prompts"],
        limit=spec.get("limit"),
        judge=spec.get("judge"),
        judge_model=spec.get("judge_model"),
        max_new_tokens=int(spec.get("max_new_tokens") or 64),
    )
    return result | {"table": save_win_rate(ctx.folder.path / "win-rate", result, verdicts)}


def register() -> None:
    from eval.diversity import register as register_diversity
    from toolkit.stages import StageKind, register_stage

    register_diversity()

    register_stage(
        StageKind(
            "evaluate",
            run=run_evaluate,
            description="earlier stages' models and exports side by side: lm-eval tasks, perplexity, win-rate",
            section="evaluate",
            schema=EvaluateOptions,
            preflight=preflight_evaluate,
        )
    )
    register_section(
        SectionHook(
            "eval",
            EvalOptions,
            evaluate_stage,
            "held-out task accuracy and perplexity of the stage's model",
            before=evaluate_start,
        )
    )
