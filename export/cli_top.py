"""`toolkit serve` and `toolkit push`: the top-level commands that ship an export (argparse wiring only)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_serve(args: argparse.Namespace) -> int:
    from export.serve import format_command, run, serve_command

    argv = serve_command(
        args.src, host=args.host, port=args.port, max_model_len=args.max_model_len, adapters=args.lora
    )
    print(format_command(argv), flush=True)
    if args.run:
        run(argv)
    return 0


def run_push(args: argparse.Namespace) -> int:
    from export.hub import format_listing, push

    items, url = push(args.src, args.repo, private=args.private, dry_run=args.dry_run, license=args.license)
    if url is None:
        print(f"would upload to {args.repo}:")
        print(format_listing(items))
        return 0
    print(f"pushed {len(items)} files to {args.repo}: {url}")
    return 0


def register_top_level(commands: argparse._SubParsersAction) -> None:
    """Add `serve` and `push` to the `toolkit` command group."""
    serve = commands.add_parser("serve", help="print (or --run) the `vllm serve` command for an export")
    serve.add_argument("src", type=Path, help="folder from `toolkit export vllm`, or a run folder")
    serve.add_argument("--run", action="store_true", help="execute the command instead of printing only")
    serve.add_argument("--host", default=None, help="address to bind (default: vLLM's, every interface)")
    serve.add_argument("--port", type=int, default=None, help="default: vLLM's (8000)")
    serve.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    serve.add_argument(
        "--lora",
        action="append",
        metavar="NAME=ADAPTER",
        help="serve a LoRA adapter folder (a run's final/) as NAME beside the model, as it is (repeatable); "
        "one vLLM cannot load is refused, saying why",
    )
    serve.set_defaults(func=run_serve)

    push = commands.add_parser("push", help="upload an export, its GGUF files and a model card to the Hub")
    push.add_argument("src", type=Path, help="folder from `toolkit export vllm`, or a run folder")
    push.add_argument("--repo", required=True, help="USER/NAME or ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes, upload nothing")
    push.add_argument("--license", default=None, help="license id for the model card (e.g. apache-2.0)")
    push.set_defaults(func=run_push)
