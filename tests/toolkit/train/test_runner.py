"""Recipes end to end on a tiny model: the losses fall, DPO's reward margin rises, and runs resume."""

import json
from pathlib import Path

import pytest
import yaml

from tests.tiny import head
from toolkit import recipe as recipes
from toolkit.errors import ToolkitError
from toolkit.run_folder import RunFolder, StageFolder, read_metrics
from toolkit.stages import StageContext
from toolkit.train import run
from toolkit.train.trainer_stage import CHECKPOINTING_KEYS, trainer_args

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

# A small model and a short run: enough steps for the trends to show, few enough for CI on 2 cores.
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_recipe(tmp: Path, dpo_source: str | None = None) -> dict:
    corpus = head("data/corpus/train.jsonl", 300, tmp / "corpus.jsonl")
    return {
        "name": "tiny",
        "output_dir": str(tmp / "run"),
        "seed": 0,
        "stages": [
            {
                "name": "tok",
                "method": "tokenizer",
                "data": {"sources": [corpus]},
                "tokenizer": {"vocab_size": 400},
            },
            {
                "name": "pretrain",
                "method": "pretrain",
                "model": {"preset": "decoder-tiny", "config": TINY},
                "data": {"sources": [corpus]},
                "train": {
                    "max_steps": 60,
                    "per_device_train_batch_size": 8,
                    "max_length": 64,
                    "learning_rate": 3e-3,
                    "logging_steps": 1,
                },
            },
            {
                "name": "sft",
                "method": "sft",
                "data": {"sources": [head("data/sft/train.jsonl", 400, tmp / "sft.jsonl")]},
                "train": {
                    "max_steps": 40,
                    "per_device_train_batch_size": 16,
                    "max_length": 64,
                    "learning_rate": 3e-3,
                    "logging_steps": 1,
                },
                "eval": {"tasks": head("data/eval/heldout.jsonl", 16, tmp / "eval.jsonl"), "samples": 2},
            },
            {
                "name": "dpo",
                "method": "dpo",
                "data": {
                    "sources": [dpo_source or head("data/preference/train.jsonl", 32, tmp / "pref.jsonl")]
                },
                "train": {
                    "max_steps": 25,
                    "per_device_train_batch_size": 8,
                    "max_length": 64,
                    "learning_rate": 1e-3,
                    "beta": 0.1,
                    "logging_steps": 1,
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    recipe = recipes.parse(tiny_recipe(tmp))
    results = run(recipe)
    return recipe, results


def args_of(recipe, index, tokenizer):
    """The TRL config the trainer stage builds for stage `index` of `recipe`."""
    run_folder = RunFolder(recipe.output_dir)
    stage = recipe.stages[index]
    context = StageContext(recipe, stage, run_folder, StageFolder(run_folder, stage.name, stage.method))
    return trainer_args(context, tokenizer)


def mean(values):
    return sum(values) / len(values)


def test_run_folder_layout(finished_run):
    recipe, results = finished_run
    root = recipe.output_dir
    assert yaml.safe_load((root / "recipe.yaml").read_text())["name"] == "tiny"
    env = json.loads((root / "env.json").read_text())
    assert env["packages"]["transformers"] and env["device"] == "cpu"
    for stage in ("pretrain", "sft", "dpo"):
        final = root / stage / "final"
        assert (final / "model.safetensors").exists() and (final / "chat_template.jinja").exists()
        assert (root / stage / "plots" / "loss.png").stat().st_size > 1000
        generation = json.loads((final / "generation_config.json").read_text())
        assert len(generation["eos_token_id"]) == 2  # <|endoftext|> and <|im_end|> both stop
    assert [r.name for r in results] == ["tok", "pretrain", "sft", "dpo"]


def test_pretrain_and_sft_losses_fall(finished_run):
    recipe, _ = finished_run
    for stage in ("pretrain", "sft"):
        losses = [r["loss"] for r in read_metrics(recipe.output_dir / stage / "metrics.jsonl") if "loss" in r]
        assert len(losses) >= 20
        assert mean(losses[-5:]) < mean(losses[:5]) - 0.5, (stage, losses)  # nats


def test_dpo_reward_margin_rises(finished_run):
    recipe, _ = finished_run
    margins = [
        r["rewards/margins"]
        for r in read_metrics(recipe.output_dir / "dpo" / "metrics.jsonl")
        if "rewards/margins" in r
    ]
    assert len(margins) >= 20
    # 32 pairs seen about six times: the objective DPO optimises must show on them.
    assert mean(margins[-5:]) > mean(margins[:5]) + 0.1, margins


def test_stage_eval_written(finished_run):
    recipe, results = finished_run
    evaluation = json.loads((recipe.output_dir / "sft" / "eval.json").read_text())
    assert evaluation["tasks"]["n"] == 16 and len(evaluation["tasks"]["samples"]) == 2
    assert results[2].eval == evaluation


def test_trained_model_reloads_through_auto_classes(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, _ = finished_run
    final = recipe.output_dir / "dpo" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "decoder" and model.config.vocab_size == len(tokenizer)


def test_rerun_refused_then_resume_skips_finished_stages(finished_run):
    recipe, _ = finished_run
    with pytest.raises(ToolkitError, match="--resume"):
        run(recipe)
    results = run(recipe, resume=True)
    assert all(r.skipped for r in results)


def test_failed_stage_keeps_earlier_stages_and_resume_finishes(tmp_path):
    raw = tiny_recipe(tmp_path, dpo_source=str(tmp_path / "missing.jsonl"))
    for stage in raw["stages"][1:]:
        stage["train"]["max_steps"] = 2
    with pytest.raises(ToolkitError, match="missing.jsonl"):
        run(recipes.parse(raw))
    root = Path(raw["output_dir"])
    assert (root / "sft" / "final" / "model.safetensors").exists()
    assert not (root / "dpo" / "final").exists()
    raw["stages"][3]["data"]["sources"] = [head("data/preference/train.jsonl", 50, tmp_path / "p.jsonl")]
    with pytest.raises(ToolkitError, match=r"changed: stages\.dpo\.data\.sources\. .*--resume-changed"):
        run(recipes.parse(raw), resume=True)
    results = run(recipes.parse(raw), resume=True, resume_changed=["stages.dpo.data.sources"])
    assert [r.skipped for r in results] == [True, True, True, False]
    accepted = json.loads((root / "resume.json").read_text())
    assert accepted[0]["accepted"] == ["stages.dpo.data.sources"]


@pytest.mark.parametrize("key", [None, *CHECKPOINTING_KEYS])
def test_recipe_decides_activation_checkpointing_under_either_name(tmp_path, key):
    """Off by default on a CPU; a recipe that asks for it gets it, whichever of the two names it uses (the
    default must not sit under the other name and win)."""
    fields = recipes.trainer_fields("pretrain")
    if key and key not in fields:
        pytest.skip(f"this transformers release has no `{key}`")
    raw = tiny_recipe(tmp_path)
    stage = raw["stages"][1]
    if key:
        stage["train"][key] = True
    recipe = recipes.parse(raw)
    args = args_of(recipe, 1, tokenizer=None)
    enabled = (
        args.activation_checkpointing if "activation_checkpointing" in fields else args.gradient_checkpointing
    )
    assert enabled is (key is not None)


def test_sft_learns_the_answers_only_with_the_toolkit_template(finished_run, tmp_path):
    """The toolkit's template marks assistant turns with `{%- generation %}` (whitespace-trimming): SFT must
    see the markers and train on the answers alone, unless the recipe says otherwise."""
    from transformers import AutoTokenizer

    recipe, _ = finished_run
    tokenizer = AutoTokenizer.from_pretrained(recipe.output_dir / "tok" / "final")
    assert "{%- generation %}" in tokenizer.chat_template
    assert args_of(recipe, 2, tokenizer).assistant_only_loss is True
    raw = tiny_recipe(tmp_path)
    raw["stages"][2]["train"]["assistant_only_loss"] = False
    explicit = recipes.parse(raw)
    assert args_of(explicit, 2, tokenizer).assistant_only_loss is False
