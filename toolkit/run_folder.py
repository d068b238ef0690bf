"""The one model of a run folder, read and written by the runner, the exporters, the model card and the tests.

    runs/<name>/recipe.yaml          the resolved recipe: the stages and their order
    runs/<name>/env.json             package versions and hardware
    runs/<name>/resume.json          recipe changes accepted on `--resume` (when there were any)
    runs/<name>/<stage>/             final/ (an HF folder, for stages that make a model), checkpoints/,
                                     metrics.jsonl, plots/*.png, eval.json, stage.json (written last: done)
    runs/<name>/gguf/                <name>-<quant>.gguf, its .report.json, Modelfile (recipe stage or command)
    runs/<name>/vllm/                the servable folder of `toolkit export vllm`

Stage order comes from `recipe.yaml`, never from file times. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import ToolkitError
from toolkit.io import read_jsonl

STAGE_DONE = "stage.json"


def is_model_folder(path: Path) -> bool:
    """An HF model folder (full weights) or a PEFT adapter folder."""
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def model_folder_of(src: str | Path) -> tuple[Path, RunFolder | None]:
    """The model folder SRC stands for, and the run it belongs to (if any): a model folder itself, a stage
    folder (its `final/`), or a run folder (the last stage in recipe order whose `final/` holds a model)."""
    src = Path(src)
    run = RunFolder.containing(src)
    if is_model_folder(src):
        return src, run if run is not None and src.name == "final" else None
    if is_model_folder(src / "final"):
        return src / "final", run
    if run is not None and run.path == src:
        return run.last_model().final, run
    raise ToolkitError(
        f"{src} is neither an HF model folder (config.json), a stage folder (a final/ inside) nor a run "
        "folder (recipe.yaml, naming its stages)"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file ([] when absent)."""
    return read_jsonl(path) if Path(path).exists() else []


@dataclass(frozen=True)
class StageFolder:
    """`runs/<name>/<stage>/`."""

    run: RunFolder
    name: str
    method: str

    @property
    def path(self) -> Path:
        return self.run.path / self.name

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.json"

    @property
    def done_path(self) -> Path:
        return self.path / STAGE_DONE

    @property
    def has_model(self) -> bool:
        return is_model_folder(self.final)

    @property
    def complete(self) -> bool:
        return self.done_path.exists()

    def eval(self) -> dict[str, Any] | None:
        return _read_json(self.eval_path)

    def outcome(self) -> dict[str, Any] | None:
        """What the stage recorded when it finished (`stage.json`), None while it is not done."""
        return _read_json(self.done_path)


@dataclass(frozen=True)
class RunFolder:
    """`runs/<name>/`: a run of one recipe."""

    path: Path

    @classmethod
    def containing(cls, path: str | Path) -> RunFolder | None:
        """The run folder `path` is, or a stage of it, or a stage's `final/`; None when it is none of them."""
        path = Path(path)
        for candidate in (path, path.parent, path.parent.parent):
            if (candidate / "recipe.yaml").exists():
                return cls(candidate)
        return None

    @property
    def name(self) -> str:
        return str(self.recipe().get("name") or self.path.name)

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def env_path(self) -> Path:
        return self.path / "env.json"

    @property
    def resume_path(self) -> Path:
        return self.path / "resume.json"

    def recipe(self) -> dict[str, Any]:
        if not self.recipe_path.exists():
            raise ToolkitError(f"{self.path} is not a run folder (no recipe.yaml)")
        return yaml.safe_load(self.recipe_path.read_text()) or {}

    def env(self) -> dict[str, Any] | None:
        return _read_json(self.env_path)

    def stages(self) -> list[StageFolder]:
        """Every stage, in the recipe's order."""
        return [StageFolder(self, str(s["name"]), str(s["method"])) for s in self.recipe().get("stages", [])]

    def stage(self, name: str) -> StageFolder:
        for stage in self.stages():
            if stage.name == name:
                return stage
        names = ", ".join(s.name for s in self.stages())
        raise ToolkitError(f"{self.path} has no stage '{name}' (stages: {names})")

    def last_model(self) -> StageFolder:
        """The last stage, in recipe order, whose `final/` holds a model: what an export of the run takes."""
        with_model = [s for s in self.stages() if s.has_model]
        if not with_model:
            raise ToolkitError(f"{self.path}: no stage has a model in its final/ folder yet")
        return with_model[-1]

    @property
    def gguf_dir(self) -> Path:
        return self.path / "gguf"

    def gguf_path(self, quant: str) -> Path:
        """`runs/<name>/gguf/<name>-<quant>.gguf`: where every GGUF of the run goes."""
        return self.gguf_dir / f"{self.name}-{quant}.gguf"

    @property
    def vllm_dir(self) -> Path:
        return self.path / "vllm"

    @property
    def hf_dir(self) -> Path:
        """`runs/<name>/hf`: the Hub folder (`toolkit export hf`)."""
        return self.path / "hf"

    def gguf_files(self) -> list[Path]:
        return sorted(self.gguf_dir.glob("*.gguf")) if self.gguf_dir.is_dir() else []
