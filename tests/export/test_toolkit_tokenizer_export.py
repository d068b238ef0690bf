"""The toolkit's own tokenizer (toolkit.data.tokenizer) through GGUF and Ollama: named `qwen2`, same ids."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from export.gguf import export_gguf
from export.ollama import CHATML_GO_TEMPLATE, export_ollama, render_go_template
from toolkit.data.tokenizer import END_OF_TURN_TOKENS, train_tokenizer
from toolkit.models import DecoderForCausalLM, build_config


@pytest.fixture(scope="module")
def toolkit_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toolkit-tok")
    # The shipped corpus's validation split: enough text for a real merge table, quick to train on.
    tokenizer = train_tokenizer(["data/corpus/valid.jsonl"], 768, folder)
    torch.manual_seed(0)
    config = build_config(
        "decoder-tiny", vocab_size=768, num_hidden_layers=2, eos_token_id=tokenizer.eos_token_id
    )
    DecoderForCausalLM(config).save_pretrained(folder)
    return folder


def test_toolkit_tokenizer_exports_and_verifies(toolkit_model, tmp_path):
    result = export_gguf(toolkit_model, "f32", tmp_path / "m.gguf")
    assert result.ok, result.report["checks"]
    assert result.report["tokenizer_pre"] == "qwen2"
    assert result.report["measures"]["chat_template_identical"] == 1.0


def test_toolkit_chat_template_has_a_go_equivalent(toolkit_model, tmp_path):
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(toolkit_model)
    jinja = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert render_go_template(CHATML_GO_TEMPLATE, conversation) == jinja
    result = export_ollama(toolkit_model, tmp_path / "ollama", "q8_0", verify=False)
    assert result.template_written
    assert result.stops == list(END_OF_TURN_TOKENS)
