"""README.md's architecture table is generated from the registry and kept in step with it."""

from __future__ import annotations

import pytest

from export.arch_table import COMMAND, END, README, START, main, render_readme, render_table
from toolkit.models import PRESETS, Preset, build_config, count_parameters


def test_readme_table_matches_the_registry():
    text = README.read_text()
    assert render_readme(text) == text, f"README.md's architecture table is out of date: run `{COMMAND}`"


def test_every_preset_has_a_row_with_its_meta_device_count():
    table = render_table()
    for name, preset in PRESETS.items():
        n = count_parameters(build_config(name))
        assert f"| `{name}` | {preset.arch} | {n:,} |" in table
    # decoder-1b: TinyLlama-1.1B's exact size; 4 bytes a parameter is 4.10 GiB, 2 bytes 2.05 GiB.
    assert "| `decoder-1b` | decoder | 1,100,048,384 | 4.10 GiB | 2.05 GiB |" in table
    assert "| `llama` | native `LlamaForCausalLM`, Transformers backend |" in table


def test_a_new_preset_makes_the_readme_stale(monkeypatch, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text())
    assert main(["--write", "--readme", str(readme)]) == 0
    assert main(["--check", "--readme", str(readme)]) == 0
    monkeypatch.setitem(PRESETS, "decoder-wide", Preset("decoder-wide", "decoder", {"hidden_size": 512}))
    assert main(["--check", "--readme", str(readme)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main(["--write", "--readme", str(readme)]) == 0
    assert main(["--check", "--readme", str(readme)]) == 0
    written = readme.read_text()
    assert "| `decoder-wide` | decoder |" in written
    # Only the region between the markers changes.
    before, after = README.read_text(), written
    assert before.partition(START)[0] == after.partition(START)[0]
    assert before.partition(END)[2] == after.partition(END)[2]
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left


@pytest.mark.parametrize("text", ["no markers", f"{END}\n{START}\n", f"{START}\n{END}\n{START}\n{END}\n"])
def test_readme_without_one_marker_region_is_an_error(tmp_path, capsys, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert main(["--write", "--readme", str(readme)]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert readme.read_text() == text
