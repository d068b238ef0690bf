"""Ollama packaging: Modelfile contents and the Go template rendered against the jinja chat template."""

from __future__ import annotations

import shutil

from transformers import AutoTokenizer

from export.ollama import CHATML_GO_TEMPLATE, export_ollama, go_template_for, render_go_template

CONVERSATION = [
    {"role": "system", "content": "You answer in French."},
    {"role": "user", "content": "Hello,\n  how are you?"},
    {"role": "assistant", "content": "Très bien, merci !"},
    {"role": "user", "content": "And 2+2?"},
]


def test_go_template_renders_like_the_jinja_template(decoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    jinja = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert render_go_template(CHATML_GO_TEMPLATE, CONVERSATION) == jinja
    assert jinja.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_go_interpreter_trims_like_go():
    template = "A  {{- range .Messages }} [{{ .Role -}}  ] {{ end -}}\n B"
    assert render_go_template(template, [{"role": "x", "content": ""}]) == "A [x] B"


def test_modelfile_for_a_chatml_model(decoder_dir, tmp_path):
    result = export_ollama(decoder_dir, tmp_path / "ollama", "q8_0", system="Be brief.")
    assert result.ok and result.template_written
    text = result.modelfile.read_text()
    assert text.startswith(f"FROM ./{result.gguf.path.name}\n")
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n' in text
    assert "PARAMETER num_ctx 256\n" in text
    assert f'TEMPLATE """{CHATML_GO_TEMPLATE}"""' in text
    assert text.endswith('SYSTEM """Be brief."""\n')


def test_other_template_shapes_get_no_template_line(decoder_dir, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(decoder_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(folder)
    assert go_template_for(AutoTokenizer.from_pretrained(folder)) is None
    result = export_ollama(folder, tmp_path / "out", "f16", verify=False)
    assert not result.template_written and result.notes
    assert "TEMPLATE" not in result.modelfile.read_text()
