"""The `toolkit` command: one subcommand per job (train, arch, data, eval, export, serve, push).

Errors about the user's input (`ToolkitError`) end with one message and exit status 2, no traceback.
Heavy libraries are imported inside each command, so `toolkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from toolkit.errors import ToolkitError


def cmd_train(args: argparse.Namespace) -> int:
    from toolkit import recipe as recipes
    from toolkit.train import run
    from toolkit.train.summary import format_summary

    recipe = recipes.load(args.recipe, overrides=args.overrides)
    if args.output_dir:
        recipe.output_dir = Path(args.output_dir)
    results = run(recipe, resume=args.resume, overwrite=args.overwrite)
    from toolkit.train.runner import distributed_state

    if distributed_state().is_main_process:
        print()
        print(format_summary(recipe.output_dir, results))
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def cmd_arch_list(args: argparse.Namespace) -> int:
    from toolkit.models import ARCHITECTURES, PRESETS, build_config, count_parameters

    print(f"{'preset':<16} {'arch':<10} {'parameters':>14}  description")
    for name, preset in PRESETS.items():
        n = count_parameters(build_config(name))
        print(f"{name:<16} {preset.arch:<10} {n:>14,}  {preset.description}")
    print("\narchitectures: " + ", ".join(f"{a.name} ({a.description})" for a in ARCHITECTURES.values()))
    return 0


def cmd_arch_info(args: argparse.Namespace) -> int:
    from toolkit.models import build_config, get_preset, memory_estimate

    preset = get_preset(args.preset)
    config = build_config(args.preset)
    estimate = memory_estimate(config)
    if args.json:
        print(
            json.dumps(
                {"preset": preset.name, "arch": preset.arch, "quoted": preset.quoted, **estimate}, indent=2
            )
        )
        return 0
    print(f"{preset.name}: {preset.arch}, {estimate['parameters']:,} parameters ({preset.description})")
    if preset.quoted:
        n = estimate["parameters"]
        print(f"  counted here: {n / 1e9:.2f}B, {4 * n / 1e9:.1f} GB fp32; {preset.quoted}")
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    print("  " + ", ".join(f"{k}={getattr(config, k)}" for k in shape if hasattr(config, k)))
    print(f"\nInference (weights + KV cache for one sequence of {estimate['context']} tokens):")
    for dtype, parts in estimate["inference"].items():
        print(f"  {dtype:<9} weights {_gib(parts['weights']):>11}   kv cache {_gib(parts['kv_cache']):>11}")
    print("\nFull training with AdamW (activations not included):")
    for regime, parts in estimate["training"].items():
        print(
            f"  {regime:<10} weights {_gib(parts['weights']):>11}  grads {_gib(parts['gradients']):>11}  "
            f"optimizer {_gib(parts['optimizer']):>11}  total {_gib(parts['total']):>11}"
        )
    return 0


def cmd_arch_check(args: argparse.Namespace) -> int:
    """Exit 0 when every export target is reachable, 1 when one is blocked (2: unknown name)."""
    from export.check import check, format_check

    result = check(args.name)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_check(result))
    return 0 if result.ok else 1


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from toolkit.data.tokenizer import train_tokenizer

    for path in args.corpus:
        if not Path(path).exists():
            raise ToolkitError(f"corpus file not found: {path}")
    tokenizer = train_tokenizer(
        args.corpus, vocab_size=args.vocab_size, out_dir=args.out, min_frequency=args.min_frequency
    )
    print(f"tokenizer with {len(tokenizer)} tokens written to {args.out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from toolkit.data.loading import check_file

    problems = [p for path in args.files for p in check_file(path, format=args.format, kind=args.kind)]
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{', '.join(args.files)}: ok")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import register_auto_classes
    from toolkit.train.runner import evaluate_stage

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    result = evaluate_stage(
        model, tokenizer, {"tasks": args.tasks, "perplexity": args.perplexity, "limit": args.limit}
    )
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a recipe (all its stages)")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument(
        "overrides", nargs="*", help="dotted.key=value overrides, e.g. stages.sft.train.max_steps=5"
    )
    train.add_argument(
        "--resume", action="store_true", help="skip finished stages, resume from the last checkpoint"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run of the same name first"
    )
    train.add_argument("--output-dir", help="run folder (default runs/<recipe name>)")
    train.set_defaults(func=cmd_train)

    arch = commands.add_parser("arch", help="architectures and presets").add_subparsers(
        dest="arch", required=True
    )
    arch.add_parser("list", help="every preset with its parameter count").set_defaults(func=cmd_arch_list)
    info = arch.add_parser("info", help="parameters and memory for inference and training")
    info.add_argument("preset")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_arch_info)
    arch_check = arch.add_parser(
        "check",
        help="which exports (GGUF, vLLM native, vLLM Transformers backend, Hub remote code) an architecture "
        "reaches, and what blocks the others; exit 1 when one is blocked",
    )
    arch_check.add_argument(
        "name", help="architecture (decoder), preset (prometheus-125m) or HF model folder"
    )
    arch_check.add_argument("--json", action="store_true")
    arch_check.set_defaults(func=cmd_arch_check)

    data = commands.add_parser("data", help="datasets and tokenizers").add_subparsers(
        dest="data", required=True
    )
    tok = data.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok.add_argument(
        "--corpus", nargs="+", required=True, help="text files (.txt or jsonl with a text column)"
    )
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--min-frequency", type=int, default=2)
    tok.add_argument("--out", required=True)
    tok.set_defaults(func=cmd_data_tokenizer)
    check = data.add_parser("check", help="report every problem in data files")
    check.add_argument("files", nargs="+")
    check.add_argument("--format", default="auto")
    check.add_argument("--kind", default=None, help="text, messages, preference or prompt")
    check.set_defaults(func=cmd_data_check)

    evaluate = commands.add_parser("eval", help="evaluate a model folder")
    evaluate.add_argument("model")
    evaluate.add_argument("--tasks", help="checkable-task jsonl (task, prompt, answer)")
    evaluate.add_argument("--perplexity", help="jsonl with a text column")
    evaluate.add_argument("--limit", type=int)
    evaluate.set_defaults(func=cmd_eval)

    export = commands.add_parser("export", help="export a model (GGUF, Ollama, ...)")
    export_commands = export.add_subparsers(dest="export", required=True)
    from export.cli import register
    from export.cli_top import register_top_level

    register(export_commands)
    register_top_level(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
