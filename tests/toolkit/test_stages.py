"""The stage registry is the one place methods live: the layers import downward only, the runner names no
method, and a new method is one `register_stage` call, with its own section validated and its run function
called by the unchanged runner."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from toolkit import recipe as recipes
from toolkit.errors import RecipeError
from toolkit.stages import STAGES, StageKind, StageOutcome, register_stage, section_hooks, stage_kinds
from toolkit.train import run

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):  # nested (function-level) imports too
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_under_toolkit_imports_export_or_eval():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported_modules(path) if m.split(".")[0] in ("export", "eval")
        )
        for path in (ROOT / "toolkit").rglob("*.py")
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_runner_names_no_method():
    methods = set(stage_kinds())
    for name in ("runner.py", "trainer_stage.py"):
        tree = ast.parse((ROOT / "toolkit" / "train" / name).read_text())
        literals = {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        assert not literals & methods, (name, literals & methods)


def test_the_packages_register_their_own_stages_and_sections():
    kinds = stage_kinds()
    assert {"tokenizer", "pretrain", "sft", "dpo", "grpo", "rloo", "export"} <= set(kinds)
    assert kinds["export"].run.__module__ == "export.stages"  # through the entry point, not an import
    assert "eval" in section_hooks()
    assert all(kinds[m].produces_model for m in ("pretrain", "sft", "dpo", "grpo", "rloo"))
    assert not kinds["export"].produces_model


@dataclass
class EchoOptions:
    text: str = "hello"
    times: int = 1


def run_echo(context) -> StageOutcome:
    out = context.folder.path / "echo.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(context.stage.options["text"] * context.stage.options["times"])
    return StageOutcome(details={"wrote": str(out)})


@pytest.fixture
def echo_method():
    register_stage(
        StageKind("echo", run=run_echo, description="writes text", section="echo", schema=EchoOptions)
    )
    yield
    del STAGES["echo"]


def test_a_new_method_is_one_registry_entry(echo_method, tmp_path):
    raw = {
        "name": "e",
        "output_dir": str(tmp_path / "run"),
        "stages": [{"method": "echo", "echo": {"times": 2}}],
    }
    (result,) = run(recipes.parse(raw))
    assert (tmp_path / "run" / "echo" / "echo.txt").read_text() == "hellohello"
    assert json.loads((tmp_path / "run" / "echo" / "stage.json").read_text())["method"] == "echo"
    assert result.method == "echo"
    with pytest.raises(RecipeError) as error:
        recipes.parse({"name": "e", "stages": [{"method": "echo", "echo": {"tims": "x"}, "data": {}}]})
    message = str(error.value)
    assert "unknown key 'tims' in recipe: stages.echo.echo (did you mean 'times'?)" in message
    assert "stages.echo.data: method 'echo' takes only echo" in message
