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


def test_the_lattice_becomes_a_remote_code_folder_verified_on_its_outputs(tmp_path):
    """Not a language model: no tokenizer, no logits; the clean process loads it with AutoModel and must give
    the source's outputs on fixed inputs, and a changed weight is caught."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from export.verify_hf import verify_outputs
    from toolkit.models import build_config, register_auto_classes

    register_auto_classes()
    torch.manual_seed(0)
    AutoModel.from_config(build_config("lattice-tiny")).save_pretrained(tmp_path / "model")
    done = toolkit("export", "hf", "model", "--out", "hub", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "hub" / "export_report.json").read_text())
    assert report["ok"] and report["remote_code"] and report["architecture"] == "LatticeModel"
    assert report["files"] == ["configuration_lattice.py", "modeling_lattice.py"]
    model = report["verification"]["model"]
    assert (
        model["measures"]["max_abs_output_delta"] == 0
        and model["measures"]["loads_without_forge_toolkit"] == 1
    )
    assert {"predicted_embedding", "output_surface"} <= set(model["outputs"])
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_lattice.LatticeConfig",
        "AutoModel": "modeling_lattice.LatticeModel",
    }

    weights = load_file(tmp_path / "hub" / "model.safetensors")
    # One cell of one layer (a random change: a constant one is cancelled by the cell's LayerNorm).
    weights["layers.1.up_weight"][3] += 0.05 * torch.randn(weights["layers.1.up_weight"][3].shape)
    save_file(weights, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    tampered = verify_outputs(
        tmp_path / "hub", tmp_path / "model", dtype="float32", expected_class=".*LatticeModel"
    )
    assert not tampered["ok"] and tampered["measures"]["max_abs_output_delta"] > 1e-5
