"""Serving one model two ways: `vllm serve` (the vLLM environment, the CPU build without a GPU) of its
`toolkit export vllm` folder, against llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`,
llama.cpp's `llama-server` role) on its q8_0 GGUF.

    python bench/serve.py [--src MODEL_DIR] [--work DIR] [--tokens 64] [--threads N]

SRC defaults to `decoder-125m` with random weights and a toolkit tokenizer (built once in the work folder).
Each server is started with `toolkit serve --run` / `python -m llama_cpp.server`, bound to 127.0.0.1, alone
on the machine (one after the other), and sent the same prompts one at a time with the `openai` client,
streaming, greedy, `max_tokens` fixed (end-of-sequence ignored on vLLM; random weights rarely stop early,
and what each server generated is counted). Measured per request: time to first token, and decode tokens/s
after it (the tokens the server reports over the rest of a whole request's time); printed as medians with
the ratio vLLM / llama.cpp. One run: figures to read, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from export_gguf import build_checkpoint  # bench/ is on sys.path when a bench script runs

from eval.servers import free_port, llama_cpp_argv, server

ROOT = Path(__file__).resolve().parents[1]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")
PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Three facts about the Moon:",
    "In the morning the market opened with",
    "Une recette simple pour le pain:",
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "To install the package, first",
]


def run_prompts(url: str, tokens: int, extra: dict) -> list[tuple[float, float, int]]:
    """(time to first token, decode tokens/s after it, tokens) for each prompt, one request at a time, to the
    first model the server lists. Each prompt is sent twice: streamed, for the time to its first chunk; and
    whole, for the total time and the server's own token count (`usage`: streamed chunks are not tokens, a
    token that ends inside a UTF-8 character sends none)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    client.completions.create(model=model, prompt="warm up", max_tokens=4, temperature=0.0, extra_body=extra)
    results = []
    for prompt in PROMPTS:
        request = dict(model=model, prompt=prompt, max_tokens=tokens, temperature=0.0, extra_body=extra)
        sent = time.perf_counter()
        with client.completions.create(stream=True, **request) as stream:  # closed after the first chunk
            next(iter(stream))
            first = time.perf_counter() - sent
        sent = time.perf_counter()
        answer = client.completions.create(**request)
        total = time.perf_counter() - sent
        count = answer.usage.completion_tokens
        results.append((first, (count - 1) / max(total - first, 1e-9), count))
    return results


def summary(name: str, results: list[tuple[float, float, int]]) -> tuple[float, float]:
    ttft = statistics.median(r[0] for r in results)
    rate = statistics.median(r[1] for r in results)
    print(f"{name:<28} {ttft * 1000:>10.0f} {rate:>12.1f} {sum(r[2] for r in results):>8}")
    return ttft, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", type=Path, default=None, help="HF model folder (default: decoder-125m, random)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serve")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.src or build_checkpoint(args.work)[0]
    vllm_dir, gguf = args.work / "vllm", args.work / "model-q8_0.gguf"
    if not (vllm_dir / "config.json").exists():
        subprocess.run(
            [TOOLKIT, "export", "vllm", str(src), "--out", str(vllm_dir), "--force", "--verify-in", "clean"],
            check=True,
        )
    if not gguf.exists():
        subprocess.run(
            [TOOLKIT, "export", "gguf", str(src), "--quant", "q8_0", "--out", str(gguf)], check=True
        )

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    env.pop("OMP_NUM_THREADS", None)  # each server uses the machine as it would in production
    print(
        f"model: {src}; {len(PROMPTS)} prompts, {args.tokens} tokens each, one request at a time", flush=True
    )
    port = free_port()
    print("vllm serve (vLLM environment) ...", flush=True)
    argv = [TOOLKIT, "serve", str(vllm_dir), "--run", "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with server(argv, port, args.work / "vllm.log", env) as url:
        print(f"  ready in {time.perf_counter() - started:.0f} s", flush=True)
        vllm = run_prompts(url, args.tokens, {"ignore_eos": True})
    port = free_port()
    print("llama_cpp.server (q8_0 GGUF) ...", flush=True)
    argv = llama_cpp_argv(gguf, port, n_ctx=2048, n_threads=args.threads)
    started = time.perf_counter()
    with server(argv, port, args.work / "llama-cpp.log", env) as url:
        print(f"  ready in {time.perf_counter() - started:.0f} s", flush=True)
        llama = run_prompts(url, args.tokens, {})

    print(f"\n{'server':<28} {'TTFT (ms)':>10} {'decode tok/s':>12} {'tokens':>8}")
    v_ttft, v_rate = summary("vllm serve (f32 folder)", vllm)
    l_ttft, l_rate = summary("llama_cpp.server (q8_0)", llama)
    print(
        f"\nratio vLLM / llama.cpp: time to first token {v_ttft / l_ttft:.2f}x, decode {v_rate / l_rate:.2f}x"
    )


if __name__ == "__main__":
    main()
