"""Ternary GGUFs of a BitNet model: TQ2_0/TQ1_0 tensors that dequantize to exactly the layers' ternary values
times their scale (at float16, the format's scale type), verified in llama.cpp against the PyTorch BitLinear
model; a model that is not ternary is refused TQ types, naming its first tensor."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from export.gguf import export_gguf
from tests.export.conftest import train_briefly, train_tokenizer
from toolkit.errors import ExportError
from toolkit.models import build_config, register_auto_classes
from toolkit.quantization.bitnet import ternarize, to_bitnet

LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SOURCES = tuple(
    f"model.layers.{{}}.{name}.weight"
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
)


def tiny(folder, bitnet: bool, preset: str = "decoder-tiny", steps: int = 100, **overrides):
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    tokenizer = train_tokenizer("qwen2", folder)
    torch.manual_seed(0)
    config = build_config(
        preset,
        **overrides,
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    if bitnet:
        to_bitnet(model)
    train_briefly(model, tokenizer, steps=steps)  # quantization-aware: the ternary layers train through STE
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bitnet_dir(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("bitnet"), bitnet=True)


@pytest.mark.parametrize("quant", ["tq2_0", "tq1_0"])
def test_ternary_gguf_holds_the_trained_ternary_weights_and_runs(bitnet_dir, tmp_path, quant):
    result = export_gguf(bitnet_dir, quant, tmp_path / f"m-{quant}.gguf")
    assert result.ok, result.report["checks"]
    assert result.report["reference"] == "the BitNet source with llama.cpp's weights and input rounding"
    # Against the PyTorch model as it is (activations quantized per token) the gap is that rounding, reported;
    # the emulated reference is the far closer one (mean KL 1e-10..5e-8 against 4e-5..5e-5 measured, on AVX2
    # and AVX-512 builds of llama.cpp, compiled and eager BitNet layers; max |delta| 7-16x smaller).
    measures = result.report["measures"]
    assert measures["mean_kl"] < measures["mean_kl_exact"] / 100
    assert measures["max_abs_logit_delta"] < measures["max_abs_logit_delta_exact"] / 4
    types = result.tensor_types
    assert {types[f"blk.{b}.{n}.weight"] for b in (0, 1) for n in LINEAR} == {quant.upper()}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"

    latent = load_file(bitnet_dir / "model.safetensors")
    # The report's BitNet summary, against the latent weights ternarized here and the file's own size.
    summary = result.report["bitnet"]
    zeros = {}
    for block in (0, 1):
        for name, source in zip(LINEAR, SOURCES, strict=True):
            values, _ = ternarize(latent[source.format(block)])
            zeros[f"blk.{block}.{name}.weight"] = float((values == 0).float().mean())
    assert summary["zero_fraction_by_layer"] == pytest.approx(zeros, abs=1e-4)
    parameters = sum(t.numel() for name, t in latent.items() if name != "lm_head.weight")
    assert summary["parameters"] == parameters
    assert summary["compression_vs_f32"] == pytest.approx(
        parameters * 4 / result.path.stat().st_size, abs=0.01
    )
    assert summary["targets"]["compression_vs_f32"] == 6.0  # a model under 50M parameters
    stored = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    for name, source in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),):
        tensor = stored[name]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(latent[source].shape)
        values, gamma = ternarize(latent[source])
        # The format keeps one float16 scale per block of 256: the trained γ, rounded to float16.
        assert np.array_equal(got, (values.numpy() * np.float16(gamma)).astype(np.float32))


def test_every_type_of_a_bitnet_model_computes_its_ternary_layers(bitnet_dir, tmp_path):
    """An f32 file of a BitNet model holds the ternary weights the model uses, not its latent ones."""
    result = export_gguf(bitnet_dir, "f32", tmp_path / "m.gguf")
    assert result.ok, result.report["checks"]
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(result.path).tensors}
    latent = load_file(bitnet_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    values, gamma = ternarize(latent)
    assert np.array_equal(stored["blk.0.ffn_up.weight"], (values * gamma).numpy())
    assert result.report["measures"]["max_abs_logit_delta"] < 5e-4  # no activation rounding in f32 files


def test_a_model_that_is_not_ternary_is_refused_tq_types(tmp_path):
    folder = tiny(tmp_path / "plain", bitnet=False)
    with pytest.raises(
        ExportError,
        match=r"tensor `model.layers.0.self_attn.k_proj.weight` is not ternary \(\d+ distinct values\)",
    ):
        export_gguf(folder, "tq2_0", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_wrong_scale_in_the_file_fails_the_bound(bitnet_dir, tmp_path):
    """The bounds catch a file that computes another model: one ternary matrix's scales off by 10%."""
    from export import verify as verification
    from export.gguf import Checkpoint, gguf_plan, plan_tensors
    from export.tokenizer_gguf import read_vocab

    result = export_gguf(bitnet_dir, "tq2_0", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(result.path, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    blocks = tensor.data.view(np.uint8).reshape(
        -1, 66
    )  # TQ2_0 block: 64 bytes of 2-bit values, a float16 scale
    scales = blocks[:, 64:66].copy().view(np.float16)
    blocks[:, 64:66] = (scales * np.float16(1.1)).view(np.uint8)
    reader.data.flush()
    import json

    config = json.loads((bitnet_dir / "config.json").read_text())
    plan = gguf_plan(config["model_type"])
    jobs = plan_tensors(Checkpoint.scan(bitnet_dir).shapes(), plan, config)
    report = verification.verify_gguf(
        result.path, bitnet_dir, "tq2_0", plan, jobs, read_vocab(bitnet_dir, config["vocab_size"])
    )
    failed = {c["measure"] for c in report["checks"] if not c["ok"]}
    assert failed == {"max_abs_logit_delta", "mean_kl"}, report["measures"]


def test_the_bitnet_familys_squared_relu_is_refused_naming_the_activation(tmp_path):
    """transformers' BitNet computes its MLP with relu2 by default, llama.cpp's `bitnet` graph with SiLU: such a
    model would run in llama.cpp as another function, so no file is written and the error names the field."""
    folder = tiny(tmp_path / "relu2", bitnet=True, preset="bitnet-tiny", steps=1)
    with pytest.raises(ExportError, match=r"activation \(hidden_act; .*SiLU.*hidden_act: silu.* = 'relu2'"):
        export_gguf(folder, "tq2_0", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_the_compression_target_runs_from_6x_to_12x_with_size():
    from export.gguf import compression_target

    assert compression_target(4_000_000) == 6.0 and compression_target(3_000_000_000) == 12.0
    assert 6.0 < compression_target(125_000_000) < compression_target(1_000_000_000) < 12.0


def test_the_report_quotes_the_staged_quantization_the_model_descends_from(tmp_path):
    """An SFT stage after a staged quantization: its export quotes that stage's record, not a later stage's."""
    import json

    import yaml

    from export.gguf import quantization_accuracy

    stages = [{"name": n, "method": "pretrain"} for n in ("base", "ternary", "sft", "later")]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "stages": stages}))
    for name, drop in (("ternary", 0.04), ("later", 0.5)):
        (tmp_path / name).mkdir()
        record = {
            "measure": "perplexity",
            "max_drop": 0.1,
            "full_precision": {"score": 100.0},
            "groups": [{"decision": "ternary"}, {"decision": "fallback"}],
            "final": {"score": 100.0 * (1 + drop), "drop": drop},
        }
        (tmp_path / name / "quantization.json").write_text(json.dumps(record))
    for name in ("base", "sft"):
        (tmp_path / name / "final").mkdir(parents=True)
    quoted = quantization_accuracy(tmp_path / "sft" / "final")
    assert quoted["stage"] == "ternary" and quoted["drop"] == 0.04 and quoted["met"]
    assert quoted["groups"] == ["ternary", "fallback"]
    assert quantization_accuracy(tmp_path / "base" / "final") is None
