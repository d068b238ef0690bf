"""GGUF export of `decoder` and of HF Llama/Mistral/Qwen2/Qwen3/OLMo 2/Phi-3 folders, verified against transformers in llama.cpp."""

from __future__ import annotations

import json
import os
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from export.gguf import QUANTS, export_gguf
from export.report import report_path
from toolkit.errors import ExportError

NUMPY_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def _assert_verified(result) -> dict:
    report = result.report
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    assert json.loads(report_path(result.path).read_text())["ok"] is True
    return report["measures"]


@pytest.mark.parametrize("quant", NUMPY_TYPES)
def test_decoder_numpy_types_match_transformers(decoder_dir, tmp_path, quant):
    result = export_gguf(decoder_dir, quant, tmp_path / f"m-{quant}.gguf")
    measures = _assert_verified(result)
    reader = gguf.GGUFReader(result.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay F32
    assert types["blk.0.ffn_down.weight"] == QUANTS[quant].matrix
    assert reader.fields["general.file_type"].contents() == int(QUANTS[quant].file_type)
    if quant in ("f32", "q8_0"):  # the q8_0 figure expected of a trained model
        assert measures["top1_agreement"] >= (1.0 if quant == "f32" else 0.98)


@pytest.mark.slow
def test_decoder_k_quant_through_llama_cpp(decoder_dir, tmp_path):
    result = export_gguf(decoder_dir, "q4_k_m", tmp_path / "m-q4_k_m.gguf")
    _assert_verified(result)
    assert result.fallbacks == {}  # hidden 256 and intermediate 512: every row fits a K block
    assert set(result.tensor_types.values()) >= {"Q4_K", "F32"}


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quants_in_one_pass_equal_llama_cpps_quantizer(make_model, tmp_path, monkeypatch, quant):
    """One pass from safetensors gives the bytes llama.cpp's own quantizer makes of a full-precision file.

    Eight blocks, so that the mix's more-bits layers (attn_v and ffn_down of blocks 0, 3, 6, 7) differ from
    the others, and ffn_down rows of 384, which take llama.cpp's fallback types. No file but the final one
    (under its temporary name) is on disk while the tensors are written.
    """
    import export.llama_cpp as llama_cpp

    folder = make_model("decoder", tmp_path / "d", num_hidden_layers=8, intermediate_size=384)
    reference = tmp_path / "reference"
    reference.mkdir()
    full = export_gguf(folder, "f32", reference / "f32.gguf", verify=False).path
    llama_cpp.quantize_with_llama_cpp(full, reference / f"{quant}.gguf", quant)

    out = tmp_path / "ours"
    out.mkdir()
    seen: set[str] = set()
    quantize_rows = llama_cpp.quantize_rows

    def watched(*args, **kwargs):
        seen.update(p.name for p in out.iterdir())
        return quantize_rows(*args, **kwargs)

    monkeypatch.setattr(llama_cpp, "quantize_rows", watched)
    result = export_gguf(folder, quant, out / f"{quant}.gguf", verify=False)
    assert seen == {f".{quant}.gguf.{os.getpid()}.partial"}  # no intermediate file

    ours = {t.name: (t.tensor_type.name, bytes(t.data)) for t in gguf.GGUFReader(result.path).tensors}
    theirs = {
        t.name: (t.tensor_type.name, bytes(t.data))
        for t in gguf.GGUFReader(reference / f"{quant}.gguf").tensors
    }
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if ours[name] != theirs[name]] == []
    if quant == "q4_k_m":
        assert ours["blk.0.attn_v.weight"][0] == ours["blk.3.attn_v.weight"][0] == "Q6_K"
        assert ours["blk.1.attn_v.weight"][0] == "Q4_K"
        assert (
            "output.weight" not in ours and ours["token_embd.weight"][0] == "Q6_K"
        )  # tied: the head's 6 bits
        assert ours["blk.1.ffn_down.weight"][0] == "Q5_0"  # 384-wide rows: llama.cpp's fallback
    assert gguf.GGUFReader(result.path).fields["general.file_type"].contents() == int(QUANTS[quant].file_type)


# Llama 3.1's RoPE scaling with a short original context, so that most frequencies are scaled.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


# YaRN with a short original context, so that the ramp between scaled and unscaled frequencies falls inside
# the rotary dimensions; without mscale, the cos/sin scale is get_mscale(4) = 1.139.
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
}
# Ministral 3: YaRN with mscale = mscale_all_dim (an attention scale of 1), and Llama 4's query scaling, whose
# log(1 + floor(position / 8)) grows over the verification prompts.
MINISTRAL3_ROPE = {
    **YARN,
    "original_max_position_embeddings": 8,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}

# Phi-3 128k / Phi-4-mini's LongRoPE: two tables of one divisor per rotary frequency (32 here) and a context
# twice the original, so the cos/sin scale is sqrt(1 + log 2 / log 512) = 1.054; prompts shorter than the
# original context take the short table in both transformers and llama.cpp (its context, 512, is not longer).
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 512,
    "short_factor": [1.0 + 0.03 * i for i in range(32)],
    "long_factor": [1.0 + 0.1 * i for i in range(32)],
}

# Gemma 3 text: seven layers (the sixth global), a window shorter than the verification prompts, the head width
# llama.cpp's attention scale assumes.
GEMMA3 = {"num_hidden_layers": 7, "sliding_window": 6, "head_dim": 64, "query_pre_attn_scalar": 64}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "style", "extra"),
    [
        ("llama", "llama-bpe", {"attention_bias": True}),
        ("llama", "llama-bpe", {"rope_parameters": LLAMA3_ROPE}),  # Llama 3.1's scaled RoPE
        ("qwen2", "qwen2", {}),
        ("qwen3", "qwen2", {"head_dim": 96}),  # QK-norm; a head width that is not hidden / heads
        ("olmo2", "gpt-2", {}),  # norms after the sublayers, QK-norm over the whole projection
        ("phi3", "gpt-2", {"sliding_window": 128}),  # fused qkv and gate_up
        (
            "phi3",
            "gpt-2",
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
        ),
        (
            "phi3",
            "spm",
            {
                "rope_parameters": LONGROPE,
                "max_position_embeddings": 1024,
                "original_max_position_embeddings": 512,
            },
        ),
        ("mistral", "gpt-2", {"sliding_window": 128}),
        ("smollm3", "llama-bpe", {"num_hidden_layers": 4}),  # layer 3 without RoPE (NoPE)
        ("gemma3", "gpt-2", GEMMA3),  # norms as 1 + w, scaled embeddings, a 6-token window, layer 5 global
        # SentencePiece-style tokenizers, as those families ship them: "▁" prefixed (Llama 2, Mistral, Phi-3)
        # or not (Gemma), byte fallback.
        ("llama", "spm", {}),
        ("mistral", "spm", {}),
        ("phi3", "spm", {}),
        ("gemma3", "spm-no-prefix", GEMMA3),
        ("llama", "llama-bpe", {"rope_parameters": YARN}),  # YaRN, as Qwen2.5 / Qwen3 long-context configs
        ("qwen3", "qwen2", {"rope_parameters": YARN}),
        ("ministral3", "tekken", {"rope_parameters": MINISTRAL3_ROPE, "head_dim": 64}),  # Mistral's Tekken
    ],
)
def test_hf_families_export_and_verify(make_model, tmp_path, kind, style, extra):
    # Not named after the family: llama.cpp takes a model *named* phi3 for Microsoft's Phi-3 (see below).
    folder = make_model(kind, tmp_path / "model", style=style, **extra)
    result = export_gguf(folder, "f32", tmp_path / f"{kind}.gguf")
    _assert_verified(result)
    reader = gguf.GGUFReader(result.path)
    arch = reader.fields["general.architecture"].contents()
    native = {"qwen2", "qwen3", "olmo2", "phi3", "smollm3", "gemma3"}  # llama.cpp graphs named as the family
    assert arch == (kind if kind in native else "mistral3" if kind == "ministral3" else "llama")
    if extra.get("rope_parameters", {}).get("rope_type") == "yarn":
        assert reader.fields[f"{arch}.rope.scaling.type"].contents() == "yarn"
        assert reader.fields[f"{arch}.rope.scaling.factor"].contents() == 4.0
    if style.startswith("spm"):  # llama.cpp's "llama" vocabulary: merges by score, byte tokens typed BYTE
        assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
        assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() == (style == "spm")
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.UNKNOWN
    else:
        assert reader.fields["tokenizer.ggml.pre"].contents() == style
    if (
        kind == "llama" and extra.get("rope_parameters", {}).get("rope_type") == "llama3"
    ):  # the factors are transformers' own: default frequencies over scaled ones
        from transformers import AutoConfig, LlamaForCausalLM

        rotary = LlamaForCausalLM(AutoConfig.from_pretrained(folder)).model.rotary_emb
        default = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
        np.testing.assert_allclose(factors, (default / rotary.inv_freq.double()).numpy(), rtol=1e-5)
        assert factors.min() == 1.0 and factors.max() == pytest.approx(8.0)
    if kind == "gemma3":  # llama.cpp runs Gemma's window itself: the whole context, and the window beside it
        assert reader.fields["gemma3.context_length"].contents() == 256
        assert reader.fields["gemma3.attention.sliding_window"].contents() == 6
    elif "sliding_window" in extra:  # the window, not max_position_embeddings, is what llama.cpp runs exactly
        assert reader.fields[f"{arch}.context_length"].contents() == 128
    q8 = export_gguf(folder, "q8_0", tmp_path / f"{kind}-q8_0.gguf")
    _assert_verified(q8)


def test_sentencepiece_scores_follow_the_merge_order():
    """llama.cpp's "llama" vocabulary merges the adjacent pair whose result scores highest: minus the rank of
    the BPE merge that first makes it keeps the BPE's order (flat scores, as gguf-py's LlamaHfVocab writes,
    tokenized the test texts differently: measured by the SentencePiece cases above)."""
    from export.tokenizer_gguf import merge_scores

    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5, "abc": 6}
    scores = merge_scores(vocab, ["b c", "a b", "ab c", "a bc"])
    assert scores == [0.0, 0.0, 0.0, 0.0, -2.0, -1.0, -3.0]  # "abc" keeps its first merge's rank


@pytest.mark.parametrize(
    ("pre_tokenizer", "normalizer", "message"),
    [
        (
            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
            None,
            "pre_tokenizer.prepend_scheme = 'first'",
        ),
        (None, {"type": "Lowercase"}, "found normalizer Lowercase, pre-tokenizer none"),
    ],
)
def test_a_sentencepiece_spacing_llama_cpp_lacks_is_refused(tmp_path, pre_tokenizer, normalizer, message):
    from export.tokenizer_gguf import read_vocab

    tokenizer = {
        "model": {"type": "BPE", "byte_fallback": True, "vocab": {"<unk>": 0, "a": 1}, "merges": []},
        "pre_tokenizer": pre_tokenizer,
        "normalizer": normalizer,
        "added_tokens": [],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError, match=re.escape(message)):
        read_vocab(tmp_path, 2)


def test_run_folder_resolves_to_its_last_model_stage_in_recipe_order(decoder_dir, tmp_path):
    """The recipe's order decides, not file times: `sft` is exported although `pretrain/final` was written
    after it."""
    import os

    run = tmp_path / "runs" / "demo"
    for stage in ("sft", "pretrain"):
        shutil.copytree(decoder_dir, run / stage / "final")
    (run / "sft" / "final" / "marker").write_text("sft")
    os.utime(run / "sft" / "final", (1, 1))
    stages = [{"name": "pretrain", "method": "pretrain"}, {"name": "sft", "method": "sft"}]
    (run / "recipe.yaml").write_text(json.dumps({"name": "demo", "stages": stages}))
    from export.source import resolve_source

    assert resolve_source(run).folder == run / "sft" / "final"
    result = export_gguf(run, "f16", verify=False)
    assert result.path == run / "gguf" / "demo-f16.gguf"
    assert gguf.GGUFReader(result.path).fields["general.name"].contents() == "demo"


def test_llama_cpps_phi3_name_trap_is_named(make_model, tmp_path):
    """llama.cpp's vocabulary loader takes a file whose general.name says phi3 for Microsoft's Phi-3 and fails
    on another tokenizer; the export says so instead of passing on llama.cpp's bare refusal."""
    folder = make_model("phi3", tmp_path / "my-phi3", style="gpt-2")
    with pytest.raises(
        ExportError, match=r"llama.cpp cannot load .*named 'my-phi3' .* for Microsoft's Phi-3"
    ):
        export_gguf(folder, "f32", tmp_path / "m.gguf")


def test_unknown_tensor_is_refused_before_writing(decoder_dir, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(decoder_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.foo.weight"] = torch.zeros(4, 4)
    save_file(weights, folder / "model.safetensors")
    out = tmp_path / "out.gguf"
    with pytest.raises(
        ExportError, match=r"tensor `model.layers.0.mlp.foo.weight` has no GGUF name in plan `llama`"
    ):
        export_gguf(folder, "f16", out)
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".*partial"))


def test_unsupported_config_and_architecture_are_refused(decoder_dir, tmp_path):
    folder = tmp_path / "scaled"
    shutil.copytree(decoder_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"RoPE scaling .* 'dynamic'"):
        export_gguf(folder, "f16", tmp_path / "a.gguf")
    # YaRN is run, with what llama.cpp's loaders fix: another beta_fast is refused by name.
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 16}
    config["rope_parameters"]["original_max_position_embeddings"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"YaRN RoPE scaling .* 'beta_fast 16 \(llama.cpp: 32\)'"):
        export_gguf(folder, "f16", tmp_path / "a.gguf")
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"architecture 'gpt_neox' has no export plan"):
        export_gguf(folder, "f16", tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize(
    ("key", "value", "component"),
    [("use_sliding_window", True, "sliding-window attention"), ("attention_bias", True, "attention biases")],
)
def test_a_qwen3_option_its_graph_lacks_is_refused_naming_the_key(
    make_model, tmp_path, key, value, component
):
    folder = make_model("qwen3", tmp_path / "qwen3", head_dim=96)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=rf"{component} \({key}\)"):
        export_gguf(folder, "f16", tmp_path / "q.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_existing_output_needs_force(decoder_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="--force"):
        export_gguf(decoder_dir, "f16", out, verify=False)
    assert out.read_bytes() == b"keep me"
    export_gguf(decoder_dir, "f16", out, verify=False, force=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_interrupted_write_leaves_no_file(decoder_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    calls = []

    def fail_midway(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(data, qtype)

    original = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(decoder_dir, "q8_0", out, force=True, verify=False)
    assert out.read_bytes() == b"previous export"  # the old file survives, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.slow
def test_k_quant_fallbacks_are_reported(make_model, tmp_path):
    # ffn_down rows of 384 cannot hold 256-wide K blocks: llama.cpp picks another type and we say which.
    folder = make_model("decoder", tmp_path / "odd", intermediate_size=384)
    result = export_gguf(folder, "q4_k_m", tmp_path / "odd.gguf")
    assert result.ok, result.report["checks"]
    assert set(result.fallbacks) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert "not a multiple of 256" in result.fallbacks["blk.0.ffn_down.weight"]
    assert result.report["fallbacks"] == result.fallbacks


def test_a_smollm3_nope_layout_llama_cpp_lacks_is_refused_naming_the_key(make_model, tmp_path):
    """llama.cpp's smollm3 graph leaves RoPE out of every fourth layer, always; another layout is refused."""
    folder = make_model("smollm3", tmp_path / "smollm3", num_hidden_layers=4, no_rope_layers=[1, 0, 1, 1])
    with pytest.raises(ExportError, match=r"layers without RoPE \(no_rope_layers\) = '\[1, 0, 1, 1\]'"):
        export_gguf(folder, "f16", tmp_path / "s.gguf")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize(
    ("change", "component"),
    [
        (
            {"query_pre_attn_scalar": 256},
            r"attention scale \(query_pre_attn_scalar\) = '256 \(head_dim 64\)'",
        ),
        ({"layer_types": ["full_attention"] * 7}, r"sliding/global layer pattern \(layer_types\)"),
        ({"final_logit_softcapping": 30.0}, r"final logit soft-capping \(final_logit_softcapping\)"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            },
            r"RoPE scaling of the global layers \(rope_parameters.full_attention.rope_type\)",
        ),
    ],
)
def test_a_gemma3_option_llama_cpp_fixes_otherwise_is_refused_naming_the_key(
    make_model, tmp_path, change, component
):
    folder = make_model("gemma3", tmp_path / "gemma3", **GEMMA3)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=component):
        export_gguf(folder, "f16", tmp_path / "g.gguf")
    assert not list(tmp_path.glob("*.gguf"))
