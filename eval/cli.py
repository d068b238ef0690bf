"""`toolkit eval`: argparse wiring, contributed to the `toolkit` command through the `forge_toolkit.cli` entry
point."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from toolkit.io import print_result


def is_task_file(tasks: str | None) -> bool:
    """`--tasks` names a checkable-task file (task, prompt, answer rows) rather than lm-eval tasks."""
    return bool(tasks) and (tasks.endswith(".jsonl") or Path(tasks).is_file())


def run_eval(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from eval.stages import EvalOptions, evaluate_model, load_model_folder
    from toolkit.run_folder import model_folder_of

    if args.against:
        return run_win_rate(args)
    if args.analysis:
        return run_analysis(args)
    if args.tasks and not is_task_file(args.tasks):
        return run_harness(args)
    if args.perplexity and not args.tasks:
        return run_perplexity(args)
    if len(args.model) > 1:
        from toolkit.errors import ToolkitError

        raise ToolkitError(
            "a checkable-task file evaluates one model; lm-eval tasks and --perplexity take several"
        )
    model, tokenizer = load_model_folder(model_folder_of(args.model[0])[0])
    options = EvalOptions(
        tasks=args.tasks,
        perplexity=args.perplexity,
        limit=args.limit,
        stride=args.stride,
        show_thoughts=args.show_thoughts,
    )
    result = evaluate_model(model, tokenizer, asdict(options))
    print_result(json.dumps(result, indent=2))
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    """Perplexity of each SRC on the same text, a checkpoint in transformers and a GGUF file in llama.cpp (its
    own tokenizer and logits): one SRC prints its result as JSON, several print one table (tokens counted)."""
    from eval.artifacts import resolve
    from eval.compare import artifact_perplexity
    from toolkit.io import read_jsonl

    texts = [row["text"] for row in read_jsonl(args.perplexity)]
    artifacts = [resolve(src) for src in args.model]
    rows = {}
    for artifact in artifacts:
        result = artifact_perplexity(artifact, texts, args.stride)
        rows[artifact.src] = {
            **result,
            "dtype": artifact.dtype,
            "kind": artifact.kind,
            "text": args.perplexity,
        }
    if len(rows) == 1:
        print_result(json.dumps({"perplexity": next(iter(rows.values()))}, indent=2))
        return 0
    print("| artifact | dtype | perplexity | tokens |\n|---|---|---:|---:|")
    for src, result in rows.items():
        print(f"| {src} | {result['dtype']} | {result['perplexity']:.4f} | {result['tokens']} |")
    window = (
        f"sliding window 256, stride {args.stride}" if args.stride else "non-overlapping 256-token windows"
    )
    print(f"\ntext {args.perplexity}; {window}")
    return 0


def run_analysis(args: argparse.Namespace) -> int:
    """eval/analysis.py on each SRC (transformers): analysis.json and attention-entropy.png in its eval
    folder, a short report on stdout (or, with --json, the results)."""
    import time

    from eval.analysis import analyse, analysis_text
    from eval.artifacts import resolve
    from eval.winrate import prompt_text
    from toolkit.errors import ToolkitError
    from toolkit.io import read_jsonl, write_json

    if not args.prompts:
        raise ToolkitError("--analysis needs --prompts FILE (jsonl with a prompt column) to generate from")
    rows = read_jsonl(args.prompts)[: args.limit or 32]
    prompts = [prompt_text(row, args.prompts, line) for line, row in enumerate(rows, 1)]
    texts = [row["text"] for row in read_jsonl(args.perplexity)[:8]] if args.perplexity else prompts[:8]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for src in args.model:
        artifact = resolve(src)
        if artifact.kind == "gguf":
            raise ToolkitError(
                f"{src}: --analysis reads attention and counts FLOPs in transformers; pass the "
                "checkpoint the GGUF was exported from"
            )
        model, tokenizer = artifact.load()
        out = artifact.eval_dir / stamp
        result = analyse(
            model, tokenizer, prompts, texts, max_new_tokens=args.max_new_tokens,
            heatmap_path=out / "attention-entropy.png", title=f"attention entropy: {src}",
        )  # fmt: skip
        result |= {
            "artifact": artifact.path,
            "prompts": args.prompts,
            "texts": args.perplexity or args.prompts,
        }
        write_json(out / "analysis.json", result)
        results[src] = result
        if not args.json:
            print(f"## {src}\n{analysis_text(result)}\nresults: {out / 'analysis.json'}\n")
    if args.json:
        print_result(json.dumps(results[args.model[0]] if len(results) == 1 else results))
    return 0


def run_win_rate(args: argparse.Namespace) -> int:
    """SRC against `--against` on `--prompts` (eval/winrate.py): the table on stdout (or, with --json, the
    result), winrate.json, verdicts.jsonl (every answer and verdict) and report.md in SRC's eval folder."""
    import time

    from eval.artifacts import resolve
    from eval.winrate import evaluate_win_rate, save_win_rate
    from toolkit.errors import ToolkitError

    if len(args.model) != 1 or not args.prompts:
        raise ToolkitError("--against BASE takes one SRC and --prompts FILE (jsonl: prompt, optional answer)")
    model = resolve(args.model[0])
    result, verdicts = evaluate_win_rate(
        model,
        resolve(args.against),
        args.prompts,
        limit=args.limit,
        judge=args.judge,
        judge_model=args.judge_model,
        max_new_tokens=args.max_new_tokens,
    )
    out = model.eval_dir / time.strftime("%Y%m%d-%H%M%S")
    table = save_win_rate(out, result, verdicts)
    if args.json:
        print_result(json.dumps(result))
    else:
        print(table)
        print(f"verdicts: {out / 'verdicts.jsonl'}")
    return 0


def run_harness(args: argparse.Namespace) -> int:
    """lm-eval tasks (and --perplexity) on each SRC, one after the other (eval/compare.py); each SRC's results
    and table in its own eval folder (`eval.artifacts`), one side-by-side table of all on stdout (or, with
    --json, the results mappings)."""
    from eval.artifacts import resolve
    from eval.compare import side_by_side
    from eval.harness import markdown_table

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    artifacts = [resolve(src) for src in args.model]  # every SRC checked before the first runs
    rows = side_by_side(
        artifacts,
        tasks=tasks,
        include_path=args.include_path,
        limit=args.limit,
        chat_template=args.chat_template,
        perplexity=args.perplexity,
        stride=args.stride,
    )
    if args.json:
        mappings = {src: result["results"] for src, result in rows.items()}
        print_result(json.dumps(mappings[args.model[0]] if len(rows) == 1 else mappings))
    else:
        print(markdown_table(rows))
        for result in rows.values():
            print(f"results: {result['saved']}")
    return 0


def register_commands(groups: dict[str, Any]) -> None:
    """Add `eval` to the `toolkit` command."""
    evaluate = groups["toolkit"].add_parser("eval", help="evaluate a model folder")
    evaluate.add_argument(
        "model",
        nargs="+",
        help="model, stage or run folder, GGUF file, vLLM folder or Hub id (several: one side-by-side table)",
    )
    evaluate.add_argument(
        "--tasks",
        help="lm-eval tasks, comma-separated (the toolkit's own: forge_heldout, forge_heldout_choice, "
        "forge_corpus; any name lm-eval knows), or a checkable-task jsonl (task, prompt, answer)",
    )
    evaluate.add_argument("--perplexity", help="jsonl with a text column")
    evaluate.add_argument(
        "--stride",
        type=int,
        default=None,
        help="perplexity: slide the 256-token window this far (default: none)",
    )
    evaluate.add_argument("--limit", type=int, help="documents per task (rows of a jsonl)")
    evaluate.add_argument(
        "--include-path", action="append", default=None, help="a folder of lm-eval task YAMLs (repeatable)"
    )
    evaluate.add_argument(
        "--chat-template",
        action="store_true",
        help="lm-eval: prompts through the model's chat template (recorded with the results; default off)",
    )
    evaluate.add_argument(
        "--json",
        action="store_true",
        help="lm-eval: print only the results mapping (several SRCs: one mapping per SRC)",
    )
    evaluate.add_argument("--against", metavar="BASE", help="win-rate of SRC against BASE on --prompts")
    evaluate.add_argument(
        "--prompts",
        help="win-rate: jsonl of prompts; rows with an `answer` are scored exactly, others judged",
    )
    evaluate.add_argument(
        "--judge",
        help="win-rate: the pairwise judge of open prompts, a model (folder or Hub id) or an "
        "OpenAI-compatible URL (asked in both orders)",
    )
    evaluate.add_argument(
        "--judge-model", help="win-rate: the model name at the judge URL (default: its first)"
    )
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=64, help="win-rate: tokens per answer (greedy; default 64)"
    )
    evaluate.add_argument(
        "--analysis",
        action="store_true",
        help="distinct-n, repetition and length of generations for --prompts, attention entropy heat-map "
        "(on --perplexity texts, else the prompts), parameters, FLOPs/token, tokens/s, memory",
    )
    evaluate.add_argument(
        "--show-thoughts",
        action="store_true",
        help="a model with thought tokens: print its whole completions, thoughts included (accuracy is "
        "reported with thoughts and with them ablated either way)",
    )
    evaluate.set_defaults(func=run_eval)
