"""`toolkit eval`: argparse wiring, contributed to the `toolkit` command through the `forge_toolkit.cli` entry
point."""

from __future__ import annotations

import argparse
import json
from typing import Any


def run_eval(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from eval.stages import EvalOptions, evaluate_model, load_model_folder

    model, tokenizer = load_model_folder(args.model)
    options = EvalOptions(tasks=args.tasks, perplexity=args.perplexity, limit=args.limit)
    result = evaluate_model(model, tokenizer, asdict(options))
    print(json.dumps(result, indent=2))
    return 0


def register_commands(groups: dict[str, Any]) -> None:
    """Add `eval` to the `toolkit` command."""
    evaluate = groups["toolkit"].add_parser("eval", help="evaluate a model folder")
    evaluate.add_argument("model")
    evaluate.add_argument("--tasks", help="checkable-task jsonl (task, prompt, answer)")
    evaluate.add_argument("--perplexity", help="jsonl with a text column")
    evaluate.add_argument("--limit", type=int)
    evaluate.set_defaults(func=run_eval)
