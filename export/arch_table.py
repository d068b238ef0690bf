"""README.md's architecture table, generated from the registry: one row per preset, then each architecture.

    python -m export.arch_table --write    # rewrite the table in README.md (atomically)
    python -m export.arch_table --check    # exit 1 when README.md differs from the registry

The table sits between the marker comments below. Parameters are counted on the meta device and the export
columns come from `toolkit arch check` (`export.check`), so a new architecture or preset shows up with its
real size and exports, and `tests/export/test_arch_table.py` fails until the README is regenerated.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from export.check import ArchCheck, check
from toolkit.errors import ToolkitError
from toolkit.io import atomic_path
from toolkit.models.registry import ARCHITECTURES, PRESETS, build_config, count_parameters

START = "<!-- arch-table:start -->"
END = "<!-- arch-table:end -->"
COMMAND = "python -m export.arch_table --write"
README = Path(__file__).resolve().parent.parent / "README.md"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


# (config field, how the cell names it): the shape a reader compares presets by; absent fields are left out.
SHAPE = (
    ("hidden_size", "d {}"),
    ("num_hidden_layers", "{} layers"),
    ("num_attention_heads", "{} heads"),
    ("max_position_embeddings", "context {}"),
    ("vocab_size", "vocab {}"),
)


def _shape_cell(config: object) -> str:
    if callable(getattr(config, "shape_summary", None)):  # an architecture whose shape is not a decoder's
        return config.shape_summary()
    return ", ".join(form.format(getattr(config, key)) for key, form in SHAPE if getattr(config, key, None))


def _gguf_cell(result: ArchCheck) -> str:
    verdict = result.target("gguf")
    return f"`{verdict.name}`" if verdict.ok else "blocked"


def _vllm_cell(result: ArchCheck) -> str:
    native, backend = result.target("vllm-native"), result.target("vllm-transformers")
    routes = [f"native `{native.name}`"] if native.ok else []
    routes += ["Transformers backend"] if backend.ok else []
    return ", ".join(routes) or "blocked"


def render_table() -> str:
    """The generated region, markers included: deterministic (registry order, no timestamps)."""
    lines = [
        START,
        f"<!-- generated from the registry by `{COMMAND}`: edit toolkit/models, not this table -->",
        "",
        "| preset | arch | parameters | fp32 | fp16 | shape | GGUF (llama.cpp graph) | vLLM | notes |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    blocked: dict[tuple[str, str], list[str]] = {}  # (target, reason) -> the presets it blocks, in order
    for name, preset in PRESETS.items():
        config = build_config(name)
        n = count_parameters(config)
        result = check(name)
        notes = "; ".join(part for part in (preset.description, preset.quoted) if part)
        lines.append(
            f"| `{name}` | {preset.arch} | {n:,} | {_size(4 * n)} | {_size(2 * n)} | {_shape_cell(config)} "
            f"| {_gguf_cell(result)} "
            f"| {_vllm_cell(result)} | {notes} |"
        )
        for t in result.targets:
            if not t.ok:
                blocked.setdefault((t.label, t.detail), []).append(f"`{name}`")
    lines += ["", *[f"- `{arch.name}`: {arch.description}" for arch in ARCHITECTURES.values()]]
    if blocked:
        lines += ["", "Blocked exports (`toolkit arch check PRESET` says the same):", ""]
        lines += [f"- {', '.join(names)}, {label}: {detail}" for (label, detail), names in blocked.items()]
    return "\n".join([*lines, END])


def render_readme(text: str, where: str = "README.md") -> str:
    """`text` with the region between the markers replaced by the generated table."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ToolkitError(f"{where} must hold exactly one `{START}` ... `{END}` region")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return head + render_table() + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.arch_table", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the table in the README")
    action.add_argument("--check", action="store_true", help="exit 1 when the README is out of date")
    parser.add_argument("--readme", type=Path, default=README, help=f"default: {README}")
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text()
        wanted = render_readme(text, str(args.readme))
    except (OSError, ToolkitError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        if wanted != text:
            print(f"{args.readme}: the architecture table is out of date; run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.readme}: the architecture table is up to date")
        return 0
    if wanted != text:
        with atomic_path(args.readme) as tmp:
            tmp.write_text(wanted)
            shutil.copymode(args.readme, tmp)  # the temporary file is created 0600; keep the README's mode
    print(f"{args.readme}: {'rewritten' if wanted != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
