"""Tokenizer training: lossless round trips, single digits, special tokens, the ChatML template and its mask."""

import json
import random

import pytest
from transformers import AutoTokenizer

from toolkit.data.tokenizer import (
    CHAT_TEMPLATE,
    END_OF_TURN_TOKENS,
    SPECIAL_TOKENS,
    train_tokenizer,
)
from toolkit.errors import DataError, ToolkitError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 30+12?"},
    {"role": "assistant", "content": "42 🙂"},
]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 30+12?<|im_end|>\n"
    "<|im_start|>assistant\n42 🙂<|im_end|>\n"
)
ROUND_TRIPS = [
    "The cat sat on the mat.",
    "  leading spaces, trailing spaces  \n\n\ttabs\r\nand CRLF",
    "Zahlen 1234567890 und 3.14159, -42, 1e10",
    "naïve café — “quotes” ½ 日本語のテキスト 한국어 العربية",
    "emoji 🙂🚀👩‍👩‍👧 and a rare character 𝔘",
    "hello , world ! isn 't",  # spaces a clean-up step would remove
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus heavy in repeated numbers: a tokenizer that grouped digits would learn to merge them."""
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree and then year sum is of".split()
    lines = []
    for _ in range(1500):
        sentence = " ".join(rng.choice(words) for _ in range(8))
        lines.append(f"{sentence} in 2024 the sum 12 + 30 = 42, café 🙂.")
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "part1.txt").write_text("\n".join(lines[:700]) + "\n", encoding="utf-8")
    (folder / "part2.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in lines[700:]), encoding="utf-8"
    )
    return [str(folder / "part1.txt"), str(folder / "part2.jsonl")]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer = train_tokenizer(corpus, 400, out_dir, model_max_length=512, extra_special_tokens=["<|tool|>"])
    return tokenizer, out_dir


def test_folder_holds_a_complete_tokenizer(trained):
    tokenizer, out_dir = trained
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in out_dir.parent.iterdir()] == ["tokenizer"]  # nothing left from the staging folder
    assert (out_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert 300 < len(tokenizer) <= 400
    assert tokenizer.model_max_length == 512
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
    )


def test_special_tokens_have_the_lowest_ids_and_stay_whole(trained):
    tokenizer, _ = trained
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|tool|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert list(dict.fromkeys(SPECIAL_TOKENS.values())) == specials[:4]
    ids = tokenizer("a<|im_end|>b<|tool|>")["input_ids"]
    assert 3 in ids and 4 in ids
    assert tokenizer.decode(ids) == "a<|im_end|>b<|tool|>"
    assert tokenizer.convert_tokens_to_ids(list(END_OF_TURN_TOKENS)) == [3, 0]


def test_no_token_is_added_when_encoding(trained):
    tokenizer, _ = trained
    assert tokenizer("the cat")["input_ids"] == tokenizer.convert_tokens_to_ids(tokenizer.tokenize("the cat"))


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip_is_lossless(trained, text):
    tokenizer, _ = trained
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_digits_are_single_tokens(trained):
    tokenizer, _ = trained
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]
    assert tokenizer.tokenize(" 42") == ["Ġ", "4", "2"]
    assert "Ġthe" in tokenizer.get_vocab()  # merges were learned, just never across digits


def test_chat_template_renders_chatml(trained):
    tokenizer, _ = trained
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CHATML
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_assistant_mask_covers_the_answers_and_their_end_of_turn(trained):
    tokenizer, _ = trained
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tokenizer.decode(ids) == CHATML
    spans, current = [], []
    for token, masked in zip(ids, mask, strict=True):
        if masked:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    assert [tokenizer.decode(span) for span in spans] == ["4<|im_end|>", "42 🙂<|im_end|>"]


def test_trl_accepts_the_template_for_assistant_only_loss(trained):
    from trl.chat_template_utils import (
        has_generation_markers,
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
    )

    tokenizer, _ = trained
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)
    assert is_chat_template_prefix_preserving(tokenizer)


def test_reload_through_auto_tokenizer_is_identical(trained):
    tokenizer, out_dir = trained
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens
    assert (reloaded.chat_template, reloaded.model_max_length) == (CHAT_TEMPLATE, 512)
    for text in ROUND_TRIPS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_retraining_replaces_a_tokenizer_but_nothing_else(corpus, tmp_path):
    out_dir = tmp_path / "tok"
    train_tokenizer(corpus[:1], 300, out_dir)
    small = train_tokenizer(corpus[:1], 280, out_dir)
    assert len(small) <= 280
    assert AutoTokenizer.from_pretrained(out_dir).get_vocab() == small.get_vocab()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ToolkitError, match="holds something other than a tokenizer"):
        train_tokenizer(corpus[:1], 300, tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_bad_inputs_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=f"^{bad}:2: missing 'text'$"):
        train_tokenizer([str(bad)], 300, tmp_path / "tok")
    with pytest.raises(ToolkitError, match="at least 260"):
        train_tokenizer([str(bad)], 100, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
