"""GGUF export: an HF folder becomes a GGUF file llama.cpp runs, written by gguf-py, then verified.

The writer streams: tensor infos are computed from the safetensors headers alone, the header is written,
then each tensor is read in row blocks, transformed as the architecture's export plan says, quantized and
written before the next block is read, so peak memory stays near one block (a whole tensor only where a
transform needs it: the q/k projections). gguf-py's `GGUFWriter`
does the file format and `gguf.quants` the numpy quantization (byte-identical to ggml); K-quants come from
llama.cpp's own type choice and ggml's quantizer, block by block in the same pass (export/llama_cpp.py). What is ours is the mapping, which is data in
`toolkit.models.plans`, and the checks that refuse before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from export.source import Source, resolve_source
from export.tokenizer_gguf import GGUFVocab, add_vocab, read_vocab
from toolkit.errors import ExportError
from toolkit.models.plans import Config, GGUFPlan, TensorRule, get_plan
from toolkit.run_folder import RunFolder

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class QuantSpec:
    """How one `--quant` name is produced."""

    matrix: Q  # type of 2-D tensors (K-quants: the intermediate file's type is chosen from the source)
    file_type: FT
    # Sub-8-bit numpy types keep the embedding and output projection at Q8_0: they carry most of the error
    # (llama.cpp's own mixes keep them at 6 bits or more for the same reason).
    edge: Q | None = None
    llama_cpp: bool = False  # types chosen and blocks quantized by llama.cpp's code (export/llama_cpp.py)
    # Ternary types (TQ1_0, TQ2_0): exact for weights that are ternary × one scale, garbage for others, so the
    # export refuses a matrix that is neither ternary nor a BitNet layer (ternarized as the model computes it).
    ternary: bool = False


QUANTS: dict[str, QuantSpec] = {
    "f32": QuantSpec(Q.F32, FT.ALL_F32),
    "f16": QuantSpec(Q.F16, FT.MOSTLY_F16),
    "bf16": QuantSpec(Q.BF16, FT.MOSTLY_BF16),
    "q8_0": QuantSpec(Q.Q8_0, FT.MOSTLY_Q8_0),
    "q4_0": QuantSpec(Q.Q4_0, FT.MOSTLY_Q4_0, edge=Q.Q8_0),
    "q4_1": QuantSpec(Q.Q4_1, FT.MOSTLY_Q4_1, edge=Q.Q8_0),
    "q5_0": QuantSpec(Q.Q5_0, FT.MOSTLY_Q5_0, edge=Q.Q8_0),
    "q5_1": QuantSpec(Q.Q5_1, FT.MOSTLY_Q5_1, edge=Q.Q8_0),
    "q4_k_m": QuantSpec(Q.Q4_K, FT.MOSTLY_Q4_K_M, llama_cpp=True),
    "q5_k_m": QuantSpec(Q.Q5_K, FT.MOSTLY_Q5_K_M, llama_cpp=True),
    "q6_k": QuantSpec(Q.Q6_K, FT.MOSTLY_Q6_K, llama_cpp=True),
    # Embeddings and the head stay float16: llama-quantize's own TQ mixes put them at 4-6 bits, which cost a
    # BitNet model most of its accuracy (mean KL 0.14 measured).
    "tq2_0": QuantSpec(Q.TQ2_0, FT.MOSTLY_TQ2_0, edge=Q.F16, ternary=True),
    "tq1_0": QuantSpec(Q.TQ1_0, FT.MOSTLY_TQ1_0, edge=Q.F16, ternary=True),
}
EDGE_TENSORS = ("token_embd.weight", "output.weight")
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# The precision llama.cpp's quantizer would read a K-quant's tensors at, had it a full-precision file: the
# type a tensor it does not quantize keeps.
INTERMEDIATE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


@dataclass
class TensorJob:
    """One tensor to write: where it comes from, what it becomes."""

    source: str
    target: str
    shape: tuple[int, ...]
    source_dtype: str
    rule: TensorRule
    qtype: Q = Q.F32
    fallback: str | None = None  # why it is not of the requested type
    zero_filled: bool = False  # absent from the checkpoint: written as the rule's zeros
    generated: bool = False  # no checkpoint tensor: computed from the config by the rule (RoPE factors)
    # A BitNet layer: its latent weight is written ternarized (absmean), as the model's forward pass uses it.
    ternarize: bool = False

    @property
    def in_checkpoint(self) -> bool:
        """Whether the tensor is read from the checkpoint (not zeros, not computed from the config)."""
        return not (self.zero_filled or self.generated)

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))


# safetensors dtype -> how its bytes are read; bf16 is read as its 16 raw bits (numpy has no bfloat16).
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
CHUNK_ELEMENTS = 1 << 22  # rows are read, converted and quantized about 16 MB (of float32) at a time


@dataclass
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str
    start: int  # absolute byte offset of the data in `file`


@dataclass
class Checkpoint:
    """The safetensors files of a folder, indexed from their headers alone.

    Tensors are read with plain file reads at the header's offsets, not through `safetensors.safe_open`:
    safe_open memory-maps the file, and every page touched stays resident in the process, so peak RSS grew
    to the size of the whole checkpoint (measured: 811 MiB for a 500 MB decoder-125m). Reading row blocks
    keeps it at one block.
    """

    folder: Path
    tensors: dict[str, StoredTensor] = field(default_factory=dict)

    @classmethod
    def scan(cls, folder: Path) -> Checkpoint:
        checkpoint = cls(folder)
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ExportError(
                        f"tensor `{name}` in {file} has dtype {info['dtype']}; expected a float type"
                    )
                start = 8 + size + info["data_offsets"][0]
                checkpoint.tensors[name] = StoredTensor(file, tuple(info["shape"]), info["dtype"], start)
        return checkpoint

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensor name -> (shape, safetensors dtype): what `plan_tensors` maps."""
        return {name: (stored.shape, stored.dtype) for name, stored in self.tensors.items()}

    def read_rows(self, name: str, first: int, count: int, handle: BinaryIO) -> np.ndarray:
        """Rows [first, first + count) of tensor `name` (all of a 1-D one) as float32."""
        stored = self.tensors[name]
        dtype = np.dtype(SAFETENSORS_DTYPES[stored.dtype])
        row = int(np.prod(stored.shape[1:])) if len(stored.shape) > 1 else stored.shape[0]
        handle.seek(stored.start + first * row * dtype.itemsize)
        raw = np.fromfile(handle, dtype=dtype, count=count * row)
        if stored.dtype == "BF16":  # bfloat16 is the top half of a float32
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32, copy=False)
        return values.reshape((count, *stored.shape[1:]) if len(stored.shape) > 1 else stored.shape)

    def blocks(self, job: TensorJob, config: Config, handle: BinaryIO | None) -> Iterator[np.ndarray]:
        """The tensor of `job` as float32 row blocks, transformed; a transform needs the whole tensor."""
        if job.zero_filled:
            yield np.zeros(job.shape, dtype=np.float32)
            return
        if job.generated:
            yield job.rule.generated(config)
            return
        rows = job.shape[0] if len(job.shape) > 1 else 1
        if job.rule.transform is not None or len(job.shape) == 1 or job.ternarize:
            data = self.read_rows(job.source, 0, rows, handle)
            if job.ternarize:  # the scale is the whole tensor's mean |w|
                data = ternary_weight(data)
            yield np.ascontiguousarray(job.rule.transform(data, config) if job.rule.transform else data)
            return
        step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(job.shape[1:]))))
        for first in range(0, rows, step):
            yield self.read_rows(job.source, first, min(step, rows - first), handle)


def ternary_weight(weight: np.ndarray) -> np.ndarray:
    """A BitNet layer's latent weight as its forward pass uses it: ternary × γ (toolkit.quantization.bitnet)."""
    import torch

    from toolkit.quantization.bitnet import ternarize

    values, gamma = ternarize(torch.from_numpy(weight))
    return (values * gamma).numpy().astype(np.float32)


def is_ternary(weight: np.ndarray) -> bool:
    """Whether a matrix is one scale times values in {-1, 0, 1} (what TQ1_0/TQ2_0 store exactly)."""
    magnitudes = np.unique(np.abs(weight))
    return len(magnitudes[magnitudes != 0]) <= 1


def mark_ternary(jobs: list[TensorJob], checkpoint: Checkpoint, spec: QuantSpec) -> list[str]:
    """Mark the tensors of a BitNet model's ternary layers (from its quantization config) to be written as its
    forward pass uses them, whatever the type. With a ternary type, a BitNet model's other matrices (a layer
    it keeps in full precision) are written float16; a model with no BitNet layer is refused unless its
    matrices are ternary already, naming the first that is not: TQ types would turn it into garbage. Returns
    the targets written ternary."""
    config = json.loads((checkpoint.folder / "config.json").read_text())
    layers: set[str] = set()
    if (config.get("quantization_config") or {}).get("quant_method") == "bitnet":
        # Only then: finding the layers builds the model (torch, transformers), seconds an export need not pay.
        from toolkit.quantization.bitnet import bitnet_layers

        layers = bitnet_layers(checkpoint.folder)
    ternary = []
    for job in jobs:
        if job.source.endswith(".weight") and job.source.removesuffix(".weight") in layers:
            job.ternarize = True
            ternary.append(job.target)
        elif spec.ternary and job.qtype in (Q.TQ1_0, Q.TQ2_0):
            if layers:
                job.qtype, job.fallback = Q.F16, "kept in full precision: not a BitNet layer of this model"
                continue
            stored = checkpoint.tensors.get(job.source)
            with open(stored.file, "rb") as handle:
                values = checkpoint.read_rows(job.source, 0, job.shape[0], handle)
            if not is_ternary(values):
                raise ExportError(
                    f"tensor `{job.source}` is not ternary ({len(np.unique(values))} distinct values) and the "
                    f"model has no BitNet layers: {spec.matrix.name} would store it as garbage. Train it ternary "
                    "first (model.quantization: {method: bitnet}) or export another type (q8_0, q4_k_m)"
                )
            ternary.append(job.target)
    return ternary


# BitNet b1.58's targets as Agent Forge set them: file size against float32 from 6x below 50M parameters to
# 12x above 2B (between, interpolated on log(parameters): our reading, as no figure was given there), and at
# least 30% of the ternary weights zero.
COMPRESSION_TARGETS = ((50e6, 6.0), (2e9, 12.0))
ZERO_FRACTION_TARGET = 0.30


def compression_target(parameters: int) -> float:
    """The file-size ratio against float32 that BitNet's targets ask of a model of this many parameters."""
    (small, low), (large, high) = COMPRESSION_TARGETS
    if parameters <= small:
        return low
    if parameters >= large:
        return high
    return low + (high - low) * (np.log(parameters) - np.log(small)) / (np.log(large) - np.log(small))


def ternary_summary(checkpoint: Checkpoint, jobs: list[TensorJob], file_bytes: int) -> dict[str, Any]:
    """What a BitNet model's file is: each ternary layer's share of zero weights (ternarized as the model
    computes it), the share of the model's parameters held ternary, and the file's size against the model at
    float32 and float16, each beside BitNet's target."""
    import torch

    from toolkit.quantization.bitnet import ternarize

    zeros: dict[str, float] = {}
    zero_count = ternary_count = total = 0
    for job in jobs:
        if not job.in_checkpoint:
            continue
        count = int(np.prod(job.shape))
        total += count
        if not job.ternarize:
            continue
        with open(checkpoint.tensors[job.source].file, "rb") as handle:
            values, _ = ternarize(torch.from_numpy(checkpoint.read_rows(job.source, 0, job.shape[0], handle)))
        zero = int((values == 0).sum())
        zeros[job.target] = round(zero / count, 4)
        zero_count, ternary_count = zero_count + zero, ternary_count + count
    compression = total * 4 / file_bytes
    target = compression_target(total)
    zero_fraction = zero_count / ternary_count if ternary_count else 0.0
    return {
        "parameters": total,
        "ternary_parameters": ternary_count,
        "ternary_share": round(ternary_count / total, 4),
        "zero_fraction": round(zero_fraction, 4),
        "zero_fraction_by_layer": zeros,
        "compression_vs_f32": round(compression, 2),
        "compression_vs_f16": round(compression / 2, 2),
        "targets": {
            "compression_vs_f32": round(float(target), 2),
            "compression_met": bool(compression >= target),
            "zero_fraction": ZERO_FRACTION_TARGET,
            "zero_fraction_met": bool(zero_fraction >= ZERO_FRACTION_TARGET),
        },
    }


def quantization_accuracy(folder: Path) -> dict[str, Any] | None:
    """The accuracy drop of the staged BitNet quantization (toolkit/quantization/staged.py) that made the model
    in `folder` (a stage's `final/`), or that an earlier stage of its run made before this stage went on
    training it (`stage` names it): its measure on the full-precision model and on the model it ended with,
    from `<stage>/quantization.json`. None for a model made otherwise."""
    folder = Path(folder).resolve()
    candidates = [folder.parent]
    run = RunFolder.containing(folder)
    if run is not None:
        names = [stage.name for stage in run.stages()]
        upto = names.index(folder.parent.name) if folder.parent.name in names else len(names)
        candidates += [run.path / name for name in reversed(names[:upto])]
    path = next((c / "quantization.json" for c in candidates if (c / "quantization.json").exists()), None)
    if path is None:
        return None
    record = json.loads(path.read_text())
    final = record.get("final")
    if not final:
        return None
    return {
        "stage": path.parent.name,
        "measure": record["measure"],
        "full_precision": record["full_precision"]["score"],
        "ternary": final["score"],
        "drop": round(final["drop"], 4),
        "max_drop": record["max_drop"],
        "met": final["drop"] <= record["max_drop"],
        "groups": [g["decision"] for g in record["groups"]],
    }


DECODE_TOKENS = 64


def decode_comparison(source: Source, ternary: Path, n_threads: int | None) -> dict[str, Any]:
    """Greedy decode tokens/s of the ternary file against f16 and q8_0 files of the same model in llama.cpp
    (written beside it for the measurement, then removed): `DECODE_TOKENS` tokens, best of alternating rounds
    (export.llama_cpp.decode_speeds)."""
    from export.llama_cpp import decode_speeds, default_threads

    threads = n_threads or default_threads()
    with tempfile.TemporaryDirectory(dir=ternary.parent, prefix=".decode-") as tmp:
        files = [export_gguf(source, q, Path(tmp) / f"{q}.gguf", verify=False).path for q in ("f16", "q8_0")]
        f16, q8_0, ours = decode_speeds([*files, ternary], DECODE_TOKENS, threads, rounds=3)
    return {
        "tokens": DECODE_TOKENS,
        "threads": threads,
        "tokens_per_second": {"f16": round(f16, 1), "q8_0": round(q8_0, 1), "ternary": round(ours, 1)},
        "vs_f16": round(ours / f16, 2),
        "vs_q8_0": round(ours / q8_0, 2),
    }


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)") + "$")


def plan_tensors(
    tensors: Mapping[str, tuple[tuple[int, ...], str]], plan: GGUFPlan, config: Config
) -> list[TensorJob]:
    """Map every tensor (name -> shape and safetensors dtype) through `plan`; refuse, naming it, any tensor
    the plan cannot place.

    The tensors are a checkpoint's (`Checkpoint.shapes`) or, before any training, those a model built on
    the meta device would save (`export.check`): one function decides both.
    """
    rules = [(_pattern(rule.source), rule) for rule in plan.tensors]
    ignored = [_pattern(p) for p in plan.ignored]
    jobs: list[TensorJob] = []
    unmapped: list[str] = []
    for name, (shape, dtype) in tensors.items():
        if any(p.match(name) for p in ignored):
            continue
        for pattern, rule in rules:
            if match := pattern.match(name):
                bid = match.groupdict().get("bid")
                target = rule.target.format(bid=bid) if bid is not None else rule.target
                jobs.append(TensorJob(name, target, shape, dtype, rule))
                break
        else:
            unmapped.append(name)
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise ExportError(
            f"tensor `{unmapped[0]}`{more} has no GGUF name in plan `{plan.arch}` "
            f"(model_type `{config.get('model_type')}`); nothing was written"
        )
    present = {job.source for job in jobs}
    for rule in plan.tensors:
        if rule.generated is not None:
            values = rule.generated(config)
            if values is not None:
                jobs.append(
                    TensorJob(rule.source, rule.target, tuple(values.shape), "F32", rule, generated=True)
                )
            continue
        if rule.optional:
            continue
        blocks = range(config["num_hidden_layers"]) if "{bid}" in rule.source else [None]
        for bid in blocks:
            name = rule.source.format(bid=bid)
            if name in present:
                continue
            if rule.zeros is None:
                raise ExportError(f"plan `{plan.arch}` needs tensor `{name}`, which the checkpoint lacks")
            target = rule.target.format(bid=bid) if bid is not None else rule.target
            jobs.append(TensorJob(name, target, rule.zeros(config), "F32", rule, zero_filled=True))
    return sorted(jobs, key=lambda j: _order(j.target))


def _order(target: str) -> tuple[int, int, str]:
    # token_embd first, blocks in order, then the output head: the layout llama.cpp's own files use.
    if target.startswith("blk."):
        return (1, int(target.split(".")[1]), target)
    return (0 if target.startswith("token_embd") else 2, 0, target)


def assign_types(jobs: list[TensorJob], spec: QuantSpec) -> None:
    """Give each tensor its GGUF type: 1-D tensors F32, matrices the requested type when their rows fit its
    blocks, else F16 (recorded as a fallback)."""
    for job in jobs:
        if len(job.shape) == 1:
            job.qtype = Q.F32
            continue
        wanted = spec.edge if spec.edge is not None and job.target in EDGE_TENSORS else spec.matrix
        block = gguf.GGML_QUANT_SIZES[wanted][0]
        if job.shape[-1] % block:
            job.qtype = Q.F16
            job.fallback = f"rows of {job.shape[-1]} are not a multiple of {wanted.name}'s block of {block}"
        else:
            job.qtype = wanted


def assign_kquant_types(jobs: list[TensorJob], quant: str, plan: GGUFPlan, config: Config) -> None:
    """Give each tensor the type llama.cpp's quantizer would give it in the K-quant mix `quant`, as if it read
    a full-precision file of the checkpoint (1-D tensors F32, matrices at the widest source precision)."""
    from export.llama_cpp import kquant_types

    read = [job.source_dtype for job in jobs if job.in_checkpoint]
    widest = max(read, key=lambda d: {"F32": 2, "F16": 1}.get(d, 0))
    assign_types(jobs, QUANTS[INTERMEDIATE.get(widest, "f32")])
    hparams = {hparam.key.format(arch=plan.arch): hparam.value(config) for hparam in plan.hparams}
    chosen = kquant_types(
        {job.target: (job.shape, int(job.qtype)) for job in jobs},
        quant,
        plan.arch,
        {key: value for key, value in hparams.items() if value is not None},
    )
    for job in jobs:
        job.qtype, job.fallback = Q(chosen[job.target]), None


def kquant_fallbacks(jobs: list[TensorJob]) -> dict[str, str]:
    """Why each matrix of a K-quant file is not of a K type: llama.cpp's choice, for rows that do not fit a
    256-wide block or for a tensor it keeps in full precision."""
    from export.llama_cpp import K_BLOCK, K_TYPES

    return {
        job.target: (
            f"rows of {job.shape[-1]} are not a multiple of {K_BLOCK}: llama.cpp chose {job.qtype.name}"
            if job.shape[-1] % K_BLOCK
            else f"llama.cpp chose {job.qtype.name}"
        )
        for job in jobs
        if len(job.shape) == 2 and job.qtype.name not in K_TYPES
    }


def gguf_plan(model_type: str) -> GGUFPlan:
    """The GGUF part of `model_type`'s export plan, or an error saying there is none."""
    export_plan = get_plan(model_type)
    if export_plan.gguf is None:
        why = export_plan.gguf_blocker or "it declares no GGUF export in its plan"
        raise ExportError(f"architecture '{model_type}' cannot become a GGUF file: {why}")
    return export_plan.gguf


def check_config(plan: GGUFPlan, config: Config) -> None:
    """Refuse config values the target graph cannot represent, naming the component."""
    for check in plan.checks:
        value = check.value(config)
        if value not in check.allowed:
            # A check that names what is wrong (allowed: None only) needs no list of supported values.
            supported = (
                "" if check.allowed == (None,) else f" (supported: {', '.join(map(repr, check.allowed))})"
            )
            raise ExportError(
                f"{check.component} = {value!r} cannot be represented in llama.cpp's `{plan.arch}` graph{supported}"
            )
    for hparam in plan.hparams:
        if not hparam.optional and hparam.value(config) is None:
            raise ExportError(f"config.json has no value for GGUF key {hparam.key.format(arch=plan.arch)}")


def _add_metadata(writer: gguf.GGUFWriter, plan: GGUFPlan, config: Config, source: Source, spec: QuantSpec):
    writer.add_type("model")
    writer.add_name(source.name)
    if source.license:
        writer.add_license(source.license)
    if source.lora:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, source.lora["base"])
    writer.add_file_type(int(spec.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hparam in plan.hparams:
        value = hparam.value(config)
        if value is not None:
            getattr(writer, f"add_{hparam.kind}")(hparam.key.format(arch=plan.arch), value)


def write_gguf(
    out: Path,
    checkpoint: Checkpoint,
    jobs: list[TensorJob],
    plan: GGUFPlan,
    config: Config,
    vocab: GGUFVocab,
    source: Source,
    spec: QuantSpec,
    n_threads: int | None = None,
) -> None:
    """Write the GGUF to a temporary file beside `out` and rename it into place only when complete.

    GGUFWriter writes header, metadata and tensor infos. Tensor bytes are written block by block into its
    file, with its alignment padding: `write_tensor_data` takes one whole array per tensor, which would
    hold the largest tensor (the embedding) in float32 and in its quantized form at once. Quantization is
    per row, so the bytes are identical either way. A K-quant file (`spec.llama_cpp`) has its quantized
    tensors made by ggml's own quantizer on each block (export.llama_cpp.quantize_rows, `n_threads` threads):
    one pass from the checkpoint, with no full-precision file in between.
    """
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(tmp, plan.arch)
    try:
        _add_metadata(writer, plan, config, source, spec)
        add_vocab(writer, vocab)
        for job in jobs:
            writer.add_tensor_info(
                job.target, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None and len(writer.fout) == 1  # no sharding requested
        fout = writer.fout[0]
        ggml_rows = None  # K-quant files: ggml quantizes every non-float tensor
        if spec.llama_cpp:
            from export.llama_cpp import quantize_rows as ggml_rows
        with ExitStack() as stack:
            handles = {
                file: stack.enter_context(open(file, "rb"))
                for file in {t.file for t in checkpoint.tensors.values()}
            }
            for job in jobs:
                writer.write_padding(fout, fout.tell())
                stored = checkpoint.tensors.get(job.source)
                handle = handles[stored.file] if stored is not None else None
                for block in checkpoint.blocks(job, config, handle):
                    if ggml_rows is not None and job.qtype not in FLOAT_TYPES:
                        ggml_rows(block.reshape(-1, job.shape[-1]), int(job.qtype), n_threads).tofile(fout)
                    else:
                        gguf.quants.quantize(block, job.qtype).tofile(fout)
                writer.write_padding(fout, job.nbytes)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def default_output(source: Source, quant: str) -> Path:
    """`runs/<name>/gguf/<name>-<quant>.gguf` for a run (`RunFolder.gguf_path`, the one layout a recipe's
    export stage writes too), `<folder>/gguf/<name>-<quant>.gguf` otherwise."""
    if source.run_dir is not None:
        return RunFolder(source.run_dir).gguf_path(quant)
    return source.folder / "gguf" / f"{source.name}-{quant}.gguf"


@dataclass
class ExportResult:
    """What `export_gguf` wrote and measured."""

    path: Path
    quant: str
    seconds: float
    tensor_types: dict[str, str]
    fallbacks: dict[str, str]
    report: dict[str, Any] | None = None  # verification, None with verify=False
    lora: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.report is None or bool(self.report["ok"])


def export_gguf(
    src: str | Path | Source,
    quant: str = "f16",
    out: str | Path | None = None,
    *,
    force: bool = False,
    verify: bool = True,
    n_threads: int | None = None,
) -> ExportResult:
    """Export SRC (HF folder or run folder, or a `Source` already resolved, which the caller cleans up) to a
    GGUF of type `quant`, verified in llama.cpp unless told not.

    Everything that can refuse (architecture, config, tokenizer, tensor names, existing output) refuses
    before a file is written. With `verify`, `<out>.report.json` holds the measured parity.
    """
    from export import verify as verification

    if quant not in QUANTS:
        raise ExportError(f"unknown quant type '{quant}'; supported: {', '.join(QUANTS)}")
    spec = QUANTS[quant]
    started = time.perf_counter()
    owned = not isinstance(src, Source)
    source = resolve_source(src, prompts=verification.PROMPTS) if owned else src
    try:
        out_path = Path(out) if out is not None else default_output(source, quant)
        if out_path.exists() and not force:
            raise ExportError(f"{out_path} exists; pass --force to replace it")
        config = json.loads((source.folder / "config.json").read_text())
        plan = gguf_plan(config.get("model_type", "?"))
        check_config(plan, config)
        vocab = read_vocab(source.folder, config["vocab_size"])
        checkpoint = Checkpoint.scan(source.folder)
        jobs = plan_tensors(checkpoint.shapes(), plan, config)

        out_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.llama_cpp:
            assign_kquant_types(jobs, quant, plan, config)
            mark_ternary(jobs, checkpoint, spec)
            write_gguf(out_path, checkpoint, jobs, plan, config, vocab, source, spec, n_threads)
            fallbacks = kquant_fallbacks(jobs)
        else:
            assign_types(jobs, spec)
            mark_ternary(jobs, checkpoint, spec)
            write_gguf(out_path, checkpoint, jobs, plan, config, vocab, source, spec)
            fallbacks = {job.target: job.fallback for job in jobs if job.fallback}
        tensor_types = {job.target: job.qtype.name for job in jobs}
        result = ExportResult(
            out_path, quant, time.perf_counter() - started, tensor_types, fallbacks, lora=source.lora
        )
        if verify:
            result.report = verification.verify_gguf(
                out_path, source.folder, quant, plan, jobs, vocab, n_threads=n_threads
            )
            result.report.update(
                export_seconds=result.seconds,
                tensor_types=tensor_types,
                fallbacks=fallbacks,
                zero_filled=[job.target for job in jobs if job.zero_filled],
                lora=source.lora,
            )
            if any(job.ternarize for job in jobs):
                bitnet = ternary_summary(checkpoint, jobs, out_path.stat().st_size)
                if (accuracy := quantization_accuracy(source.folder)) is not None:
                    bitnet["accuracy"] = accuracy
                bitnet["decode"] = decode_comparison(source, out_path, n_threads)
                result.report["bitnet"] = bitnet
            from export.report import write_report

            write_report(out_path, result.report)
        return result
    finally:
        if owned:
            source.cleanup()
