"""Pre-tokenizer detection, vocabulary and chat template as written to GGUF."""

from __future__ import annotations

import json

import jinja2
import pytest

from export.tokenizer_gguf import CONTROL, detect_pre_tokenizer, portable_chat_template, read_vocab
from toolkit.errors import ExportError


@pytest.mark.parametrize("style", ["qwen2", "llama-bpe", "gpt-2"])
def test_pre_tokenizer_is_detected_from_the_tokenizer(make_tokenizer, tmp_path, style):
    make_tokenizer(style, tmp_path)
    assert detect_pre_tokenizer(json.loads((tmp_path / "tokenizer.json").read_text())) == style


def test_unknown_pre_tokenizer_names_what_was_found_and_the_known_ones():
    tokenizer_json = {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}],
        }
    }
    with pytest.raises(ExportError) as error:
        detect_pre_tokenizer(tokenizer_json)
    message = str(error.value)
    assert "found Digits" in message and "gpt-2, llama-bpe, qwen2" in message


def test_vocab_keeps_special_ids_and_pads_to_the_embedding(make_tokenizer, tmp_path):
    tokenizer = make_tokenizer("qwen2", tmp_path)
    vocab = read_vocab(tmp_path, 600)
    assert len(vocab.tokens) == 600 and vocab.tokens[-1] == "[PAD599]"
    for token in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert vocab.tokens[token_id] == token and vocab.token_types[token_id] == CONTROL
    assert vocab.special_ids == {"bos": 0, "eos": 0, "pad": 1}
    assert not vocab.add_bos and "{% generation" not in vocab.chat_template
    make_tokenizer("llama-bpe", tmp_path / "l3")
    assert read_vocab(tmp_path / "l3", 512).add_bos
    with pytest.raises(ExportError, match="512 tokens but the model's embedding has 100 rows"):
        read_vocab(tmp_path, 100)


@pytest.mark.parametrize("style", ["gpt-2", "llama-bpe", "qwen2"])
def test_vocab_read_from_files_agrees_with_transformers(make_tokenizer, tmp_path, style):
    """The exporter reads the tokenizer's files without transformers (whose import brings in torch); what it
    reads must be what AutoTokenizer makes of the same folder."""
    from transformers import AutoTokenizer

    make_tokenizer(style, tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    reference.add_special_tokens({"extra_special_tokens": ["<tool>"]})  # an added special token too
    reference.save_pretrained(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    vocab = read_vocab(tmp_path, len(reference))
    expected = {
        name: getattr(reference, f"{name}_token_id")
        for name in ("bos", "eos", "unk", "pad")
        if getattr(reference, f"{name}_token_id") is not None
    }
    assert vocab.special_ids == expected
    plain, full = reference("a", add_special_tokens=False)["input_ids"], reference("a")["input_ids"]
    assert vocab.add_bos == (full[0] != plain[0] and full[0] == reference.bos_token_id)
    assert vocab.add_eos == (full[-1] != plain[-1] and full[-1] == reference.eos_token_id)
    assert vocab.chat_template == (
        portable_chat_template(reference.chat_template) if reference.chat_template else None
    )
    assert vocab.tokens[reference.convert_tokens_to_ids("<tool>")] == "<tool>"


def test_portable_template_renders_like_the_original(chatml):
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    from transformers.utils.chat_template_utils import render_jinja_template

    original = render_jinja_template([conversation], chat_template=chatml, add_generation_prompt=True)[0][0]
    portable = portable_chat_template(chatml)
    assert "{% generation" not in portable and "endgeneration" not in portable
    plain = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(portable)
    assert plain.render(messages=conversation, add_generation_prompt=True) == original
