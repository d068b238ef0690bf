"""The `eval:` section of a recipe stage: what the stage's model scores on held-out data, written to its
`eval.json`. Registered in the stage registry through the `forge_toolkit.stages` entry point, so that the
runner runs it without importing this package.

    eval: {tasks: data/eval/heldout.jsonl, perplexity: data/corpus/valid.jsonl, samples: 4}
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
    max_new_tokens: int = 24
    limit: int | None = None  # the first N rows of `tasks`
    batch_size: int = 32
    samples: int = 5  # answers kept in eval.json to read
    before: bool = False  # also the stage's starting model, before it trains (kept under "before")


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


def register() -> None:
    register_section(
        SectionHook(
            "eval",
            EvalOptions,
            evaluate_stage,
            "held-out task accuracy and perplexity of the stage's model",
            before=evaluate_start,
        )
    )
