"""`toolkit export gguf|ollama|vllm|hf`: argparse wiring for the exporters; `python -m export.cli` runs it alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from export.gguf import QUANTS, ExportResult, export_gguf
from export.ollama import export_ollama
from export.report import markdown_table, report_path
from toolkit.errors import ToolkitError
from toolkit.io import print_result


def _common(parser: argparse.ArgumentParser, default_quant: str) -> None:
    parser.add_argument(
        "src", type=Path, help="run folder (runs/<name>: its newest stage's final/) or HF folder"
    )
    parser.add_argument(
        "--quant", default=default_quant, choices=list(QUANTS), help=f"type (default {default_quant})"
    )
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip llama.cpp verification"
    )
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: up to 4)")


def _summarise(result: ExportResult) -> int:
    print(f"wrote {result.path} ({result.quant}, {result.seconds:.2f} s)")
    if result.report is None:
        return 0
    print(markdown_table(result.report))
    print(f"report: {report_path(result.path)}")
    if not result.ok:
        print("verification FAILED: a bound was missed (see the table above)", file=sys.stderr)
    return 0 if result.ok else 1


def run_gguf(args: argparse.Namespace) -> int:
    result = export_gguf(
        args.src, args.quant, args.out, force=args.force, verify=args.verify, n_threads=args.threads
    )
    return _summarise(result)


def run_ollama(args: argparse.Namespace) -> int:
    result = export_ollama(
        args.src,
        args.out,
        args.quant,
        system=args.system,
        force=args.force,
        verify=args.verify,
        n_threads=args.threads,
    )
    code = _summarise(result.gguf)
    print(
        f"wrote {result.modelfile} (stops: {', '.join(result.stops)}); run: ollama create NAME -f {result.modelfile}"
    )
    for note in result.notes:
        print(f"note: {note}")
    return code


def run_vllm(args: argparse.Namespace) -> int:
    from export.verify_hf import markdown_table as folder_table
    from export.verify_vllm import markdown_table as vllm_table
    from export.vllm import export_vllm

    result = export_vllm(
        args.src,
        args.out,
        form=args.form,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        force=args.force,
        verify=args.verify,
        verify_in=args.verify_in,
    )
    print(f"wrote {result.path} ({result.form}, {result.dtype}, {result.seconds:.2f} s)")
    for name, section in (result.report.get("verification") or {}).items():
        table = vllm_table if section.get("kind") == "vllm" else folder_table
        print(table(section, f"{name}: {result.path}"))
    print(f"report: {result.path / 'export_report.json'}")
    if args.verify and args.verify_in == "auto" and "vllm" not in result.report.get("verified_in", []):
        print("note: not checked in vLLM itself (no vLLM environment here; `make vllm-env` sets one up)")
    print(f"serve: toolkit serve {result.path}")
    if not result.ok:
        print("verification FAILED: a bound was missed (see the table above)", file=sys.stderr)
    return 0 if result.ok else 1


def run_hf(args: argparse.Namespace) -> int:
    from export.hf import export_hf
    from export.verify_hf import markdown_table as folder_table

    result = export_hf(
        args.src,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        force=args.force,
        verify=args.verify,
    )
    how = "remote code" if result.remote_code else "transformers' own class"
    print(f"wrote {result.path} ({how}, {result.dtype}, {result.seconds:.2f} s)")
    for name, section in (result.report.get("verification") or {}).items():
        print(folder_table(section, f"{name}: {result.path}"))
    print(f"report: {result.path / 'export_report.json'}")
    print(f"push: toolkit push {result.path} --repo USER/NAME")
    if not result.ok:
        print("verification FAILED: a bound was missed (see the table above)", file=sys.stderr)
    return 0 if result.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `gguf`, `ollama`, `vllm` and `hf` to the `toolkit export` sub-command group."""
    gguf = subparsers.add_parser("gguf", help="write a GGUF with gguf-py and verify it in llama.cpp")
    _common(gguf, "q8_0")
    gguf.add_argument(
        "--out", type=Path, default=None, help="output file (default: <run>/gguf/<name>-<quant>.gguf)"
    )
    gguf.set_defaults(func=run_gguf)
    ollama = subparsers.add_parser("ollama", help="GGUF plus an Ollama Modelfile")
    _common(ollama, "q8_0")
    ollama.add_argument("--out", type=Path, required=True, help="output folder for the GGUF and Modelfile")
    ollama.add_argument("--system", default=None, help="SYSTEM prompt written into the Modelfile")
    ollama.set_defaults(func=run_ollama)
    vllm = subparsers.add_parser(
        "vllm", help="a folder `vllm serve` accepts as it is, verified without the toolkit"
    )
    vllm.add_argument(
        "src", type=Path, help="run folder (runs/<name>: its newest stage's final/) or HF folder"
    )
    vllm.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <run>/vllm, or <folder>-vllm)"
    )
    vllm.add_argument(
        "--form",
        default="auto",
        choices=["auto", "native", "remote-code"],
        help="native transformers architecture or remote-code folder (default: native when the plan has one)",
    )
    vllm.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: the source's)",
    )
    vllm.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    vllm.add_argument("--force", action="store_true", help="replace an existing output folder")
    vllm.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip verification (clean process and vLLM)"
    )
    vllm.add_argument(
        "--verify-in",
        default="auto",
        choices=["auto", "clean", "vllm"],
        help="clean: a fresh process without forge-toolkit; vllm: that and vLLM itself (needs `make vllm-env`); "
        "auto (default): vllm where a vLLM environment is set up, else clean",
    )
    vllm.set_defaults(func=run_vllm)
    hf = subparsers.add_parser(
        "hf",
        help="a Hub folder that loads with from_pretrained without the toolkit (remote code for its "
        "architectures), verified in a clean process",
    )
    hf.add_argument("src", type=Path, help="run folder (runs/<name>: its newest stage's final/) or HF folder")
    hf.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <run>/hf, or <folder>-hf)"
    )
    hf.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: the source's)",
    )
    hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    hf.add_argument("--force", action="store_true", help="replace an existing output folder")
    hf.add_argument("--no-verify", dest="verify", action="store_false", help="skip the clean-process check")
    hf.set_defaults(func=run_hf)


def run_arch_check(args: argparse.Namespace) -> int:
    """Exit 0 when every export target is reachable, 1 when one is blocked (2: unknown name)."""
    import json

    from export.check import check, format_check

    result = check(args.name)
    print_result(json.dumps(result.to_dict(), indent=2) if args.json else format_check(result))
    return 0 if result.ok else 1


def register_commands(groups: dict[str, Any]) -> None:
    """The export package's part of the `toolkit` command (the `forge_toolkit.cli` entry point): `export
    gguf|ollama|vllm`, `arch check`, `serve` and `push`."""
    from export.cli_top import register_top_level

    export = groups["toolkit"].add_parser("export", help="export a model (GGUF, Ollama, vLLM folder)")
    register(export.add_subparsers(dest="export", required=True))
    arch_check = groups["arch"].add_parser(
        "check",
        help="which exports (GGUF, vLLM native, vLLM Transformers backend, Hub remote code) an architecture "
        "reaches, and what blocks the others; exit 1 when one is blocked",
    )
    arch_check.add_argument(
        "name", help="architecture (decoder), preset (prometheus-125m) or HF model folder"
    )
    arch_check.add_argument("--json", action="store_true")
    arch_check.set_defaults(func=run_arch_check)
    register_top_level(groups["toolkit"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.cli", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
