"""What the evaluation tests share: `toolkit eval` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def toolkit_eval(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`toolkit eval ARGS` as a user runs it: the console script in a fresh process, from `cwd`."""
    return subprocess.run(
        [str(BIN / "toolkit"), "eval", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )
