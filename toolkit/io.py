"""Atomic writes (a file or folder appears complete at its final path, or not at all), JSON lines, sizes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


@contextlib.contextmanager
def atomic_path(target: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, on error remove it.

    Beside, not in /tmp: a rename is atomic only within one filesystem. The temporary path is absolute, so that
    it names the same place for a process started elsewhere (a verification subprocess, say).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) paths; what appears at the target gets the permissions any
    # new file or folder would (0666/0777 less the umask), so that a written model folder can be shared.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if is_dir and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `target` atomically."""
    write_text(target, json.dumps(data, indent=2, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped); a missing file is a ToolkitError naming it."""
    from toolkit.errors import ToolkitError

    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"file not found: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def human_bytes(n: float) -> str:
    """A size for people: MiB below a quarter GiB, GiB above."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# Where a command's machine-readable result goes. Under `--json` the command's other prints and every library's
# log lines go to stderr instead, so that stdout holds the JSON alone (DeepSpeed, when installed, logs an
# accelerator warning to stdout as Accelerate imports it while a model is saved).
_RESULT_STREAM: TextIO | None = None


@contextlib.contextmanager
def result_on_stdout(active: bool) -> Iterator[None]:
    """While active, `sys.stdout` is stderr and only `print_result` writes to the real stdout."""
    global _RESULT_STREAM
    if not active:
        yield
        return
    _RESULT_STREAM = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _RESULT_STREAM = None


def print_result(text: str) -> None:
    """Print a command's result: to stdout, also while `result_on_stdout` sends other output to stderr."""
    print(text, file=_RESULT_STREAM or sys.stdout, flush=True)
