"""The `toolkit` command: one subcommand per job (train, sweep, methods, merge, merge-adapter, arch, data, eval,
export, serve, push).

eval, export, serve, push and `arch check` come from the eval and export packages, through the
`forge_toolkit.cli` entry points.

Errors about the user's input (`ToolkitError`) end with one message and exit status 2, no traceback.
Heavy libraries are imported inside each command, so `toolkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.io import human_bytes, print_result, result_on_stdout

CLI_ENTRY_POINTS = "forge_toolkit.cli"


def cmd_train(args: argparse.Namespace) -> int:
    from toolkit import recipe as recipes
    from toolkit.train import run
    from toolkit.train.summary import format_summary

    recipe = recipes.load(args.recipe, overrides=args.overrides)
    if args.output_dir:
        recipe.output_dir = Path(args.output_dir)
    results = run(recipe, resume=args.resume, overwrite=args.overwrite, resume_changed=args.resume_changed)
    from toolkit.train.runner import distributed_state

    if distributed_state().is_main_process:
        print()
        print(format_summary(recipe.output_dir, results))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Every method a recipe stage can name (the stage registry), with its section and `train:` schema."""
    from toolkit.stages import section_hooks, stage_kinds

    kinds = stage_kinds().values()
    width = max(12, *(len(kind.method) for kind in kinds))
    print(f"{'method':<{width}} {'sections':<16} {'train: schema':<18} description")
    for kind in kinds:
        schema = kind.trainer.config.partition(":")[2] if kind.trainer else "-"
        own = (
            ", ".join([*([kind.section] if kind.section else []), *(key for key, _ in kind.sections)]) or "-"
        )
        print(f"{kind.method:<{width}} {own:<16} {schema:<18} {kind.description}")
    hooks = section_hooks()
    if hooks:
        print(
            "\nsections a stage may carry: "
            + ", ".join(f"{h.section}: ({h.description})" for h in hooks.values())
        )
    return 0


def cmd_arch_list(args: argparse.Namespace) -> int:
    from toolkit.models import ARCHITECTURES, PRESETS, build_config, count_parameters

    width = max(16, *(len(name) for name in PRESETS))
    print(f"{'preset':<{width}} {'arch':<10} {'parameters':>14}  description")
    for name, preset in PRESETS.items():
        n = count_parameters(build_config(name))
        print(f"{name:<{width}} {preset.arch:<10} {n:>14,}  {preset.description}")
    print("\narchitectures: " + ", ".join(f"{a.name} ({a.description})" for a in ARCHITECTURES.values()))
    return 0


def cmd_arch_info(args: argparse.Namespace) -> int:
    from toolkit.models import build_config, get_preset, memory_estimate

    preset = get_preset(args.preset)
    config = build_config(args.preset)
    estimate = memory_estimate(config)
    if args.json:
        print_result(
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
    if any(hasattr(config, k) for k in shape):
        print("  " + ", ".join(f"{k}={getattr(config, k)}" for k in shape if hasattr(config, k)))
    for line in getattr(config, "describe_parameters", lambda n: [])(estimate["parameters"]):
        print(f"  {line}")
    if estimate["stack_applications"] > 1:
        print(
            f"  the block stack runs {estimate['stack_applications']} times per token (one KV slot each, "
            f"{estimate['kv_tokens']} tokens kept per slot)"
        )
    if estimate["context"]:
        print(f"\nInference (weights + KV cache for one sequence of {estimate['context']} tokens):")
    else:
        print("\nInference (weights):")
    for dtype, parts in estimate["inference"].items():
        print(
            f"  {dtype:<9} weights {human_bytes(parts['weights']):>11}   kv cache {human_bytes(parts['kv_cache']):>11}"
        )
    print("\nFull training with AdamW (activations not included):")
    for regime, parts in estimate["training"].items():
        print(
            f"  {regime:<10} weights {human_bytes(parts['weights']):>11}  grads {human_bytes(parts['gradients']):>11}  "
            f"optimizer {human_bytes(parts['optimizer']):>11}  total {human_bytes(parts['total']):>11}"
        )
    return 0


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


def cmd_chat(args: argparse.Namespace) -> int:
    from toolkit.chat import chat, load
    from toolkit.run_folder import model_folder_of

    model, tokenizer = load(str(model_folder_of(args.model)[0]), args.trust_remote_code)
    interactive = not args.prompt and sys.stdin.isatty()
    if interactive:
        print("one message per line; Ctrl-D ends", file=sys.stderr)
    chat(
        model,
        tokenizer,
        args.prompt or sys.stdin,
        show_thoughts=args.show_thoughts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        history=not args.prompt,  # each --prompt is asked on its own
    )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from toolkit.runs import compare, compare_text, find_runs, run_folder, run_row, runs_table

    if args.dir == "compare":
        if len(args.pair) != 2:
            raise ToolkitError("toolkit runs compare A B: two run folders")
        diff = compare(run_folder(args.pair[0]), run_folder(args.pair[1]))
        print_result(json.dumps(diff, indent=2, default=str) if args.json else compare_text(diff))
        return 0
    if args.pair:
        raise ToolkitError(
            f"unexpected {' '.join(args.pair)}: `toolkit runs [DIR]` or `toolkit runs compare A B`"
        )
    runs = find_runs(args.dir)
    if not runs:
        raise ToolkitError(f"no run folders (a recipe.yaml inside) in {args.dir}")
    rows = [run_row(run) for run in runs]
    print_result(json.dumps(rows, indent=2) if args.json else runs_table(rows))
    return 0


def cmd_merge_adapter(args: argparse.Namespace) -> int:
    """Merge a LoRA/QLoRA adapter into its full-precision base (toolkit.train.adapters)."""
    from toolkit.run_folder import RunFolder, model_folder_of
    from toolkit.train.adapters import format_report, merge_adapter

    if args.stage:
        run = RunFolder.containing(args.src)
        if run is None:
            raise ToolkitError(f"--stage needs a run folder (a recipe.yaml inside); {args.src} is none")
        adapter = run.stage(args.stage).final
    else:
        adapter, _ = model_folder_of(args.src)
    if not (adapter / "adapter_config.json").exists():
        raise ToolkitError(f"{adapter} holds full weights, not a LoRA adapter: there is nothing to merge")
    # A stage's merge goes beside its final/ (where the runner puts it); a bare adapter folder's beside it.
    default = (
        adapter.parent / "merged" if adapter.name == "final" else adapter.with_name(adapter.name + "-merged")
    )
    report = merge_adapter(
        adapter, Path(args.out) if args.out else default, base=args.base, prompts=args.prompt
    )
    print_result(json.dumps(vars(report), indent=2) if args.json else format_report(report))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """A mergekit config (or ours: dfs) run through mergekit, checked and reported (toolkit.merge)."""
    from toolkit.merge.config import read_config
    from toolkit.merge.run import format_report, merge_documents

    report = merge_documents(
        read_config(args.config),
        args.out,
        seed=args.seed,
        allow_crimes=args.allow_crimes,
        trust_remote_code=args.trust_remote_code,
        where=args.config,
    )
    print_result(json.dumps(vars(report), indent=2, default=str) if args.json else format_report(report))
    return 0


def cmd_evolve(args: argparse.Namespace) -> int:
    """Merge recipes evolved over a set of models (toolkit.merge.evolve)."""
    from toolkit.merge.config import read_config
    from toolkit.merge.evolve import evolve, parse_options, report_table

    documents = read_config(args.config)
    if len(documents) != 1:
        raise ToolkitError(
            f"{args.config}: one YAML document (models, base_model, generations, fitness, ...)"
        )
    state = evolve(parse_options(documents[0], args.config), Path(args.out), resume=args.resume)
    print()
    print(report_table(state))
    print(f"champion: {state['champion']['folder']}; {Path(args.out) / 'plots' / 'fitness.png'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from toolkit import recipe as recipes
    from toolkit.sweep import parse_grid, run_sweep, sweep_table

    grid = parse_grid(args.grid)
    out = (
        Path(args.output_dir) if args.output_dir else Path("runs") / f"{recipes.load(args.recipe).name}-sweep"
    )
    state = run_sweep(args.recipe, grid, out, metric=args.metric, resume=args.resume, launch=args.launch)
    print()
    print(sweep_table(state))
    print(f"\n{out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0 if all(p["status"] == "done" for p in state["points"]) else 1


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
    train.add_argument(
        "--resume-changed",
        nargs="+",
        default=[],
        metavar="KEY",
        help="with --resume: accept these recipe keys changing since the run began (e.g. stages.sft.train.max_steps)",
    )
    train.add_argument("--output-dir", help="run folder (default runs/<recipe name>)")
    train.set_defaults(func=cmd_train)

    commands.add_parser("methods", help="the methods a recipe stage can name").set_defaults(func=cmd_methods)

    sweep = commands.add_parser("sweep", help="a grid of runs of one recipe, a table and a plot of a measure")
    sweep.add_argument("recipe", help="recipe YAML file")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a swept key and its values, e.g. stages.sft.train.learning_rate=1e-4,2e-4 (repeatable)",
    )
    sweep.add_argument("--metric", default="loss", help="MEASURE or STAGE.MEASURE to compare (default: loss)")
    sweep.add_argument("--output-dir", help="sweep folder (default runs/<recipe name>-sweep)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    sweep.add_argument("--launch", help='launcher per point, e.g. "accelerate launch --config_file C"')
    sweep.set_defaults(func=cmd_sweep)

    merge = commands.add_parser(
        "merge-adapter",
        help="merge a LoRA/QLoRA adapter into its full-precision base, with the logit drift",
        description="Merge in float32 from the full-precision base (never into 4-bit weights), resize the "
        "vocabulary to the adapter's, report the logit drift and which consumers take the adapter folder.",
    )
    merge.add_argument("src", help="run folder (its last model stage), stage folder or adapter folder")
    merge.add_argument("--stage", help="the stage of the run folder whose adapter to merge")
    merge.add_argument("--base", help="full-precision base (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--out", help="output folder (default: <stage>/merged beside the adapter's final/)")
    merge.add_argument("--prompt", action="append", help="a prompt the drift is measured on (repeatable)")
    merge.add_argument("--json", action="store_true", help="print the report as JSON")
    merge.set_defaults(func=cmd_merge_adapter)

    merge_models = commands.add_parser(
        "merge",
        help="merge models with a mergekit config (run through mergekit), or a dfs layer path",
        description="A mergekit YAML config as it is (its methods, keys and tokenizer handling), on Hub "
        "checkpoints and the toolkit's architectures; `merge_method: dfs` merges a path of layers with input "
        "scales. Inputs are checked before anything is written; the output is an HF folder with tokenizer, "
        "chat template, README.md card and merge_report.json.",
    )
    merge_models.add_argument("config", help="merge config YAML (mergekit's format)")
    merge_models.add_argument("--out", required=True, help="output folder (replaced atomically)")
    merge_models.add_argument("--seed", type=int, help="random seed (DARE, DELLA and other sampling methods)")
    merge_models.add_argument(
        "--allow-crimes", action="store_true", help="mergekit's: allow inputs of different architectures"
    )
    merge_models.add_argument(
        "--trust-remote-code", action="store_true", help="allow inputs whose code lives in their folder"
    )
    merge_models.add_argument("--json", action="store_true", help="print the report as JSON")
    merge_models.set_defaults(func=cmd_merge)

    evolve = commands.add_parser(
        "evolve",
        help="evolve merge recipes over a set of models, scored by the eval suite",
        description="A population of three-step merge recipes (linear|slerp, ties|dare_ties, frankenmerge|dfs) "
        "evolved from Agent Forge's 8 starting combinations (or by CMA-ES), resumable; writes evolve.json, "
        "evaluations.jsonl, report.md, plots/fitness.png and the champion (an HF folder with its merge.yaml).",
    )
    evolve.add_argument(
        "config", help="evolution YAML (models, base_model, generations, population, fitness, ...)"
    )
    evolve.add_argument("--out", required=True, help="evolution folder")
    evolve.add_argument("--resume", action="store_true", help="continue an interrupted evolution")
    evolve.set_defaults(func=cmd_evolve)

    runs = commands.add_parser(
        "runs",
        help="the experiment log: every run in DIR as a table; `runs compare A B` diffs two runs",
        description="toolkit runs [DIR]  |  toolkit runs compare A B",
    )
    runs.add_argument("dir", nargs="?", default="runs", help="folder of runs (default runs/), or `compare`")
    runs.add_argument("pair", nargs="*", help="compare: the two run folders")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    arch = commands.add_parser("arch", help="architectures and presets").add_subparsers(
        dest="arch", required=True
    )
    arch.add_parser("list", help="every preset with its parameter count").set_defaults(func=cmd_arch_list)
    info = arch.add_parser("info", help="parameters and memory for inference and training")
    info.add_argument("preset")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_arch_info)
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

    talk = commands.add_parser(
        "chat", help="talk to a model (folder, stage or run) through its chat template"
    )
    talk.add_argument("model", help="model folder, stage folder or run folder")
    talk.add_argument("--prompt", action="append", help="ask this and exit (repeatable; default: read stdin)")
    talk.add_argument(
        "--show-thoughts",
        action="store_true",
        help="print a thought-token model's thoughts before its answers",
    )
    talk.add_argument("--max-new-tokens", type=int, default=128)
    talk.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    talk.add_argument("--trust-remote-code", action="store_true", help="run the folder's own modelling code")
    talk.set_defaults(func=cmd_chat)

    # Commands of the other packages of the distribution (export, eval), through their entry points: nothing
    # here imports them.
    groups = {"toolkit": commands, "arch": arch, "data": data}
    for entry in sorted(entry_points(group=CLI_ENTRY_POINTS), key=lambda e: e.name):
        entry.load()(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":
        # Overrides may come anywhere after the recipe, also after options: `train R --overwrite k=v`.
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with result_on_stdout(bool(getattr(args, "json", False))):
            return args.func(args)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
