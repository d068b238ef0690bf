"""`toolkit eval`: argparse wiring, contributed to the `toolkit` command through the `forge_toolkit.cli` entry
point."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def is_task_file(tasks: str | None) -> bool:
    """`--tasks` names a checkable-task file (task, prompt, answer rows) rather than lm-eval tasks."""
    return bool(tasks) and (tasks.endswith(".jsonl") or Path(tasks).is_file())


def run_eval(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from eval.stages import EvalOptions, evaluate_model, load_model_folder

    model, tokenizer = load_model_folder(args.model)
    if args.tasks and not is_task_file(args.tasks):
        return run_harness(args, model, tokenizer)
    options = EvalOptions(tasks=args.tasks, perplexity=args.perplexity, limit=args.limit)
    result = evaluate_model(model, tokenizer, asdict(options))
    print(json.dumps(result, indent=2))
    return 0


def run_harness(args: argparse.Namespace, model: Any, tokenizer: Any) -> int:
    """lm-eval tasks on the folder; results and a markdown table in <model>/eval/<timestamp>/."""
    import time

    from eval.harness import markdown_table, run_tasks
    from toolkit.io import write_json, write_text

    folder = Path(args.model)
    result = run_tasks(
        model,
        tokenizer,
        [name.strip() for name in args.tasks.split(",") if name.strip()],
        include_path=args.include_path,
        limit=args.limit,
        chat_template=args.chat_template,
        artifact=str(folder.resolve()),
    )
    out = folder / "eval" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    table = markdown_table({folder.name: result})
    write_text(out / "report.md", table + "\n")
    if args.json:
        print(json.dumps(result["results"]))
    else:
        print(table)
        print(f"results: {out / 'results.json'}")
    return 0


def register_commands(groups: dict[str, Any]) -> None:
    """Add `eval` to the `toolkit` command."""
    evaluate = groups["toolkit"].add_parser("eval", help="evaluate a model folder")
    evaluate.add_argument("model")
    evaluate.add_argument(
        "--tasks",
        help="lm-eval tasks, comma-separated (the toolkit's own: forge_heldout, forge_heldout_choice, "
        "forge_corpus; any name lm-eval knows), or a checkable-task jsonl (task, prompt, answer)",
    )
    evaluate.add_argument("--perplexity", help="jsonl with a text column")
    evaluate.add_argument("--limit", type=int, help="documents per task (rows of a jsonl)")
    evaluate.add_argument(
        "--include-path", action="append", default=None, help="a folder of lm-eval task YAMLs (repeatable)"
    )
    evaluate.add_argument(
        "--chat-template",
        action="store_true",
        help="lm-eval: prompts through the model's chat template (recorded with the results; default off)",
    )
    evaluate.add_argument("--json", action="store_true", help="lm-eval: print only the results mapping")
    evaluate.set_defaults(func=run_eval)
