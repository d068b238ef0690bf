"""Staged BitNet quantization: which layers each group holds, the drop rule, the fallback and stop decisions
with the weights as they were before the group, resume after a kill between groups, and the recipe checks.
The decisions are driven by a scripted evaluation, so each case is known; a real run is in test_bitnet.py's
recipe tests and recipes/bitnet.yaml."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models import build_config, register_auto_classes
from toolkit.quantization.bitnet import BitNetOptions, ternary_layer_names
from toolkit.quantization.staged import layer_groups, relative_drop, run_staged

register_auto_classes()

LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decoder(layers: int = 3) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        build_config("decoder-tiny", vocab_size=64, num_hidden_layers=layers)
    )


def block(index: int) -> list[str]:
    return [f"model.layers.{index}.{leaf}" for leaf in (*LAYER, *MLP)]


def test_a_number_of_groups_splits_the_blocks_in_order():
    model = decoder(layers=4)
    assert layer_groups(model, BitNetOptions(groups=2)) == [block(0) + block(1), block(2) + block(3)]
    assert layer_groups(model, BitNetOptions(groups=3)) == [block(0) + block(1), block(2), block(3)]
    excluded = layer_groups(model, BitNetOptions(groups=4, exclude=["model.layers.3.mlp"]))
    assert excluded[3] == [f"model.layers.3.{leaf}" for leaf in LAYER]
    with pytest.raises(ToolkitError, match="5 groups of 4 blocks"):
        layer_groups(model, BitNetOptions(groups=5))


def test_a_layer_outside_the_blocks_goes_with_the_last_group():
    from transformers import AutoModelForCausalLM

    cognate = AutoModelForCausalLM.from_config(build_config("cognate-tiny", vocab_size=64))
    first, last = layer_groups(cognate, BitNetOptions(groups=2))  # two blocks and the halting head
    assert {name.split(".")[2] for name in first} == {"0"} and last[-1] == "model.halt_head"
    assert all(name.startswith("model.layers.1.") for name in last[:-1])


def test_listed_groups_take_the_layers_they_name_once():
    model = decoder(layers=2)
    groups = layer_groups(model, BitNetOptions(groups=[["model.layers.1"], ["down_proj"]]))
    assert groups == [block(1), ["model.layers.0.mlp.down_proj"]]  # layer 1's down_proj is in the first
    with pytest.raises(ToolkitError, match=r"groups\[1\]: \['lm_head'\] names no quantizable layer"):
        layer_groups(model, BitNetOptions(groups=[["model.layers.1"], ["lm_head"]]))


def test_the_drop_is_relative_to_full_precision_in_the_measures_direction():
    assert relative_drop("perplexity", 100.0, 110.0) == pytest.approx(0.10)
    assert relative_drop("perplexity", 100.0, 95.0) == pytest.approx(-0.05)
    assert relative_drop("answer_nll", 2.0, 2.5) == pytest.approx(0.25)
    assert relative_drop("accuracy", 0.5, 0.45) == pytest.approx(0.10)
    assert relative_drop("accuracy", 0.0, 0.0) == 0.0


class Scripted:
    """An evaluation that answers the scripted perplexities in turn, and a training phase that adds 1 to every
    weight (so the weights tell how many phases they went through)."""

    def __init__(self, scores: list[float], fail_at: int | None = None) -> None:
        self.scores, self.trained, self.fail_at, self.logged = list(scores), [], fail_at, []

    def evaluate(self, model: torch.nn.Module) -> dict:
        return {"perplexity": {"perplexity": self.scores.pop(0)}}

    def train(self, model: torch.nn.Module, index: int, steps_so_far: int) -> int:
        if index == self.fail_at:
            raise KeyboardInterrupt  # the run is killed during this group's training
        self.trained.append(index)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        return 5


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_group_past_the_bound_goes_back_to_full_precision_with_its_weights(tmp_path):
    model = decoder()
    start = weights(model)
    # full precision 100; group 0: +5% (kept); group 1: +20% (past 10%: back); group 2: +8% (kept)
    script = Scripted([100.0, 105.0, 120.0, 108.0])
    options = BitNetOptions(groups=3, max_drop=0.10, measure="perplexity")
    record = run_staged(model, options, tmp_path, script.evaluate, script.train, script.logged.append)
    assert [g["decision"] for g in record["groups"]] == ["ternary", "fallback", "ternary"]
    assert set(ternary_layer_names(model)) == set(block(0) + block(2))
    # group 1's phase (the second +1) was undone with its layers: two phases are in the weights, not three
    for name, value in weights(model).items():
        torch.testing.assert_close(value, start[name] + 2.0, rtol=0, atol=1e-6)
    kept = model.config.quantization_config.modules_to_not_convert
    assert all(name.replace(".", "\\.") in kept for name in block(1))
    assert record["final"] == {"ternary_layers": 14, "score": 108.0, "drop": pytest.approx(0.08)}
    assert [r["quantization_drop"] for r in script.logged] == pytest.approx([0.05, 0.20, 0.08])
    assert [r["step"] for r in script.logged] == [5, 10, 15]
    saved = json.loads((tmp_path / "quantization.json").read_text())
    assert saved["full_precision"]["score"] == 100.0 and saved["groups"][1]["drop"] == pytest.approx(0.2)


def test_stop_leaves_the_remaining_groups_in_full_precision(tmp_path):
    model = decoder()
    script = Scripted([100.0, 105.0, 120.0])
    options = BitNetOptions(groups=3, max_drop=0.10, measure="perplexity", on_drop="stop")
    record = run_staged(model, options, tmp_path, script.evaluate, script.train)
    assert [g["decision"] for g in record["groups"]] == ["ternary", "stop", "skipped"]
    assert script.trained == [0, 1] and set(ternary_layer_names(model)) == set(block(0))


def test_no_group_within_the_bound_is_an_error(tmp_path):
    script = Scripted([100.0, 150.0, 150.0, 150.0])
    with pytest.raises(ToolkitError, match="no group stayed within the 10% perplexity drop bound"):
        run_staged(decoder(), BitNetOptions(groups=3), tmp_path, script.evaluate, script.train)


def test_resume_after_a_kill_skips_the_decided_groups_and_ends_the_same(tmp_path):
    scores = [100.0, 105.0, 120.0, 108.0]
    options = BitNetOptions(groups=3, measure="perplexity")
    uninterrupted = decoder()
    run_staged(uninterrupted, options, tmp_path / "a", Scripted(scores).evaluate, Scripted(scores).train)

    killed = Scripted(scores, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_staged(decoder(), options, tmp_path / "b", killed.evaluate, killed.train)
    resumed = Scripted(scores[3:])
    model = decoder()
    record = run_staged(model, options, tmp_path / "b", resumed.evaluate, resumed.train, resume=True)
    assert resumed.trained == [2]  # groups 0 and 1 were decided before the kill
    assert [g["decision"] for g in record["groups"]] == ["ternary", "fallback", "ternary"]
    assert ternary_layer_names(model) == ternary_layer_names(uninterrupted)
    expected = weights(uninterrupted)
    assert all(torch.equal(value, expected[name]) for name, value in weights(model).items())


def parse(model: dict, eval_section: dict | None = None, **stage) -> None:
    from toolkit import recipe as recipes

    raw = {
        "name": "r",
        "stages": [
            {
                "name": "q",
                "method": "pretrain",
                "model": model,
                "data": {"sources": ["x.jsonl"]},
                **({"eval": eval_section} if eval_section else {}),
                **stage,
            }
        ],
    }
    recipes.parse(raw)


@pytest.mark.parametrize(
    ("quantization", "eval_section", "message"),
    [
        ({"groups": 2}, None, r"groups: staged quantization scores the model after each group"),
        (
            {"groups": 2, "measure": "accuracy"},
            {"perplexity": "v.jsonl"},
            r"accuracy needs the stage's eval.tasks",
        ),
        ({"groups": 2, "measure": "bleu"}, {"perplexity": "v.jsonl"}, r"measure: give one of perplexity"),
        ({"groups": 0}, {"perplexity": "v.jsonl"}, r"groups: give a number of groups \(>= 1\)"),
        (
            {"groups": 2, "on_drop": "ignore"},
            {"perplexity": "v.jsonl"},
            r"on_drop: give one of fallback, stop",
        ),
        ({"groups": 2, "max_drop": -1}, {"perplexity": "v.jsonl"}, r"max_drop: give a relative drop >= 0"),
    ],
)
def test_a_staged_quantization_that_cannot_run_is_refused_before_training(
    quantization, eval_section, message
):
    from toolkit.errors import RecipeError

    model = {"path": "some/model", "quantization": {"method": "bitnet", **quantization}}
    with pytest.raises(RecipeError, match=message):
        parse(model, eval_section)


def test_a_staged_quantization_of_a_preset_or_under_an_adapter_is_refused():
    from toolkit.errors import RecipeError

    quantization = {"method": "bitnet", "groups": 2}
    with pytest.raises(RecipeError, match="a preset starts from random weights"):
        parse(
            {"preset": "decoder-tiny", "quantization": quantization}, {"perplexity": "v.jsonl"}, tokenizer="t"
        )
    with pytest.raises(RecipeError, match="staged BitNet quantization trains the model's own weights"):
        parse({"path": "m", "quantization": quantization}, {"perplexity": "v.jsonl"}, peft={"r": 8})
