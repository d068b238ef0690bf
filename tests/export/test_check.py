"""`toolkit arch check`: each export target's verdict, before any training, in the exporter's own words."""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from export.check import check
from toolkit.cli import main
from toolkit.models import ARCHITECTURES, PRESETS, Architecture, Preset, build_config, register_architecture
from toolkit.models.decoder import DecoderConfig, DecoderForCausalLM, DecoderModel
from toolkit.models.plans import LLAMA_GGUF, load_plans

PLANS = load_plans()  # every architecture's export plan, loaded now

TARGETS = ["gguf", "vllm-native", "vllm-transformers", "remote-code"]


def _verdicts(result) -> dict[str, bool]:
    return {t.target: t.ok for t in result.targets}


def test_decoder_reaches_every_target():
    result = check("decoder")
    assert _verdicts(result) == dict.fromkeys(TARGETS, True)
    assert result.model_type == "decoder" and result.source == "default config"
    assert result.target("gguf").name == "llama"
    assert result.target("vllm-native").name == "LlamaForCausalLM"
    assert result.target("vllm-transformers").name == "DecoderForCausalLM"
    assert "modeling_decoder.py" in result.target("remote-code").detail


def test_prometheus_125m_reaches_every_target():
    result = check("prometheus-125m")
    assert result.ok, result.targets
    assert result.model_type == "prometheus" and result.source == "preset prometheus-125m"
    assert result.target("gguf").name == "gpt2"
    assert result.target("vllm-native").name == "GPT2LMHeadModel"
    # Tied embeddings: the check sees what save_pretrained writes, so no lm_head for GGUF or GPT-2 to place.
    assert "148 tensors" in result.target("gguf").detail


def test_config_check_names_the_blocking_component(tmp_path, capsys):
    build_config("decoder-tiny", hidden_act="gelu").save_pretrained(tmp_path)
    result = check(tmp_path)
    assert _verdicts(result) == {**dict.fromkeys(TARGETS, True), "gguf": False}
    assert result.target("gguf").detail == (
        "activation (hidden_act) = 'gelu' cannot be represented in llama.cpp's `llama` graph (supported: 'silu')"
    )
    assert main(["arch", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "GGUF (llama.cpp)           blocked  activation (hidden_act) = 'gelu'" in out
    assert out.rstrip().endswith("1 of 4 targets blocked")


def test_tensor_without_gguf_name_is_named(tmp_path):
    # A checkpoint with a tensor no plan knows: the folder's own safetensors headers are what is checked.
    config = build_config("decoder-tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    DecoderForCausalLM(config).save_pretrained(tmp_path)
    save_file({"model.layers.0.mlp.foo.weight": torch.zeros(4, 4)}, tmp_path / "extra.safetensors")
    result = check(tmp_path)
    assert result.target("gguf").detail.startswith(
        "tensor `model.layers.0.mlp.foo.weight` has no GGUF name in plan `llama`"
    )
    assert result.target("vllm-native").detail.startswith(
        "tensor `model.layers.0.mlp.foo.weight` becomes `model.layers.0.mlp.foo.weight`, "
        "which LlamaForCausalLM does not have"
    )


def test_plan_without_a_required_rule_is_blocked(monkeypatch):
    rules = tuple(rule for rule in LLAMA_GGUF.tensors if "down_proj" not in rule.source)
    monkeypatch.setitem(PLANS, "decoder", replace(PLANS["decoder"], gguf=replace(LLAMA_GGUF, tensors=rules)))
    detail = check("decoder-tiny").target("gguf").detail
    assert detail.startswith("tensor `model.layers.0.mlp.down_proj.weight` (and 3 more) has no GGUF name")


def test_native_layout_mismatch_is_blocked(monkeypatch):
    # Without the transpose into Conv1D's [in, out] storage, GPT-2's projections have the wrong shape.
    plan = PLANS["prometheus"]
    monkeypatch.setitem(PLANS, "prometheus", replace(plan, vllm=replace(plan.vllm, tensor_transforms=())))
    verdict = check("prometheus-tiny").target("vllm-native")
    assert not verdict.ok
    assert verdict.detail.startswith(
        "tensor `model.layers.0.self_attn.qkv_proj.weight` becomes `transformer.h.0.attn.c_attn.weight` "
        "of shape [768, 256]; GPT2LMHeadModel's is [256, 768]"
    )


def test_remote_code_needs_the_attention_interface(monkeypatch):
    monkeypatch.setattr(DecoderForCausalLM, "_supports_attention_backend", False)
    result = check("decoder")
    assert _verdicts(result) == {**dict.fromkeys(TARGETS, True), "vllm-transformers": False}
    assert "`_supports_attention_backend = True`" in result.target("vllm-transformers").detail


class PlanlessConfig(DecoderConfig):
    model_type = "planless"


class PlanlessModel(DecoderModel):
    config_class = PlanlessConfig


class PlanlessForCausalLM(DecoderForCausalLM):
    config_class = PlanlessConfig


def test_architecture_without_export_plan_is_blocked(monkeypatch):
    # Placeholders first, so that monkeypatch removes what register_architecture adds.
    monkeypatch.setitem(ARCHITECTURES, "planless", None)
    monkeypatch.setitem(PRESETS, "planless-tiny", None)
    arch = Architecture("planless", PlanlessConfig, PlanlessModel, PlanlessForCausalLM, "no export plan")
    register_architecture(arch, [Preset("planless-tiny", "planless")])
    for name in ("planless", "planless-tiny"):
        result = check(name)
        assert _verdicts(result) == dict.fromkeys(TARGETS, False)
        assert result.target("gguf").detail.startswith("architecture 'planless' has no export plan;")
        assert result.target("vllm-native").detail == result.target("gguf").detail


def test_native_llama_folder_uses_its_plan(tmp_path):
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    config.save_pretrained(tmp_path)
    result = check(tmp_path)
    assert result.model_type == "llama" and result.source.endswith("(no weights)")
    assert result.target("gguf").name == "llama"
    assert result.target("vllm-native").name == "LlamaForCausalLM"
    assert result.target("vllm-transformers").name == "LlamaForCausalLM"  # transformers' own class
    # Nothing to copy: the Hub folder loads with transformers' own class, no remote code involved.
    assert result.target("remote-code").ok and result.target("remote-code").detail.startswith("not needed")
    assert result.ok


def test_a_qwen3_folder_is_checked_by_its_plan_and_its_options(tmp_path):
    from transformers import Qwen3Config

    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=32,
        vocab_size=128,
    )
    config.save_pretrained(tmp_path / "plain")
    result = check(tmp_path / "plain")
    assert result.ok and result.target("gguf").name == "qwen3"
    config.use_sliding_window, config.sliding_window = True, 64
    config.save_pretrained(tmp_path / "windowed")
    result = check(tmp_path / "windowed")
    assert _verdicts(result) == {**dict.fromkeys(TARGETS, True), "gguf": False}
    assert result.target("gguf").detail.startswith("sliding-window attention (use_sliding_window) = True")


def test_llama_3_rope_scaling_reaches_gguf_and_another_scaling_does_not(tmp_path):
    rope = {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        rope_parameters={"rope_type": "llama3", "original_max_position_embeddings": 8192, **rope},
    )
    config.save_pretrained(tmp_path / "llama3")
    assert check(tmp_path / "llama3").target("gguf").ok
    config.rope_parameters = {
        "rope_type": "yarn",
        "rope_theta": 1e4,
        "factor": 4.0,
        "original_max_position_embeddings": 2048,
    }
    config.save_pretrained(tmp_path / "yarn")
    assert check(tmp_path / "yarn").target("gguf").ok
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    config.save_pretrained(tmp_path / "dynamic")
    assert (
        "RoPE scaling (rope_parameters.rope_type) = 'dynamic'"
        in check(tmp_path / "dynamic").target("gguf").detail
    )


def test_a_ministral3_folder_reaches_gguf_and_a_hub_folder_without_its_vllm_route(tmp_path):
    """The Hub verdict of a transformers architecture comes from transformers' own class table, not from
    the vLLM plan, which is blocked for Ministral 3 (not verified)."""
    from transformers import Ministral3Config

    Ministral3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        vocab_size=128,
    ).save_pretrained(tmp_path)
    result = check(tmp_path)
    assert result.target("gguf").ok and result.target("gguf").name == "mistral3"
    assert result.target("remote-code").ok and "Ministral3ForCausalLM" in result.target("remote-code").detail
    assert not result.target("vllm-native").ok


def test_cli_prints_a_table_and_json(capsys):
    assert main(["arch", "check", "decoder"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "decoder: architecture `decoder`, default config"
    assert lines[2].split() == ["target", "verdict", "detail"]
    assert lines[3].startswith("GGUF (llama.cpp)           ok       llama.cpp graph `llama`")
    assert lines[4].startswith("vLLM native                ok       `LlamaForCausalLM`")
    assert lines[-1] == "every target is reachable"
    assert main(["arch", "check", "prometheus-125m", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and [t["target"] for t in data["targets"]] == TARGETS
    assert data["targets"][0] == {
        "target": "gguf",
        "ok": True,
        "detail": "llama.cpp graph `gpt2`, 148 tensors named",
        "name": "gpt2",
    }


def test_unknown_name_exits_2_with_suggestion(capsys):
    assert main(["arch", "check", "prometheus-12m"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown architecture or preset 'prometheus-12m' (did you mean 'prometheus-125m'?), and no "
        "folder of that name; `toolkit arch list` shows them all"
    )


def test_folder_without_config_is_an_error(tmp_path, capsys):
    assert main(["arch", "check", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path} has no config.json; expected an HF model folder"
    )
