"""BitNet b1.58 quantization-aware training: the quantizers against the paper's formulas on hand-computed cases,
the straight-through gradients, which layers become ternary, and a reload with identical logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models import build_config, register_auto_classes
from toolkit.quantization.bitnet import bitnet_layers, plan_layers, ternarize, to_bitnet

register_auto_classes()


def bitlinear(weight: list[list[float]]) -> torch.nn.Module:
    from transformers.integrations.bitnet import AutoBitLinear

    layer = AutoBitLinear(len(weight[0]), len(weight), bias=False, online_quant=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def test_weights_are_ternary_times_their_absmean():
    # γ = mean|W| = (0.2 + 0.5 + 1.5 + 0.05 + 0.8 + 0.1 + 1.0 + 0.25) / 8 = 0.55;
    # W / γ = [0.364, -0.909, 2.727, 0.091 | -1.455, 0.182, -1.818, 0.455] -> RoundClip -> [0, -1, 1, 0 | -1, 0, -1, 0]
    weight = torch.tensor([[0.2, -0.5, 1.5, 0.05], [-0.8, 0.1, -1.0, 0.25]])
    values, gamma = ternarize(weight)
    assert gamma == pytest.approx(0.55, rel=1e-6)
    assert values.tolist() == [[0, -1, 1, 0], [-1, 0, -1, 0]]


def test_forward_is_absmax_int8_activations_times_ternary_weights():
    layer = bitlinear([[0.2, -0.5, 1.5, 0.05], [-0.8, 0.1, -1.0, 0.25]])
    x = torch.tensor([[0.3, -1.27, 0.05, 0.6]])
    # Per token: 127 / max|x| = 100; round(x * 100) = [30, -127, 5, 60]; x_q = that / 100.
    x_q = torch.tensor([[0.30, -1.27, 0.05, 0.60]])
    w_q = torch.tensor([[0, -1, 1, 0], [-1, 0, -1, 0]]) * 0.55
    torch.testing.assert_close(layer(x), x_q @ w_q.T, rtol=0, atol=1e-6)
    x = torch.tensor([[0.013, -1.27, 0.0, 0.6]])  # 1.3 rounds to 1: the activation is quantized
    torch.testing.assert_close(layer(x), torch.tensor([[0.01, -1.27, 0.0, 0.6]]) @ w_q.T, rtol=0, atol=1e-6)


def test_gradients_pass_straight_through_both_quantizers():
    """STE: dL/dW = g^T x_q (as if W_q were W), dL/dx = g W_q (as if x_q were x)."""
    layer = bitlinear([[0.2, -0.5, 1.5, 0.05], [-0.8, 0.1, -1.0, 0.25]])
    x = torch.tensor([[0.3, -1.27, 0.05, 0.6]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0]])
    (layer(x) * g).sum().backward()
    x_q = torch.tensor([[0.30, -1.27, 0.05, 0.60]])
    w_q = torch.tensor([[0.0, -1, 1, 0], [-1, 0, -1, 0]]) * 0.55
    torch.testing.assert_close(layer.weight.grad, g.T @ x_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, g @ w_q, rtol=0, atol=1e-6)


def decoder(**overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        build_config("decoder-tiny", vocab_size=128, num_hidden_layers=2, **overrides)
    )


def test_the_declared_linear_layers_become_ternary_and_exclusions_stay(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    model = decoder()
    converted = to_bitnet(model, exclude=["model.layers.1.mlp"])
    assert len(converted) == 7 + 4  # layer 0: q k v o gate up down; layer 1: q k v o
    assert isinstance(model.model.layers[0].mlp.down_proj, AutoBitLinear)
    assert not isinstance(model.model.layers[1].mlp.down_proj, AutoBitLinear)
    assert not isinstance(model.lm_head, AutoBitLinear) and isinstance(
        model.model.embed_tokens, torch.nn.Embedding
    )
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (saved["quant_method"], saved["linear_class"], saved["quantization_mode"]) == (
        "bitnet",
        "autobitlinear",
        "online",
    )
    assert bitnet_layers(tmp_path) == set(converted)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, AutoBitLinear)
    assert not isinstance(reloaded.model.layers[1].mlp.up_proj, AutoBitLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)


def test_excluding_every_layer_is_an_error_naming_the_layers():
    with pytest.raises(ToolkitError, match="no linear layer of DecoderForCausalLM is left to quantize"):
        plan_layers(decoder(), exclude=["model"])


def test_a_hub_model_folder_loads_in_plain_transformers(tmp_path):
    """A Llama with BitNet layers (every linear but the head), saved: a fresh process without the toolkit
    loads it through transformers' own BitNet quantizer and computes the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).eval()
    assert len(to_bitnet(model)) == 14
    model.save_pretrained(tmp_path)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.integrations.bitnet import AutoBitLinear\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert isinstance(m.model.layers[0].mlp.down_proj, AutoBitLinear)\n"
        "assert 'toolkit' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    got = m(torch.arange(10).unsqueeze(0)).logits\n"
        "assert torch.equal(got, torch.load(sys.argv[1] + '/expected.pt')), (got - torch.load(sys.argv[1] + '/expected.pt')).abs().max()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=Path("/")
    )
    assert done.returncode == 0, done.stderr[-2000:]


def toolkit_train(recipe: Path) -> subprocess.CompletedProcess:
    """`toolkit train RECIPE` in a fresh process, as a user runs it; it must succeed."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "train", str(recipe)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.integration_test
def test_a_recipe_trains_bitnet_from_a_preset_continues_it_and_exports_ternary(tmp_path):
    """`model.quantization: {method: bitnet}` on a preset, through `toolkit train` in a fresh process: the
    pretrain stage trains ternary layers, the SFT stage after it reloads them as they are, and an export
    stage writes a TQ2_0 GGUF verified in llama.cpp."""
    import yaml

    from tests.tiny import head, pretrain_stage, tokenizer_stage, write_recipe

    corpus = head("data/corpus/train.jsonl", 200, tmp_path / "corpus.jsonl")
    pretrain = pretrain_stage(corpus, {"num_hidden_layers": 2}, max_steps=6, learning_rate=3e-3)
    pretrain["model"]["quantization"] = {"method": "bitnet", "exclude": ["model.layers.1.mlp.down_proj"]}
    sft = {
        "name": "sft",
        "method": "sft",
        "data": {"sources": [head("data/sft/train.jsonl", 32, tmp_path / "sft.jsonl")]},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 64},
    }
    export = {"name": "gguf", "method": "export", "export": {"quant": "tq2_0"}}
    recipe = write_recipe(
        tmp_path / "r.yaml", "ternary", tmp_path / "run", [tokenizer_stage(corpus), pretrain, sft, export]
    )
    done = toolkit_train(recipe)
    assert "BitNet b1.58: 13 linear layers ternary" in done.stdout
    for stage in ("pretrain", "sft"):
        saved = json.loads((tmp_path / "run" / stage / "final" / "config.json").read_text())
        assert saved["quantization_config"]["quant_method"] == "bitnet"
        assert (
            "model\\.layers\\.1\\.mlp\\.down_proj" in saved["quantization_config"]["modules_to_not_convert"]
        )
    report = json.loads((tmp_path / "run" / "gguf" / "ternary-tq2_0.gguf.report.json").read_text())
    assert report["ok"] and report["tensor_types"]["blk.0.attn_q.weight"] == "TQ2_0"
    assert report["tensor_types"]["blk.1.ffn_down.weight"] == "F16"  # excluded: not ternary, so not TQ
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["stages"][1]["model"][
        "quantization"
    ]


@pytest.mark.slow
@pytest.mark.integration_test
def test_the_bitnet_family_trains_ternary_loads_in_plain_transformers_and_runs_in_llama_cpp(tmp_path):
    """A `bitnet-*` preset is BitNet by itself (no `quantization:` key): `toolkit train` in a fresh process
    trains transformers' own BitNetForCausalLM with ternary layers, the folder loads in a process without the
    toolkit as `BitNetForCausalLM` with BitNet layers and the same logits, and with `hidden_act: silu` its TQ2_0
    GGUF runs in llama.cpp's own `bitnet` graph, verified."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import head, pretrain_stage, tokenizer_stage, write_recipe

    corpus = head("data/corpus/train.jsonl", 200, tmp_path / "corpus.jsonl")
    pretrain = pretrain_stage(
        corpus, {"num_hidden_layers": 2, "hidden_act": "silu"}, max_steps=6, learning_rate=3e-3
    )
    pretrain["model"]["preset"] = "bitnet-tiny"
    export = {"name": "gguf", "method": "export", "export": {"quant": "tq2_0"}}
    recipe = write_recipe(
        tmp_path / "r.yaml", "native", tmp_path / "run", [tokenizer_stage(corpus), pretrain, export]
    )
    done = toolkit_train(recipe)
    assert "BitNet b1.58: 14 linear layers ternary" in done.stdout
    final = tmp_path / "run" / "pretrain" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert (
        saved["architectures"] == ["BitNetForCausalLM"]
        and saved["quantization_config"]["quant_method"] == "bitnet"
    )

    ids = torch.arange(3, 13).unsqueeze(0)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(final).eval()(ids).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, BitNetForCausalLM\n"
        "from transformers.integrations.bitnet import AutoBitLinear\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert type(m) is BitNetForCausalLM and isinstance(m.model.layers[1].mlp.down_proj, AutoBitLinear)\n"
        "assert 'toolkit' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    got = m(torch.arange(3, 13).unsqueeze(0)).logits\n"
        "assert torch.equal(got, torch.load(sys.argv[2]))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, str(final), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        cwd=Path("/"),
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]

    report = json.loads((tmp_path / "run" / "gguf" / "native-tq2_0.gguf.report.json").read_text())
    assert report["ok"], report["checks"]
    assert report["tensor_types"]["blk.0.attn_q.weight"] == "TQ2_0"
    assert report["tensor_types"]["blk.1.ffn_sub_norm.weight"] == "F32"
    assert "output.weight" not in report["tensor_types"]  # the graph projects with token_embd


@pytest.mark.slow
@pytest.mark.integration_test
def test_a_staged_quantization_recipe_scores_each_group_and_the_gguf_report_quotes_it(tmp_path):
    """`quantization: {method: bitnet, groups: 2}` through `toolkit train`: the full-precision model is scored,
    then each group after its training; quantization.json, the metrics and a plot hold the drops; the final
    folder reloads with every group ternary; the TQ2_0 report quotes the accuracy drop and decode speeds."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    from export.report import markdown_table
    from tests.tiny import head, pretrain_stage, tokenizer_stage, write_recipe

    corpus = head("data/corpus/train.jsonl", 200, tmp_path / "corpus.jsonl")
    valid = head("data/corpus/valid.jsonl", 20, tmp_path / "valid.jsonl")
    pretrain = pretrain_stage(corpus, {"num_hidden_layers": 2}, max_steps=6, learning_rate=3e-3)
    staged = pretrain_stage(corpus, max_steps=3, learning_rate=3e-3)
    staged.update(
        name="ternary",
        model={"from": "pretrain", "quantization": {"method": "bitnet", "groups": 2, "max_drop": 100.0}},
        eval={"perplexity": valid},
    )
    export = {"name": "gguf", "method": "export", "export": {"quant": "tq2_0"}}
    recipe = write_recipe(
        tmp_path / "r.yaml", "staged", tmp_path / "run", [tokenizer_stage(corpus), pretrain, staged, export]
    )
    done = toolkit_train(recipe)
    assert "[ternary] staged quantization: 2 groups; full precision perplexity" in done.stdout
    assert "[ternary] group 2/2 (7 layers ternary)" in done.stdout
    stage = tmp_path / "run" / "ternary"
    record = json.loads((stage / "quantization.json").read_text())
    assert [g["decision"] for g in record["groups"]] == ["ternary", "ternary"] and record["steps"] == 6
    drops = [
        r
        for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())
        if "quantization_drop" in r
    ]
    assert [(r["step"], r["quantized_groups"]) for r in drops] == [(3, 1), (6, 2)]
    assert (stage / "plots" / "quantization_drop.png").exists()
    assert max(r["step"] for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())) == 6
    model = AutoModelForCausalLM.from_pretrained(stage / "final")
    assert all(isinstance(model.get_submodule(n), AutoBitLinear) for n in record["layer_groups"][1])
    evaluated = json.loads((stage / "eval.json").read_text())
    assert evaluated["perplexity"]["perplexity"] == pytest.approx(record["final"]["score"], rel=1e-6)

    report = json.loads((tmp_path / "run" / "gguf" / "staged-tq2_0.gguf.report.json").read_text())
    bitnet = report["bitnet"]
    assert bitnet["accuracy"]["drop"] == pytest.approx(record["final"]["drop"], abs=1e-4)
    assert bitnet["accuracy"]["groups"] == ["ternary", "ternary"] and bitnet["accuracy"]["met"]
    speeds = bitnet["decode"]["tokens_per_second"]
    assert set(speeds) == {"f16", "q8_0", "ternary"} and all(v > 0 for v in speeds.values())
    table = markdown_table(report)
    assert (
        "accuracy (stage ternary): perplexity" in table
        and "x f16" in table
        and "decode in llama.cpp" in table
    )


def test_a_misspelt_quantization_method_names_bitnet(tmp_path):
    from toolkit import recipe as recipes
    from toolkit.errors import RecipeError

    raw = {
        "name": "r",
        "stages": [
            {
                "name": "p",
                "method": "pretrain",
                "model": {"preset": "decoder-tiny", "quantization": {"method": "bitnett"}},
                "tokenizer": "t",
                "data": {"sources": ["x.jsonl"]},
            }
        ],
    }
    with pytest.raises(
        RecipeError, match=r"unknown quantization method 'bitnett' \(did you mean 'bitnet'\?\)"
    ):
        recipes.parse(raw)
