"""lm-eval through `toolkit eval`: the toolkit's own tasks (eval/tasks/) give the same numbers through the
toolkit's command as through lm-eval's own command line on the same folder, results land in
<folder>/eval/<timestamp>/ saying what they were computed on, and an unknown task name is refused with the
nearest one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.vllm import export_vllm
from tests.export.vllm_helpers import make_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TASKS = "forge_heldout,forge_heldout_choice,forge_corpus"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """runs/tiny: a one-layer toolkit `decoder` in its sft stage."""
    return make_run(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def folder(run) -> Path:
    """The same model as transformers' own LlamaForCausalLM, which lm-eval's command loads by itself."""
    return export_vllm(run, run.parent / "llama", verify=False).path


def test_toolkit_eval_equals_lm_eval_itself(folder, tmp_path):
    ours = subprocess.run(
        [str(BIN / "toolkit"), "eval", str(folder), "--tasks", TASKS, "--limit", "8", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    results = json.loads(ours.stdout)  # --json: the results mapping and nothing else on stdout
    theirs = subprocess.run(
        [
            str(BIN / "lm_eval"),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={folder},dtype=float32",
            "--tasks",
            TASKS,
            "--include_path",
            str(ROOT / "eval" / "tasks"),
            "--limit",
            "8",
            "--output_path",
            str(tmp_path / "lm-eval"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    reference = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())["results"]
    for task in TASKS.split(","):
        numbers = {k: v for k, v in reference[task].items() if isinstance(v, float)}
        assert numbers and {k: results[task][k] for k in numbers} == numbers
    assert 1.0 < results["forge_corpus"]["byte_perplexity,none"] < 1e6

    saved = sorted((folder / "eval").glob("*/results.json"))[-1]
    record = json.loads(saved.read_text())
    assert record["results"] == results
    assert record["chat_template"] is False and record["limit"] == 8 and record["dtype"] == "float32"
    assert record["n"] == dict.fromkeys(TASKS.split(","), 8) and record["harness"].startswith("lm-eval 0.4")
    assert "| artifact | forge_heldout exact_match |" in (saved.parent / "report.md").read_text()


def test_unknown_task_names_the_nearest(folder, tmp_path):
    proc = subprocess.run(
        [str(BIN / "toolkit"), "eval", str(folder), "--tasks", "forge_heldot"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "'forge_heldot' (did you mean 'forge_heldout'?)" in proc.stderr


def test_several_sources_side_by_side(run, folder, tmp_path):
    """A run folder (the toolkit's decoder, registered) and its Llama export in one table: the same weights
    give the same numbers through either class; each source keeps its own results."""
    proc = subprocess.run(
        [
            str(BIN / "toolkit"),
            "eval",
            str(run),
            str(folder),
            "--tasks",
            "forge_corpus",
            "--limit",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert list(results) == [str(run), str(folder)]
    ours, theirs = (results[key]["forge_corpus"]["byte_perplexity,none"] for key in results)
    assert ours == pytest.approx(theirs, rel=1e-6)
    record = json.loads(sorted((run / "eval").glob("*/results.json"))[-1].read_text())
    assert record["artifact"] == str((run / "sft" / "final").resolve())
