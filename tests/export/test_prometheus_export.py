"""`prometheus` exports: GGUF as llama.cpp's `gpt2` graph (f32 and q8_0, verified in llama.cpp against
transformers) and the native vLLM folder, loaded by transformers' own GPT2LMHeadModel in a clean process."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from export.gguf import export_gguf
from export.vllm import export_vllm
from tests.export.conftest import save_preset_model
from tests.export.vllm_helpers import NATIVE_IDS, native_logits

IDS = NATIVE_IDS


# Untrained logits are flat (fine for f32 parity); training makes them peaked as a trained model's are, which
# makes the q8_0 agreement meaningful. Trained f32/f16 files: tests/export/test_llama_numerics.py.


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory) -> Path:
    return save_preset_model("prometheus-tiny", tmp_path_factory.mktemp("prometheus"))


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    return save_preset_model("prometheus-tiny", tmp_path_factory.mktemp("prometheus-trained"), train=True)


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_gguf_runs_as_gpt2_in_llama_cpp(request, tmp_path, quant):
    folder = request.getfixturevalue("untrained_dir" if quant == "f32" else "trained_dir")
    result = export_gguf(folder, quant, tmp_path / f"p-{quant}.gguf")
    failed = [c for c in result.report["checks"] if not c["ok"]]
    assert not failed, failed
    reader = gguf.GGUFReader(result.path)
    assert reader.fields["general.architecture"].contents() == "gpt2"
    names = {t.name for t in reader.tensors}
    assert {"position_embd.weight", "blk.1.attn_qkv.bias", "output_norm.bias"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert result.report["measures"]["top1_agreement"] >= (1.0 if quant == "f32" else 0.98)


def test_vllm_native_folder_loads_as_gpt2_in_clean_process(trained_dir, tmp_path):
    result = export_vllm(trained_dir, tmp_path / "vllm")
    assert result.ok, result.report["verification"]
    config = json.loads((result.path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["n_embd"] == 256 and config["n_inner"] == 1024 and config["n_positions"] == 256

    logits = native_logits("GPT2LMHeadModel", result.path, tmp_path)
    source = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = source(input_ids=torch.tensor([IDS])).logits[0]
    assert float((logits - expected).abs().max()) <= 1e-5

    section = result.report["verification"]["model"]
    assert section["loaded_class"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    assert section["measures"]["greedy_identical"] == 1.0
