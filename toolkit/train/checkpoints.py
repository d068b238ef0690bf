"""Which checkpoint a resumed stage starts from: the newest complete one.

`Trainer` writes a checkpoint in place (`checkpoint-N/`: weights, optimizer, scheduler, RNG states, and
`trainer_state.json` last, transformers' `_save_checkpoint`), so a run killed while saving leaves a folder
that looks like the newest checkpoint and is not one; `transformers.trainer_utils.get_last_checkpoint` picks
it, and resuming dies on a missing file. Here a checkpoint counts only when its `trainer_state.json` reads
as JSON for its own step and the weights and RNG state are beside it; an incomplete one is removed (the
next save of that step writes it afresh), and the run says so.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def checkpoint_step(folder: str | Path) -> int | None:
    """N of a `checkpoint-N` folder (None for any other name)."""
    match = CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is)."""
    state = folder / "trainer_state.json"
    if not state.exists():
        return "no trainer_state.json"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except json.JSONDecodeError:
        return "trainer_state.json is cut short"
    named = checkpoint_step(folder)
    if named is not None and step != named:
        return f"trainer_state.json is for step {step}"
    if not any((folder / name).exists() for name in WEIGHTS):
        return "no weights"
    if not any(folder.glob("rng_state*.pth")):
        return "no RNG state"
    return None


def checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, newest step first."""
    if not output_dir.is_dir():
        return []
    found = [(n, p) for p in output_dir.iterdir() if p.is_dir() and (n := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def resume_checkpoint(output_dir: Path, stage: str) -> str | None:
    """The newest complete checkpoint of `output_dir` to resume from; incomplete newer ones are removed."""
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            print(f"[{stage}] resuming from {folder}")
            return str(folder)
        print(f"[{stage}] {folder.name} is incomplete ({problem}; the run stopped while saving it): removed")
        shutil.rmtree(folder)
    if output_dir.is_dir():
        print(f"[{stage}] no complete checkpoint in {output_dir}: the stage starts again")
    return None
