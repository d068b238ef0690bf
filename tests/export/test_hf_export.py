"""`toolkit export hf`, run as users run it: a Hub folder that loads without the toolkit, for an architecture
no other consumer runs (cognate: remote code) and for a transformers one (Qwen3: its own class)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export.conftest import save_model, save_preset_model

pytestmark = pytest.mark.slow

TOOLKIT = str(Path(sys.executable).parent / "toolkit")


def toolkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TOOLKIT, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cognate_becomes_a_remote_code_folder_that_loads_without_the_toolkit(tmp_path):
    save_preset_model("cognate-tiny", tmp_path / "model")
    done = toolkit("export", "hf", "model", "--out", "hub", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "hub" / "export_report.json").read_text())
    assert report["ok"] and report["remote_code"]
    assert report["files"] == ["configuration_cognate.py", "modeling_cognate.py"]
    measures = report["verification"]["model"]["measures"]
    assert measures["max_abs_logit_delta"] == 0 and measures["greedy_identical"] == 1
    assert measures["loads_without_forge_toolkit"] == 1
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cognate.CognateForCausalLM"
    assert (tmp_path / "hub" / "chat_template.jinja").exists()

    again = toolkit("export", "hf", "model", "--out", "hub", cwd=tmp_path)
    assert again.returncode != 0 and "exists; pass --force" in again.stderr

    push = toolkit("push", "hub", "--repo", "me/cognate", "--dry-run", cwd=tmp_path)
    assert push.returncode == 0, push.stderr[-3000:]
    assert "modeling_cognate.py" in push.stdout and "README.md" in push.stdout


def test_a_transformers_architecture_is_written_without_code(tmp_path):
    save_model("qwen3", tmp_path / "model", style="qwen2")
    done = toolkit("export", "hf", "model", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "model-hf"
    report = json.loads((out / "export_report.json").read_text())
    assert report["ok"] and not report["remote_code"] and report["architecture"] == "Qwen3ForCausalLM"
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())
