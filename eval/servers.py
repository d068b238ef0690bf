"""OpenAI-compatible servers started for the length of one job: llama-cpp-python's (`python -m
llama_cpp.server`, for GGUF files) and `vllm serve` (for vLLM folders, from the vLLM environment).

Each is bound to 127.0.0.1 on a free port, waited for until it answers, and stopped with its whole process
group when the block ends, also when the block raises: an evaluation that fails leaves no server behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolkit.errors import ToolkitError

START_S = 900  # vLLM's CPU engine takes about a minute to start on 2 cores; llama.cpp a second or two


# What a server's log says about why it stopped: the exception its child processes raised (vLLM tags every line
# of a worker's traceback ERROR, so the message line is the one to find), an engine failure naming each dead
# process with its exit code (-9 being the kernel's kill), the kernel's own words; then the other error lines.
MESSAGE = re.compile(
    r"\b\w*(Error|Exception|Interrupt)\b: |Killed|out of memory|Failed core proc", re.IGNORECASE
)
CAUSE = re.compile(r"\bERROR\b|exit ?code", re.IGNORECASE)


def failure_excerpt(text: str, causes: int = 20, tail: int = 1500) -> str:
    """A failed server's log cut to what explains it: the lines with an exception's message (first), then other
    error lines, `causes` in all, then its last `tail` characters."""
    lines = [line[:400] for line in text.splitlines()]
    named = [line for line in lines if MESSAGE.search(line)]
    named += [line for line in lines if CAUSE.search(line) and line not in named]
    head = "lines naming the cause:\n" + "\n".join(named[:causes]) + "\n" if named else ""
    return f"{head}its end:\n{text[-tail:]}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(url: str) -> bool:
    """Whether the server answers `/health` (vLLM) or `/v1/models` (llama-cpp-python, which has no /health)."""
    for path in ("/health", "/v1/models"):
        try:
            with urllib.request.urlopen(url + path, timeout=5) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            continue
    return False


@contextmanager
def server(
    argv: list[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    start_s: float = START_S,
    attempts: int = 2,
) -> Iterator[str]:
    """Start `argv` (which must listen on 127.0.0.1:`port`), yield its base URL once it answers, and stop its
    process group afterwards (SIGTERM, then SIGKILL after 60 s). Its output goes to `log`.

    A server that exits before it answers is started again, up to `attempts` times in all, with a warning that
    quotes why (its log is kept beside, as `<log>.<n>`): a vLLM engine can die while it starts for reasons
    outside the model (memory taken by other processes at that moment), and a failure that repeats is then
    reported with its cause."""
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    for attempt in range(1, attempts + 1):
        with log.open("w") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        started = time.perf_counter()
        try:
            while not ready(url):
                if process.poll() is not None:
                    break
                if time.perf_counter() - started > start_s:
                    raise ToolkitError(
                        f"{' '.join(argv[:3])} did not answer in {start_s:.0f} s; its log: {log}"
                    )
                time.sleep(0.5)
            else:
                yield url
                return
        finally:
            stop(process)
        why = (
            f"{Path(argv[0]).name} {' '.join(argv[1:3])} exited {process.returncode} before serving; "
            f"its log ({log}), {failure_excerpt(log.read_text())}"
        )
        if attempt == attempts:
            raise ToolkitError(why)
        kept = log.with_name(f"{log.name}.{attempt}")
        log.replace(kept)
        warnings.warn(f"{why.replace(str(log), str(kept))}\nstarting it again", RuntimeWarning, stacklevel=3)


def stop(process: subprocess.Popen) -> None:
    """Stop a server started in its own session, with everything it started."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def llama_cpp_argv(gguf: Path, port: int, n_ctx: int = 2048, n_threads: int | None = None) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on `gguf`, in this interpreter."""
    from export.llama_cpp import default_threads

    threads = str(n_threads or default_threads())
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        threads,
        "--n_threads_batch",
        threads,
    ]


@contextmanager
def llama_cpp_server(gguf: Path, log: Path, n_ctx: int = 2048, n_threads: int | None = None) -> Iterator[str]:
    """llama-cpp-python's server on `gguf` for the length of the block; yields its base URL."""
    port = free_port()
    with server(llama_cpp_argv(gguf, port, n_ctx, n_threads), port, log, start_s=300) as url:
        yield url
