"""The clean-process checks of an exported HF folder: an intact remote-code folder passes every one; checkpoint
names without a parameter fail, where transformers alone only warns and vLLM's loaders refuse. How vLLM's
Transformers backend runs a folder is tested in vLLM itself (tests/export/test_in_vllm.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.verify_hf import compare, reference, run_clean
from export.vllm import export_vllm
from tests.export.vllm_helpers import make_run

ANY_CLASS = r".*"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def source(run) -> dict:
    return reference(run / "sft" / "final", "float32")


@pytest.fixture(scope="module")
def remote(run, tmp_path_factory) -> Path:
    return export_vllm(run, tmp_path_factory.mktemp("remote") / "out", form="remote-code", verify=False).path


def test_intact_folder_passes_every_check(remote, source):
    section = compare(source, run_clean(remote, remote_code=True), ANY_CLASS)
    assert section["ok"], section["checks"]
    assert section["loading_problems"] == []


def test_checkpoint_names_must_match_one_to_one(remote, source, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(remote, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    section = compare(source, run_clean(folder, remote_code=True), ANY_CLASS)
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5  # transformers alone computes the same
    assert section["loading_problems"] == ["unexpected: model.extra.weight"]
    assert not section["ok"]
