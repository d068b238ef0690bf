"""`codette` exports: GGUF as llama.cpp's `starcoder2` graph (f32 with and without biases, q8_0; verified in
llama.cpp against transformers), the refusal of erf GELU, and the vLLM folders: native, loaded by
transformers' own Starcoder2ForCausalLM in a clean process, and remote code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from export.gguf import export_gguf
from export.vllm import export_vllm
from tests.export.conftest import save_preset_model
from tests.export.vllm_helpers import NATIVE_IDS, native_logits
from toolkit.errors import ExportError

IDS = NATIVE_IDS


# f32 untrained and bias-free, q8_0 briefly trained; trained f32/f16 files are verified in
# tests/export/test_llama_numerics.py, against the source computed as llama.cpp computes it.


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory) -> Path:
    return save_preset_model("codette-tiny", tmp_path_factory.mktemp("codette"))


@pytest.fixture(scope="module")
def bias_free_dir(tmp_path_factory) -> Path:
    return save_preset_model("codette-tiny", tmp_path_factory.mktemp("codette-bias-free"), bias=False)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    # Distinct dropout rates, so that the vLLM test can tell which Starcoder2 key each one reached.
    return save_preset_model(
        "codette-tiny",
        tmp_path_factory.mktemp("codette-trained"),
        train=True,
        dropout=0.1,
        attention_dropout=0.05,
    )


BIASES_LLAMA_CPP_REQUIRES = ("attn_output.bias", "ffn_up.bias", "ffn_down.bias")


@pytest.mark.parametrize(
    ("fixture", "quant"),
    [("untrained_dir", "f32"), ("bias_free_dir", "f32"), ("trained_dir", "q8_0")],
    ids=["f32", "f32-bias-free", "q8_0"],
)
def test_gguf_runs_as_starcoder2_in_llama_cpp(request, tmp_path, fixture, quant):
    folder = request.getfixturevalue(fixture)
    result = export_gguf(folder, quant, tmp_path / f"c-{quant}.gguf")
    failed = [c for c in result.report["checks"] if not c["ok"]]
    assert not failed, failed
    reader = gguf.GGUFReader(result.path)
    assert reader.fields["general.architecture"].contents() == "starcoder2"
    assert reader.fields["starcoder2.attention.layer_norm_epsilon"].contents() == pytest.approx(1e-12)
    assert reader.fields["starcoder2.rope.dimension_count"].contents() == 64
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert {"blk.1.attn_norm.bias", "output_norm.bias"} <= set(tensors)
    zero_filled = [f"blk.{i}.{name}" for i in range(2) for name in BIASES_LLAMA_CPP_REQUIRES]
    if fixture == "bias_free_dir":
        # The loader requires these three biases; zeros compute exactly what no bias does.
        assert sorted(result.report["zero_filled"]) == sorted(zero_filled)
        assert all(not np.any(tensors[name].data) for name in zero_filled)
        assert tensors["blk.0.ffn_up.bias"].data.shape == (1024,)
        assert "blk.0.attn_q.bias" not in tensors  # optional in llama.cpp: left out
    else:
        assert result.report["zero_filled"] == []
        assert all(np.any(tensors[name].data) for name in zero_filled)
        assert "blk.0.attn_q.bias" in tensors
    measures = result.report["measures"]
    assert measures["top1_agreement"] >= (1.0 if quant == "f32" else 0.98)
    if quant == "f32":
        assert measures["max_abs_logit_delta"] <= 5e-4


def test_gguf_refuses_erf_gelu_before_writing(untrained_dir, tmp_path):
    folder = tmp_path / "erf"
    shutil.copytree(untrained_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "c.gguf"
    with pytest.raises(ExportError, match=r"activation \(hidden_act\) = 'gelu' .* `starcoder2` graph"):
        export_gguf(folder, "f32", out)
    assert not out.parent.exists()


def source_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0]


@pytest.mark.parametrize("fixture", ["trained_dir", "bias_free_dir"])
def test_vllm_native_folder_loads_as_starcoder2_in_clean_process(request, tmp_path, fixture):
    folder = request.getfixturevalue(fixture)
    result = export_vllm(folder, tmp_path / "vllm")
    assert result.ok, result.report["verification"]
    config = json.loads((result.path / "config.json").read_text())
    assert config["model_type"] == "starcoder2" and config["architectures"] == ["Starcoder2ForCausalLM"]
    assert config["norm_epsilon"] == 1e-12 and config["num_key_value_heads"] == 4
    assert config["use_bias"] is (fixture == "trained_dir")
    assert config["tie_word_embeddings"] is True and config["hidden_act"] == "gelu_pytorch_tanh"
    if fixture == "trained_dir":
        assert config["residual_dropout"] == config["embedding_dropout"] == 0.1
        assert config["attention_dropout"] == 0.05
    assert not {"layer_norm_eps", "bias", "dropout"} & set(config)

    logits = native_logits("Starcoder2ForCausalLM", result.path, tmp_path)
    delta = float((logits - source_logits(folder)).abs().max())
    assert delta <= 1e-5

    section = result.report["verification"]["model"]
    assert (
        section["loaded_class"] == "transformers.models.starcoder2.modeling_starcoder2.Starcoder2ForCausalLM"
    )
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    assert section["measures"]["greedy_identical"] == 1.0


@pytest.mark.slow
def test_vllm_remote_code_folder_loads_without_forge_toolkit(trained_dir, tmp_path):
    result = export_vllm(trained_dir, tmp_path / "remote", form="remote-code")
    assert result.ok, result.report["verification"]
    config = json.loads((result.path / "config.json").read_text())
    assert config["model_type"] == "codette"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_codette.CodetteForCausalLM"
    assert {"configuration_codette.py", "modeling_codette.py"} <= {p.name for p in result.path.iterdir()}
    section = result.report["verification"]["model"]
    assert section["loaded_class"].startswith("transformers_modules.")
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    assert section["measures"]["loads_without_forge_toolkit"] == 1.0
