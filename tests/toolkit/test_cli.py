"""The `toolkit` command: subcommands run, and bad input ends in one clear line and a non-zero exit."""

import json
import subprocess
import sys

import pytest

from toolkit.cli import main


def run_cli(*args):
    """Run the installed console script in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_arch_list_prints_every_preset_with_parameter_count(capsys):
    assert main(["arch", "list"]) == 0
    out = capsys.readouterr().out
    assert "decoder-tiny" in out and "1,100,048,384" in out  # decoder-1b has TinyLlama-1.1B's exact size


def test_arch_info_memory_is_consistent(capsys):
    assert main(["arch", "info", "decoder-125m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = info["parameters"]
    assert info["inference"]["float32"]["weights"] == 4 * n
    assert info["inference"]["bfloat16"]["weights"] == 2 * n
    assert info["training"]["fp32"]["total"] == 16 * n
    # 12 layers x 12 KV heads x 64 dims x (K and V) x 2048 tokens x 2 bytes
    assert info["inference"]["bfloat16"]["kv_cache"] == 12 * 12 * 64 * 2 * 2048 * 2


def test_unknown_preset_is_one_line_no_traceback():
    result = run_cli("arch", "info", "decoder-tny")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown preset 'decoder-tny' (did you mean 'decoder-tiny'?); `toolkit arch list` shows them all"
    )


def test_train_bad_recipe_key_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nmethod: sft\nmodel: {path: x}\ndata: {sources: [a.jsonl]}\ntrain: {max_step: 3}\n"
    )
    result = run_cli("train", str(recipe))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown key 'max_step'" in result.stderr and "did you mean 'max_steps'?" in result.stderr


def test_train_missing_recipe(tmp_path):
    result = run_cli("train", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "recipe file not found" in result.stderr


def test_data_check_reports_every_problem_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "sft.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        "{not json\n"
        '{"messages": [{"role": "robot", "content": "hi"}]}\n'
    )
    assert main(["data", "check", str(bad), "--kind", "messages"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2:" in out and f"{bad}:3:" in out


@pytest.mark.parametrize(
    "path", ["data/sft/train.jsonl", "data/preference/train.jsonl", "data/eval/heldout.jsonl"]
)
def test_shipped_data_is_clean(path, capsys):
    assert main(["data", "check", path]) == 0


def test_data_tokenizer_command(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n" * 50)
    assert (
        main(
            [
                "data",
                "tokenizer",
                "--corpus",
                str(corpus),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert (
        main(
            ["data", "tokenizer", "--corpus", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", "x"]
        )
        == 2
    )
