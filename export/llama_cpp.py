"""llama.cpp through llama-cpp-python: K-quants with llama.cpp's own quantizer, and loading for verification.

K-quant block search (and the per-tensor mixes of Q4_K_M / Q5_K_M) exist only in ggml's C code: gguf-py can
dequantize K types but not produce them, so they come from `llama_model_quantize` on an f32/f16/bf16 GGUF
that export/gguf.py wrote. No llama.cpp checkout or build is involved: llama-cpp-python ships the library.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError

# Types that count as "a K-quant" when deciding whether llama.cpp fell back on a tensor.
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
K_BLOCK = 256


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
