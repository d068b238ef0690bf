"""`toolkit merge CONFIG --out DIR`: a mergekit config run through mergekit, made safe and accounted for.

mergekit does the merge (every method is its own; `dfs` is compiled into its passthrough first). What this
module adds, because no library puts it together:
- before anything is written: inputs stored quantized are refused with the fix, weights that are not
  safetensors are refused, the inputs' architectures must agree, and every tensor the inputs share must have
  one shape (a vocabulary difference is allowed only with `tokenizer_source`, which remaps the rows);
- the toolkit's architectures are described to mergekit from their own classes (toolkit/merge/architectures);
- the output is written to a temporary folder and renamed: a failed merge leaves nothing half-written;
- afterwards: the embedding rows must equal the tokenizer's length and the config's vocab_size (no silent
  truncation), the chat template and generation config are carried over, and `merge_report.json` plus the
  model card (README.md) say what went in: inputs, method, parameters, versions, and where each token's row
  came from when vocabularies were joined.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import ToolkitError
from toolkit.io import atomic_path, write_json, write_text

REPORT = "merge_report.json"
LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Carried from the donor (the base model, else the first input) when the merge did not write them.
SIDE_FILES = ("chat_template.jinja", "generation_config.json")


@dataclass
class MergeReport:
    """What a merge took and made."""

    out: str
    method: str  # as written in the config
    mergekit_method: str  # what mergekit ran (dfs runs as passthrough)
    inputs: list[dict[str, Any]]
    config: dict[str, Any]  # the config as given (references as written)
    resolved: dict[str, Any]  # what mergekit ran, every reference a path
    versions: dict[str, str]
    seed: int | None = None
    layers: int | None = None
    vocabulary: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # where it came from
    seconds: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)  # named intermediate merges, in order


def _local(reference: Any) -> Path | None:
    path = Path(reference.model.path)
    return path if path.exists() else None


def _config_json(reference: Any) -> dict[str, Any]:
    local = _local(reference)
    if local is not None:
        path = local / "config.json"
        if not path.exists():
            raise ToolkitError(f"{local} has no config.json: not a model folder")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(reference.model.path, "config.json")).read_text())
    except Exception as error:  # noqa: BLE001 - any Hub failure is the user's missing input
        raise ToolkitError(f"{reference.model.path}: cannot read its config.json ({error})") from None


def tensor_shapes(reference: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an input holds, from its safetensors headers (no weights read)."""
    local = _local(reference)
    if local is None:
        from huggingface_hub import get_safetensors_metadata

        try:
            metadata = get_safetensors_metadata(reference.model.path)
        except Exception as error:  # noqa: BLE001
            raise ToolkitError(f"{reference.model.path}: no safetensors weights to merge ({error})") from None
        return {
            name: tuple(info.shape)
            for file in metadata.files_metadata.values()
            for name, info in file.tensors.items()
        }
    from safetensors import safe_open

    files = sorted(local.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in local.glob("*.bin")] + [p.name for p in local.glob("*.pt")]
        hint = f" ({', '.join(pickled)} are pickles, which the toolkit does not load)" if pickled else ""
        raise ToolkitError(f"{local}: no .safetensors weights{hint}")
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is no mapping
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _template(name: str) -> str:
    return LAYER_INDEX.sub(".#.", name, count=1)


def preflight(config: Any, allow_crimes: bool = False) -> list[dict[str, Any]]:
    """Refuse what would merge wrong, before anything is read in full or written. Returns one entry per
    input: its reference, model type, architecture, layers and vocabulary size."""
    inputs, shapes = [], {}
    for reference in config.referenced_models():
        name = str(reference)
        cfg = _config_json(reference)
        quantization = cfg.get("quantization_config")
        if quantization:
            method = (
                quantization.get("quant_method", "quantized")
                if isinstance(quantization, dict)
                else "quantized"
            )
            raise ToolkitError(
                f"{name} is stored quantized ({method}): merging rounded weights gives a model no exporter "
                "reads and loses the precision the merge needs. Merge the full-precision checkpoint; for a "
                "QLoRA adapter: toolkit merge-adapter ADAPTER --base FULL_PRECISION_BASE, then merge its output"
            )
        shapes[name] = tensor_shapes(reference)
        inputs.append(
            {
                "reference": name,
                "model_type": cfg.get("model_type"),
                "architecture": (cfg.get("architectures") or ["?"])[0],
                "layers": cfg.get("num_hidden_layers", cfg.get("n_layer")),
                "vocab_size": cfg.get("vocab_size"),
                "hidden_size": cfg.get("hidden_size", cfg.get("n_embd")),
                "hub": _local(reference) is None,
            }
        )
    architectures = {i["architecture"] for i in inputs}
    if len(architectures) > 1 and not allow_crimes:
        listed = ", ".join(f"{i['reference']} ({i['architecture']})" for i in inputs)
        raise ToolkitError(f"the inputs are of different architectures: {listed}; a merge needs one")
    vocab_sizes = {i["vocab_size"] for i in inputs}
    remaps_vocabulary = config.tokenizer_source is not None or config.tokenizer is not None
    seen: dict[str, tuple[str, tuple[int, ...]]] = {}
    for entry in inputs:
        for name, shape in shapes[entry["reference"]].items():
            key = _template(name)
            if key not in seen:
                seen[key] = (entry["reference"], shape)
                continue
            other, other_shape = seen[key]
            if shape == other_shape:
                continue
            token_rows = (
                shape[0] in vocab_sizes and other_shape[0] in vocab_sizes and shape[1:] == other_shape[1:]
            )
            if token_rows and remaps_vocabulary:
                continue
            fix = (
                "; the inputs have different vocabularies: set tokenizer_source (union, base, or a model) "
                "so that mergekit maps the rows token by token"
                if token_rows
                else ""
            )
            raise ToolkitError(
                f"tensor {name}: {other} has shape {list(other_shape)}, {entry['reference']} has "
                f"{list(shape)}; these inputs cannot be merged{fix}"
            )
    return inputs


def _vocabulary(config: Any, arch_info: Any, out: Path, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Which row of the output's embedding came from which input, by mergekit's rule: a token every input has
    is merged from all; a token of one input only is that input's row; a token several but not all have comes
    from the base when the base has it, else their average. Plus the check that nothing was truncated."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    merged_config = AutoConfig.from_pretrained(out)
    # The token-indexed tensors, as mergekit's architecture description names them (embeddings, untied head).
    axes = {}
    for module in arch_info.modules.values():
        described = module.architecture
        for weight in [*described.pre_weights(merged_config), *described.post_weights(merged_config)]:
            if weight.vocabulary_axis is not None:
                axes[weight.name] = weight.vocabulary_axis
    rows = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                if name in axes:
                    rows[name] = handle.get_slice(name).get_shape()[axes[name]]
    result: dict[str, Any] = {
        "tokens": len(vocab),
        "config_vocab_size": merged_config.vocab_size,
        "embedding_rows": max(rows.values()) if rows else None,
        "token_tensors": rows,
        "source": str(config.tokenizer_source) if config.tokenizer_source else "base (copied)",
    }
    short = {name: n for name, n in rows.items() if n < len(vocab) or n != merged_config.vocab_size}
    if short:
        raise ToolkitError(
            f"the merged token tensors have {short} rows for a tokenizer of {len(vocab)} tokens and a config "
            f"vocab_size of {merged_config.vocab_size}: tokens would be cut off or unread; the merge was not kept"
        )
    if config.tokenizer_source is None:
        return result
    base = str(config.base_model) if config.base_model else None
    vocabularies = {i["reference"]: AutoTokenizer.from_pretrained(i["path"]).get_vocab() for i in inputs}
    every, only, from_base, averaged, none = 0, {}, [], [], []
    for token in sorted(vocab, key=vocab.get):
        having = [name for name, v in vocabularies.items() if token in v]
        if len(having) == len(vocabularies):
            every += 1
        elif len(having) == 1:
            only.setdefault(having[0], []).append(token)
        elif not having:
            none.append(token)
        elif base in having:
            from_base.append(token)
        else:
            averaged.append(token)
    result["rows"] = {
        "merged from every input": every,
        "from one input only": {name: {"count": len(t), "tokens": t[:20]} for name, t in only.items()},
        "from the base (not in every input)": {"count": len(from_base), "tokens": from_base[:20]},
        "averaged over the inputs that have them": {"count": len(averaged), "tokens": averaged[:20]},
        "in no input (zero)": {"count": len(none), "tokens": none[:20]},
    }
    return result


def _carry_side_files(config: Any, out: Path) -> str | None:
    """Copy the chat template and generation config from the donor when the merge left them out; returns
    where the chat template came from."""
    source = config.tokenizer_source
    donor = config.base_model or config.referenced_models()[0]
    if source is not None and source not in ("union", "base"):
        donor = source
    local = _local(donor)
    template = None
    if (out / "chat_template.jinja").exists():
        template = f"the merged tokenizer's (tokenizer_source: {source or 'base'})"
    for name in SIDE_FILES:
        if local is not None and (local / name).exists() and not (out / name).exists():
            shutil.copy(local / name, out / name)
            if name == "chat_template.jinja":
                template = str(donor)
    return template


def _card(report: MergeReport) -> str:
    """The model card: metadata the Hub reads, then the merge in a few lines and the config."""
    # The Hub's base_model metadata names Hub repositories; local folders are in the table below.
    bases = [i["reference"] for i in report.inputs if i.get("hub")]
    meta = {
        "library_name": "transformers",
        **({"base_model": bases} if bases else {}),
        "tags": ["merge", "mergekit", "forge-toolkit"],
    }
    front = yaml.safe_dump(meta, sort_keys=False)
    lines = [
        f"---\n{front}---",
        f"# {Path(report.out).name}",
        "",
        f"A merge made with `toolkit merge` (forge-toolkit {report.versions['forge-toolkit']}) through "
        f"[mergekit](https://github.com/arcee-ai/mergekit) {report.versions['mergekit']}: method "
        f"`{report.method}`"
        + (
            f" (run as mergekit's `{report.mergekit_method}`)"
            if report.method != report.mergekit_method
            else ""
        )
        + (f", seed {report.seed}" if report.seed is not None else "")
        + ".",
        "",
        "| input | type | layers | vocabulary |",
        "|---|---|---|---|",
        *(
            f"| {i['reference']} | {i['model_type']} | {i['layers']} | {i['vocab_size']} |"
            for i in report.inputs
        ),
        "",
        f"Output: {report.layers} layers, {report.vocabulary.get('tokens')} tokens; chat template from "
        f"{report.chat_template or 'none'}.",
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(report.config, sort_keys=False).rstrip(),
        "```",
        "",
        "Every figure, and where each embedding row came from: `merge_report.json`.",
    ]
    return "\n".join(lines) + "\n"


def merge(
    raw: dict[str, Any],
    out: str | Path,
    *,
    seed: int | None = None,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    resolve: Any = None,
    base_dir: Path | None = None,
    where: str = "merge config",
    quiet: bool = True,
) -> MergeReport:
    """Run the mergekit config `raw` into `out` (atomically) and return its report. `resolve(name, where)`
    may map model references that are not paths (a recipe's stage names)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from toolkit.merge.architectures import tell_mergekit
    from toolkit.merge.config import check, mergekit_version, parse, resolve_inputs

    start = time.monotonic()
    out = Path(out)
    tell_mergekit()
    problems = check(raw)
    resolved, missing = resolve_inputs(raw, resolve=resolve, base_dir=base_dir)
    if problems or missing:
        raise ToolkitError(f"{where}:\n  " + "\n  ".join(problems + missing))
    config = parse(resolved, where)
    inputs = preflight(config, allow_crimes=allow_crimes)
    for entry, reference in zip(inputs, config.referenced_models(), strict=True):
        entry["path"] = reference.model.path
    options = MergeOptions(
        allow_crimes=allow_crimes,
        trust_remote_code=trust_remote_code,
        random_seed=seed,
        copy_tokenizer=True,
        write_model_card=False,
        quiet=quiet,
    )
    with atomic_path(out, is_dir=True) as tmp:
        run_merge(config, str(tmp), options=options)
        from transformers import AutoConfig

        layers = getattr(
            AutoConfig.from_pretrained(tmp, trust_remote_code=trust_remote_code), "num_hidden_layers", None
        )
        report = MergeReport(
            out=str(out),
            method=str(raw.get("merge_method")),
            mergekit_method=config.merge_method,
            inputs=inputs,
            config=raw,
            resolved=json.loads(json.dumps(config.model_dump(mode="json", exclude_none=True))),
            versions={
                "mergekit": mergekit_version(),
                "forge-toolkit": version("forge-toolkit"),
                "transformers": version("transformers"),
            },
            seed=seed,
            layers=layers,
            vocabulary=_vocabulary(config, get_architecture_info(config, options), tmp, inputs),
            chat_template=_carry_side_files(config, tmp),
        )
        report.seconds = round(time.monotonic() - start, 2)
        write_json(tmp / REPORT, asdict(report))
        write_text(tmp / "README.md", _card(report))
    return report


def merge_documents(documents: list[dict[str, Any]], out: str | Path, **kwargs: Any) -> MergeReport:
    """mergekit-multimerge's format: documents with a `name` are intermediate merges that later documents take
    as inputs by that name; the one document without a name is the output. Intermediates live in a temporary
    folder beside `out` and are gone afterwards. Keyword arguments are `merge`'s."""
    out = Path(out)
    where = kwargs.pop("where", "merge config")
    resolve = kwargs.pop("resolve", None)
    finals = [i for i, d in enumerate(documents) if not d.get("name")]
    if len(finals) != 1 or finals[0] != len(documents) - 1:
        raise ToolkitError(
            f"{where}: {len(documents)} documents; every one but the last needs a `name` (an intermediate "
            "merge that later documents take as an input), and the last, the output, has none"
        )
    names = [d["name"] for d in documents[:-1]]
    if len(set(names)) != len(names):
        raise ToolkitError(f"{where}: intermediate names repeat: {names}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.steps-", dir=out.parent) as tmp:
        made: dict[str, str] = {}

        def lookup(name: str, at: str) -> str | None:
            if name in made:
                return made[name]
            if name in names:
                raise ToolkitError(f"{where}: {at} names the merge '{name}', which comes later")
            return resolve(name, at) if resolve is not None else None

        steps = []
        for i, document in enumerate(documents):
            body = {k: v for k, v in document.items() if k != "name"}
            at = (
                f"{where} (document {i + 1}: {document.get('name') or 'the output'})"
                if len(documents) > 1
                else where
            )
            if document.get("name"):
                target = Path(tmp) / document["name"]
                merge(body, target, resolve=lookup, where=at, **kwargs)
                made[document["name"]] = str(target)
                steps.append(document)
            else:
                report = merge(body, out, resolve=lookup, where=at, **kwargs)
    if steps:
        by_path = {path: name for name, path in made.items()}
        for entry in report.inputs:
            entry["reference"] = by_path.get(entry["reference"], entry["reference"])
            entry["path"] = by_path.get(entry["path"], entry["path"])
        report.steps = steps
        write_json(out / REPORT, asdict(report))
        write_text(out / "README.md", _card(report))
    return report


def format_report(report: MergeReport) -> str:
    """The merge in a few lines, for the command's output."""
    lines = [
        f"{report.method} merge of {len(report.inputs)} inputs -> {report.out} "
        f"({report.layers} layers, {report.seconds:.1f} s, mergekit {report.versions['mergekit']})"
    ]
    lines += [f"  input: {i['reference']} ({i['model_type']}, {i['layers']} layers)" for i in report.inputs]
    vocabulary = report.vocabulary
    lines.append(
        f"  vocabulary: {vocabulary.get('tokens')} tokens, {vocabulary.get('embedding_rows')} embedding rows "
        f"(tokenizer: {vocabulary.get('source')})"
    )
    rows = vocabulary.get("rows")
    if rows:
        lines.append(f"    merged from every input: {rows['merged from every input']}")
        for name, part in rows["from one input only"].items():
            lines.append(f"    only in {name}: {part['count']} ({', '.join(part['tokens'][:5])}...)")
        for what in (
            "from the base (not in every input)",
            "averaged over the inputs that have them",
            "in no input (zero)",
        ):
            if rows[what]["count"]:
                lines.append(f"    {what}: {rows[what]['count']}")
    lines.append(f"  chat template: {report.chat_template or 'none'}")
    return "\n".join(lines)
