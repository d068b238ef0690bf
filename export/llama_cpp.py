"""llama.cpp through llama-cpp-python: K-quants with llama.cpp's own code, and loading for verification.

K-quant block search exists only in ggml's C code (gguf-py can dequantize K types but not produce them), and
which tensors of a Q4_K_M / Q5_K_M file get more bits is decided by llama.cpp's quantizer. Both are reached
through the libraries llama-cpp-python ships, one tensor block at a time, so that export/gguf.py writes a
K-quant file in one pass, without an intermediate full-precision GGUF:

- `kquant_types`: llama.cpp's own choice of type per tensor (its `llama_quant_compute_types`, the function
  `llama_model_quantize` calls, on a model described by its hyper-parameters);
- `quantize_rows`: ggml's `ggml_quantize_chunk` on a float32 row block, rows split over threads.

`quantize_with_llama_cpp` runs `llama_model_quantize` on a whole GGUF: the reference the one-pass export is
tested and benchmarked against. No llama.cpp checkout or build is involved.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError

# Types that count as "a K-quant" when deciding whether llama.cpp fell back on a tensor.
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
K_BLOCK = 256

# llama.cpp's quantization-planning entry points are C++ functions of its staging header (src/llama-ext.h), so
# they are found by their mangled names; a llama-cpp-python without them is named in the error.
_QUANT_API = {
    "model_from_metadata": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
    "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
    "compute_types": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
    "free": "_Z16llama_quant_freeP19quantize_state_impl",
}


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as error:
        raise ExportError(
            "llama-cpp-python is needed for K-quants and for verification: pip install 'forge-toolkit[gguf]' "
            "(or pass --no-verify with a numpy quant type)"
        ) from error
    return llama_cpp


@contextmanager
def quiet() -> Any:
    """Silence llama.cpp's load/quantize log (it goes through llama-cpp-python's logger)."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def default_threads() -> int:
    """Half the cores, at most 4: llama.cpp's threads spin at a barrier after every op, so on a busy or
    small machine (and for small models) extra threads cost far more than they compute; measured on 2
    shared cores, a tiny model decoded 50x slower with 2 threads than with 1."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (type name, shape in numpy order), read back with gguf-py."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors}


def quantize_with_llama_cpp(
    src: Path, out: Path, quant: str, n_threads: int | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """Quantize the GGUF `src` to K-quant `quant` at `out` (temp file + rename).

    Returns each tensor's type and, for the matrices llama.cpp did not give a K type, why it fell back.
    """
    llama_cpp = _llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise ExportError(f"this llama-cpp-python has no quantization type {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or default_threads()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with quiet():
            status = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        if status != 0:
            raise ExportError(f"llama.cpp's quantizer failed on {src} for {quant} (status {status})")
        types = tensor_types(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    fallbacks = {
        name: (
            f"rows of {shape[-1]} are not a multiple of {K_BLOCK}: llama.cpp chose {kind}"
            if shape[-1] % K_BLOCK
            else f"llama.cpp chose {kind}"
        )
        for name, (kind, shape) in types.items()
        if len(shape) == 2 and kind not in K_TYPES
    }
    return {name: kind for name, (kind, _) in types.items()}, fallbacks


class _ModelDesc(ctypes.Structure):
    """llama.cpp's `llama_quant_model_desc`: what its type choice reads of a model."""

    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (name, ctypes.c_uint32)
        for name in (
            "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v"
        )
    ]  # fmt: skip


class _GGMLInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@functools.cache
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL, dict[str, Any]]:
    """libllama and libggml-base as llama-cpp-python ships them, with the signatures used here."""
    llama_cpp = _llama_cpp()
    folder = Path(llama_cpp.__file__).parent / "lib"
    llama = ctypes.CDLL(str(folder / "libllama.so"))
    ggml = ctypes.CDLL(str(folder / "libggml-base.so"))
    missing = [name for name in _QUANT_API.values() if not hasattr(llama, name)]
    if missing:
        raise ExportError(
            f"llama-cpp-python {llama_cpp.__version__} lacks llama.cpp's quantization planning ({missing[0]}); "
            "the lock's version has it: pip install -c constraints.txt llama-cpp-python"
        )
    api = {key: getattr(llama, name) for key, name in _QUANT_API.items()}
    api["model_from_metadata"].restype, api["model_from_metadata"].argtypes = (
        ctypes.c_void_p,
        [ctypes.c_void_p],
    )
    api["init"].restype, api["init"].argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]
    api["compute_types"].restype = None
    api["compute_types"].argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    api["free"].argtypes = [ctypes.c_void_p]
    llama.llama_model_free.argtypes = [ctypes.c_void_p]
    ggml.ggml_init.restype, ggml.ggml_init.argtypes = ctypes.c_void_p, [_GGMLInitParams]
    ggml.ggml_free.argtypes = [ctypes.c_void_p]
    ggml.ggml_new_tensor.restype = ctypes.c_void_p
    ggml.ggml_new_tensor.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int64),
    ]
    ggml.ggml_set_name.restype, ggml.ggml_set_name.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_void_p, ctypes.c_char_p],
    )
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p
    ]  # fmt: skip
    ggml.ggml_row_size.restype, ggml.ggml_row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
    return llama, ggml, api


def _weight_order(name: str) -> tuple[int, str]:
    # The order llama.cpp's loader keeps tensors in (its weight_name_comparer): outside blocks first, then by
    # block, by name within one. The type choice counts attn_v and ffn_down tensors in this order.
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def kquant_types(
    tensors: dict[str, tuple[tuple[int, ...], int]], quant: str, arch: str, hparams: dict[str, Any]
) -> dict[str, int]:
    """The type llama.cpp's quantizer gives each tensor for the K-quant mix `quant` (q4_k_m, q5_k_m, q6_k).

    `tensors` maps each GGUF tensor name to its shape (numpy order) and the ggml type it would have in a
    full-precision file (F32 for 1-D tensors, the source precision for matrices: what an intermediate file would
    hold); `hparams` holds the file's `{arch}.*` keys (block count, heads, widths, experts), which the mix reads.
    The answer is llama.cpp's own (the more-bits layers of attn_v and ffn_down, the output head's 6 bits, a tied
    embedding counted as the head, fallbacks for rows that do not fit a block), not a transcription of it.
    """
    llama_cpp = _llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise ExportError(f"this llama-cpp-python has no quantization type {quant}")
    llama, ggml, api = _libraries()

    def key(name: str, default: int = 0) -> int:
        value = hparams.get(f"{arch}.{name}", default)
        return int(max(value) if isinstance(value, list | tuple) else value)

    heads = key("attention.head_count", 1)
    embd = key("embedding_length")
    head_dim = key("attention.key_length", embd // max(heads, 1))
    desc = _ModelDesc(
        arch.encode(),
        embd,
        key("feed_forward_length"),
        key("block_count"),
        heads,
        key("attention.head_count_kv", heads),
        key("expert_count"),
        head_dim,
        key("attention.value_length", head_dim),
    )
    names = sorted(tensors, key=_weight_order)
    params = llama_cpp.llama_model_quantize_default_params()
    model = api["model_from_metadata"](ctypes.byref(desc))
    state = api["init"](model, ctypes.byref(params))
    context = ggml.ggml_init(_GGMLInitParams(len(names) * 1024 + (1 << 16), None, True))  # infos, no data
    try:
        handles = []
        for name in names:
            shape, current = tensors[name]
            dims = (ctypes.c_int64 * len(shape))(*reversed(shape))  # ggml counts dimensions from the row
            handle = ggml.ggml_new_tensor(context, current, len(shape), dims)
            ggml.ggml_set_name(handle, name.encode())
            handles.append(handle)
        result = (ctypes.c_int * len(names))()
        api["compute_types"](state, ftype, (ctypes.c_void_p * len(names))(*handles), result, len(names))
        return dict(zip(names, result, strict=True))
    finally:
        ggml.ggml_free(context)
        api["free"](state)
        llama.llama_model_free(model)


def quantize_rows(rows: Any, qtype: int, n_threads: int | None = None) -> Any:
    """A float32 row block (2-D, rows x row length) as ggml type `qtype`, bytes as llama.cpp's quantizer writes
    them (its `ggml_quantize_chunk`, no importance matrix); the rows are split over `n_threads` threads (ctypes
    releases the GIL for the call), every core by default, as llama.cpp's quantizer does: unlike decoding,
    quantizing rows needs no synchronisation between threads."""
    import numpy as np

    _, ggml, _ = _libraries()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    count, width = rows.shape
    row_bytes = ggml.ggml_row_size(qtype, width)
    out = np.empty(count * row_bytes, dtype=np.uint8)
    threads = max(1, min(n_threads or os.cpu_count() or 1, count))
    bounds = [count * i // threads for i in range(threads + 1)]

    def run(first: int, last: int) -> int:
        if last <= first:
            return 0
        return ggml.ggml_quantize_chunk(
            qtype, rows[first].ctypes.data, out[first * row_bytes :].ctypes.data, 0, last - first, width, None
        )

    if threads == 1:
        written = run(0, count)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(run, bounds[:-1], bounds[1:]))
    if written != out.size:
        raise ExportError(f"ggml wrote {written} bytes for {count} rows of type {qtype}, expected {out.size}")
    return out


def load_for_verification(path: Path, n_ctx: int = 512, n_threads: int | None = None) -> Any:
    """The GGUF loaded with logits for every position and an f32 KV cache.

    llama.cpp's default f16 KV cache alone moves f32 logits by about 2e-3, more than the f32 bound; with
    an f32 cache the comparison measures the file, not the cache.
    """
    llama_cpp = _llama_cpp()
    threads = n_threads or default_threads()
    try:
        with quiet():
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                logits_all=True,
                type_k=0,
                type_v=0,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
    except ValueError as error:
        raise ExportError(f"llama.cpp cannot load {path}: {error}{load_hint(path)}") from None


def load_hint(path: Path) -> str:
    """What is known to make llama.cpp refuse a file that is otherwise well formed."""
    import re

    import gguf

    field = gguf.GGUFReader(path).fields.get("general.name")
    name = field.contents() if field is not None else ""
    if re.search(r"phi-?3", str(name), re.IGNORECASE):
        # Measured with llama-cpp-python 0.3.36: the same file loads under any other name.
        return (
            f". llama.cpp takes a model named '{name}' (general.name, from the run or folder name) for "
            "Microsoft's Phi-3 and its vocabulary loader then fails on any other tokenizer; export it under "
            "another name (the folder's or the run's)"
        )
    return ""


def chat_answers(
    path: Path, prompts: list[str], max_tokens: int = 24, n_threads: int | None = None
) -> list[str]:
    """Greedy answers from the GGUF in llama.cpp, each prompt sent as one user turn.

    The conversation is rendered by the chat template stored in the file (`tokenizer.chat_template`) and
    generation stops at the file's end-of-generation tokens: this is how llama.cpp, LM Studio and Ollama will
    talk to the model, so it checks that template and stop tokens travelled with the weights.
    """
    llama_cpp = _llama_cpp()
    threads = n_threads or default_threads()
    with quiet():
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    answers = []
    for prompt in prompts:
        with quiet():
            reply = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
            )
        answers.append((reply["choices"][0]["message"]["content"] or "").strip())
    return answers


def chat_completions(
    path: Path, prompts: list[str], max_tokens: int = 24, n_threads: int | None = None
) -> list[str]:
    """Greedy completions from the GGUF in llama.cpp with its control tokens rendered: what `chat_answers`
    gets, but with the thought tokens (`[thinking]` ... `[/endthinking]`) kept in the text, which llama.cpp's
    chat completion leaves out. The prompt is rendered by the file's own chat template (llama-cpp-python's
    Jinja2 formatter) and tokenized with special tokens parsed; generation stops at the file's
    end-of-generation tokens."""
    llama_cpp = _llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    threads = n_threads or default_threads()
    with quiet():
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    piece = lambda token: llm.detokenize([token], special=True).decode("utf-8", errors="replace")  # noqa: E731
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=piece(llm.token_eos()),
        bos_token=piece(llm.token_bos()) if llm.token_bos() >= 0 else "",
    )
    completions = []
    for prompt in prompts:
        text = formatter(messages=[{"role": "user", "content": prompt}]).prompt
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        out: list[int] = []
        with quiet():
            for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) >= max_tokens:
                    break
                out.append(token)
        completions.append(llm.detokenize(out, special=True).decode("utf-8", errors="replace").strip())
    return completions


def llama_logits(llm: Any, ids: list[int]):  # -> np.ndarray
    """llama.cpp's logits (float32, one row per position) for the token ids `ids`, from an empty cache; `llm`
    loaded with `load_for_verification` (logits for every position)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def decode_speeds(paths: list[Path], tokens: int, threads: int, rounds: int = 7) -> list[float]:
    """Greedy decode tokens/s of each file after a short prompt (llama.cpp, f16 KV cache as users run it).

    The files take turns, `rounds` times and in alternating order, and each keeps its best round: a single
    short run on a shared machine moves by several percent, and taking turns keeps a slow moment (or being
    first) from landing on one file only.
    """
    import numpy as np

    llama_cpp = _llama_cpp()

    models = [
        llama_cpp.Llama(model_path=str(p), n_ctx=256, n_threads=threads, logits_all=True, verbose=False)
        for p in paths
    ]
    best = [0.0] * len(models)
    for round_ in range(rounds):
        order = list(enumerate(models))
        for i, llm in order if round_ % 2 == 0 else order[::-1]:  # neither file always goes first
            llm.reset()
            llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=True))
            started = time.perf_counter()
            for _ in range(tokens):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            best[i] = max(best[i], tokens / (time.perf_counter() - started))
    for llm in models:
        llm.close()
    return best
