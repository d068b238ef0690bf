"""The same lm-eval task on one model three ways, as `toolkit eval` runs each: the checkpoint in transformers
(lm-eval's HF model class), its q8_0 GGUF (`forge-gguf`: llama-cpp-python's server for generation, llama.cpp's
logits for log-likelihoods) and its `toolkit export vllm` folder (`vllm serve` from the vLLM environment with
lm-eval's completions client; skipped without `make vllm-env`).

    python bench/eval_speed.py [--src MODEL_DIR] [--work DIR] [--tasks forge_heldout,forge_heldout_choice]
                               [--limit 100]

SRC defaults to `decoder-125m` with random weights and a toolkit tokenizer (built once in the work folder).
Each artifact is a fresh `toolkit eval` process, alone on the machine, timed from start to exit (model load
and server start included: what a user waits for) and, from its results, the tasks' scores. Printed: seconds
per artifact and the ratio to the checkpoint's. One run: figures to read, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from export_gguf import build_checkpoint  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parents[1]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")


def timed_eval(src: Path, tasks: str, limit: int, work: Path) -> tuple[float, dict]:
    """Wall seconds of `toolkit eval SRC --tasks T --limit N --json`, and its results mapping."""
    started = time.perf_counter()
    done = subprocess.run(
        [TOOLKIT, "eval", str(src), "--tasks", tasks, "--limit", str(limit), "--json"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"toolkit eval {src} failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", type=Path, default=None, help="HF model folder (default: decoder-125m, random)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-eval")
    parser.add_argument("--tasks", default="forge_heldout,forge_heldout_choice")
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = (args.src or build_checkpoint(args.work)[0]).resolve()
    gguf, vllm_dir = args.work / "model-q8_0.gguf", args.work / "vllm"
    if not gguf.exists():
        subprocess.run(
            [TOOLKIT, "export", "gguf", str(src), "--quant", "q8_0", "--out", str(gguf)], check=True
        )
    sys.path.insert(0, str(ROOT))
    from export.verify_vllm import vllm_executable

    artifacts = [("checkpoint (transformers)", src), ("q8_0 GGUF (llama.cpp)", gguf)]
    if vllm_executable() is not None:
        if not (vllm_dir / "config.json").exists():
            subprocess.run(
                [
                    TOOLKIT,
                    "export",
                    "vllm",
                    str(src),
                    "--out",
                    str(vllm_dir),
                    "--force",
                    "--verify-in",
                    "clean",
                ],
                check=True,
            )
        artifacts.append(("vLLM folder (vllm serve)", vllm_dir))
    else:
        print("no vLLM environment (make vllm-env): the vLLM folder is skipped")

    print(f"model: {src}; tasks {args.tasks}, limit {args.limit}", flush=True)
    rows = []
    for name, path in artifacts:
        print(f"{name} ...", flush=True)
        seconds, results = timed_eval(path, args.tasks, args.limit, args.work)
        scores = ", ".join(
            f"{task} {key.split(',')[0]} {value:.3f}"
            for task, metrics in results.items()
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, float)
        )
        rows.append((name, seconds, scores))
    reference = rows[0][1]
    print(f"\n{'artifact':<28} {'seconds':>8} {'ratio':>6}  scores")
    for name, seconds, scores in rows:
        print(f"{name:<28} {seconds:>8.1f} {seconds / reference:>5.2f}x  {scores}")


if __name__ == "__main__":
    main()
