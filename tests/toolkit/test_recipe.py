"""Recipe validation: every mistake is named, with where it is and the nearest valid key."""

import dataclasses

import pytest
import yaml
from trl import DPOConfig, SFTConfig

from toolkit import recipe as recipes
from toolkit.errors import RecipeError

BASE = {
    "name": "t",
    "stages": [
        {
            "name": "tok",
            "method": "tokenizer",
            "data": {"sources": ["corpus.jsonl"]},
            "tokenizer": {"vocab_size": 300},
        },
        {
            "name": "pre",
            "method": "pretrain",
            "model": {"preset": "decoder-tiny"},
            "data": {"sources": ["c.jsonl"]},
        },
        {"name": "sft", "method": "sft", "data": {"sources": [{"path": "s.jsonl", "weight": 2}]}},
        {"name": "dpo", "method": "dpo", "data": {"sources": ["p.jsonl"]}, "train": {"beta": 0.2}},
    ],
}


def parse(raw, overrides=()):
    return recipes.parse(raw, overrides=list(overrides))


def with_stage(index, **changes):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["stages"][index].update(changes)
    return raw


def test_valid_recipe_resolves_chain():
    recipe = parse(BASE)
    assert [s.name for s in recipe.stages] == ["tok", "pre", "sft", "dpo"]
    assert recipe.stages[1].tokenizer == "tok"  # a preset takes the tokenizer stage's output
    assert recipe.stages[2].model == {"from": "pre"}  # each stage continues from the previous one
    assert recipe.stages[3].model == {"from": "sft"}
    assert recipe.stages[2].data["sources"] == [{"path": "s.jsonl", "weight": 2}]
    assert str(recipe.output_dir) == "runs/t"


def test_train_keys_are_exactly_the_trl_config_fields_and_the_toolkits_own():
    own = set(recipes.TOOLKIT_TRAIN_KEYS)
    assert own == {"grokfast", "auto_batch_size"}
    assert recipes.trainer_fields("sft") == {f.name for f in dataclasses.fields(SFTConfig) if f.init} | own
    assert "beta" in recipes.trainer_fields("dpo") and "beta" not in recipes.trainer_fields("sft")
    assert recipes.trainer_fields("dpo") == {f.name for f in dataclasses.fields(DPOConfig) if f.init} | own


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            with_stage(2, train={"lerning_rate": 1e-3}),
            "unknown key 'lerning_rate' in recipe: stages.sft.train (did you mean 'learning_rate'?)",
        ),
        (with_stage(3, train={"bta": 0.1}), "did you mean 'beta'?"),
        (
            with_stage(2, modle={"preset": "x"}),
            "unknown key 'modle' in recipe: stages.sft (did you mean 'model'?)",
        ),
        (with_stage(2, method="sfft"), "unknown key 'sfft' in stages[2] (sft).method (did you mean 'sft'?)"),
        (with_stage(1, model={"presett": "decoder-tiny"}), "(did you mean 'preset'?)"),
        (with_stage(2, model={"from": "dpo"}), "'dpo' is not an earlier stage with a model"),
        (with_stage(2, data={}), "stages.sft.data.sources: list at least one data source"),
        (with_stage(2, train={"output_dir": "x"}), "set by the runner"),
        (with_stage(2, peft={"r": 8, "lora_alfa": 16}), "did you mean 'lora_alpha'?"),
        (with_stage(3, name="sft"), "two stages are named 'sft'"),
        ({**BASE, "stagez": []}, "unknown key 'stagez' in recipe (did you mean 'stages'?)"),
        ([1, 2], "a recipe is a mapping"),
    ],
)
def test_errors_name_the_key_and_nearest_valid_one(raw, expected):
    with pytest.raises(RecipeError) as error:
        parse(raw)
    assert expected in str(error.value)


def test_preset_without_tokenizer_is_refused():
    raw = {"name": "x", "method": "pretrain", "model": {"preset": "decoder-tiny"}, "data": {"sources": ["a"]}}
    with pytest.raises(RecipeError, match="needs a tokenizer"):
        parse(raw)


def test_single_stage_recipe_and_overrides():
    raw = {"name": "one", "method": "sft", "model": {"path": "some/model"}, "data": {"sources": ["a.jsonl"]}}
    recipe = parse(raw, ["train.max_steps=7", "train.learning_rate=1e-4", "seed=3"])
    (stage,) = recipe.stages
    assert stage.method == "sft" and stage.train == {"max_steps": 7, "learning_rate": 1e-4}
    assert recipe.seed == 3


def test_override_addresses_a_stage_by_name():
    recipe = parse(BASE, ["stages.dpo.train.max_steps=2"])
    assert recipe.stages[3].train == {"beta": 0.2, "max_steps": 2}
    with pytest.raises(RecipeError, match="no stage named 'dppo'"):
        parse(BASE, ["stages.dppo.train.max_steps=2"])
    with pytest.raises(RecipeError, match="dotted.key=value"):
        parse(BASE, ["stages.dpo.train.max_steps"])


def test_load_reports_yaml_line_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - method: sft\n   data: [\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: not valid YAML"):
        recipes.load(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        recipes.load(tmp_path / "nope.yaml")


def test_shipped_recipes_validate():
    """Every shipped recipe is valid, and names only inputs that exist, or that another recipe's run makes
    (`runs/...`)."""
    from pathlib import Path

    for path in sorted(Path("recipes").glob("*.yaml")):
        try:
            recipes.load(path)
        except RecipeError as error:
            lines = str(error).splitlines()
            problems = lines[1:] if len(lines) > 1 else lines
            assert all(": runs/" in p and p.endswith("no such folder") for p in problems), str(error)


def test_every_problem_is_reported_at_once(tmp_path):
    """A misspelt key, a wrong type, an unknown preset, a missing tokenizer and missing data: one run of the
    validator names them all, each with its place."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\n"
        "stages:\n"
        "  - name: pre\n"
        "    method: pretrain\n"
        "    model: {preset: decoder-tny}\n"
        f"    data: {{sources: [{tmp_path}/missing.jsonl]}}\n"
        "    train: {max_step: 3, learning_rate: fast, lr_scheduler_type: cosin}\n"
        "  - name: sft\n"
        "    method: sft\n"
        f"    tokenizer: {tmp_path}/no-tokenizer\n"
        "    data: {sources: [data/sft/train.jsonl]}\n"
        "    eval: {tasks: data/eval/nothing-here.jsonl, lmit: 3}\n"
    )
    with pytest.raises(RecipeError) as error:
        recipes.load(recipe)
    lines = str(error.value).splitlines()
    assert lines[0] == f"9 problems in {recipe}:"
    expected = [
        "stages.pre.model.preset: unknown preset 'decoder-tny' (did you mean 'decoder-tiny'?)",
        "a model built from a preset needs a tokenizer path or stage",
        "unknown key 'max_step' in",
        "stages.pre.train.learning_rate is 'fast'; expected a number",
        "stages.pre.train.lr_scheduler_type is 'cosin'; expected one of",
        f"stages.pre.data.sources[0]: {tmp_path}/missing.jsonl: no such file or folder",
        f"stages.sft.tokenizer: {tmp_path}/no-tokenizer: no such folder",
        "stages.sft.eval.tasks: file not found: data/eval/nothing-here.jsonl",
        "unknown key 'lmit' in",
    ]
    for text in expected:
        assert any(text in line for line in lines[1:]), text
    assert "did you mean 'cosine'?" in str(error.value) and "did you mean 'limit'?" in str(error.value)
