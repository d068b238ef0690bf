"""The `evaluate` stage's section is checked when the recipe loads: names of later stages and names that are
no stage, path or Hub id are refused with the nearest earlier stage, as are unknown win_rate keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.errors import RecipeError
from toolkit.recipe import load

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """
name: check
stages:
  - {{name: tokenizer, method: tokenizer, data: {{sources: [{corpus}]}}, tokenizer: {{vocab_size: 300}}}}
  - {{name: pretrain, method: pretrain, model: {{preset: decoder-tiny}}, data: {{sources: [{corpus}]}}}}
  - name: evaluate
    method: evaluate
    evaluate: {evaluate}
  - {{name: sft, method: sft, data: {{sources: [{sft}]}}}}
"""


def recipe(tmp_path: Path, evaluate: str) -> Path:
    path = tmp_path / "recipe.yaml"
    corpus, sft = ROOT / "data/corpus/valid.jsonl", ROOT / "data/sft/train.jsonl"
    path.write_text(RECIPE.format(corpus=corpus, sft=sft, evaluate=evaluate))
    return path


def test_a_good_section_loads(tmp_path):
    prompts = ROOT / "data/eval/heldout.jsonl"
    loaded = load(recipe(tmp_path, f"{{models: [pretrain, org/base], tasks: [forge_heldout], "
                                   f"win_rate: {{against: org/base, prompts: {prompts}}}}}"))  # fmt: skip
    options = loaded.stages[2].options
    assert options["models"] == ["pretrain", "org/base"] and options["chat_template"] is False


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{models: [sft], tasks: [forge_heldout]}", "stages.evaluate.evaluate.models: stage 'sft' runs after this one"),
        ("{models: [pretrian], tasks: [forge_heldout]}", "'pretrian' is no earlier stage, path or Hub id (did you mean 'pretrain'?)"),
        ("{models: [pretrain]}", "nothing to measure: give tasks, perplexity or win_rate"),
        ("{models: [pretrain], win_rate: {against: pretrain, promts: x}}", "did you mean 'prompts'?"),
        ("{models: [pretrain], tasks: [forge_heldout], limt: 4}", "did you mean 'limit'?"),
    ],
)  # fmt: skip
def test_bad_sections_are_refused_by_name(tmp_path, section, message):
    with pytest.raises(RecipeError) as error:
        load(recipe(tmp_path, section))
    assert message in str(error.value)
