"""Special tokens added by a recipe: the tokenizer keeps them whole, the embedding grows (padded to a
multiple), training stages carry them on, and the GGUF export writes them with their ids, verified in
llama.cpp."""

import json
from pathlib import Path

import gguf
import pytest
from transformers import AutoConfig, AutoTokenizer

from export.tokenizer_gguf import CONTROL, UNUSED
from tests.toolkit.train.test_runner import tiny_recipe
from toolkit import recipe as recipes
from toolkit.errors import RecipeError
from toolkit.train import run

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

SHORT = {"max_steps": 3, "per_device_train_batch_size": 4, "max_length": 64, "logging_steps": 1}


def added_tokens_recipe(tmp: Path) -> dict:
    """The runner test's tiny recipe, shortened: tokens added to a fresh model (its embedding is built at the
    padded size) and to a trained one (its embedding is resized), then a GGUF."""
    raw = tiny_recipe(tmp)
    tok, pretrain, sft, _ = raw["stages"]
    pretrain["model"].update(add_special_tokens=["<tool>", "</tool>"], pad_vocab_to_multiple_of=64)
    sft["model"] = {"add_special_tokens": ["<perspective>"], "pad_vocab_to_multiple_of": 64}
    del sft["eval"]
    for stage in (pretrain, sft):
        stage["train"] = SHORT
    raw["stages"] = [tok, pretrain, sft, {"name": "gguf", "method": "export", "export": {"quant": "q8_0"}}]
    return raw


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("added")
    raw = added_tokens_recipe(tmp)
    run(recipes.parse(raw))
    return Path(raw["output_dir"])


def test_tokens_are_whole_and_embedding_padded(run_dir):
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft" / "final")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<tool>", "</tool>", "<perspective>")}
    assert sorted(ids.values()) == [400, 401, 402]  # appended after the trained vocabulary, in order
    encoded = tokenizer("<tool>ls</tool><perspective>", add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids["<tool>"] and encoded[-2:] == [ids["</tool>"], ids["<perspective>"]]
    pretrain = AutoConfig.from_pretrained(run_dir / "pretrain" / "final")
    sft = AutoConfig.from_pretrained(run_dir / "sft" / "final")
    assert pretrain.vocab_size == 448  # 402 tokens, padded to a multiple of 64
    assert sft.vocab_size == 448  # one more token still fits the padded rows


def test_gguf_carries_added_tokens_with_their_ids(run_dir):
    path = next((run_dir / "gguf").glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    text = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    kind = [int(types.parts[i][0]) for i in types.data]
    assert len(text) == 448
    assert text[400:403] == ["<tool>", "</tool>", "<perspective>"]
    assert kind[400:403] == [CONTROL] * 3
    assert text[447] == "[PAD447]" and kind[447] == UNUSED
    report = json.loads(next((run_dir / "gguf").glob("*.report.json")).read_text())
    # The added tokens' text is among those tokenized by both.
    assert report["measures"]["tokenization_identical"] == 1.0
    assert report["ok"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("pad_vocab_to_multiple_of", 0), ("pad_vocab_to_multiple_of", "64"), ("add_special_tokens", "<tool>")],
)
def test_bad_values_are_refused_before_training(tmp_path, key, value):
    raw = added_tokens_recipe(tmp_path)
    raw["stages"][1]["model"][key] = value
    with pytest.raises(RecipeError, match=f"stages.pretrain.model.{key}"):
        recipes.parse(raw)
