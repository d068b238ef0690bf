"""`toolkit export gguf|ollama` wiring, run through `python -m export.cli`'s `main`."""

from __future__ import annotations

import argparse
import json

from export import verify
from export.cli import main, register


def test_register_adds_gguf_and_ollama():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gguf", "runs/demo", "--quant", "q4_k_m", "--no-verify"])
    assert args.func.__name__ == "run_gguf" and args.quant == "q4_k_m" and args.verify is False
    assert parser.parse_args(["ollama", "x", "--out", "d"]).func.__name__ == "run_ollama"


def test_gguf_command_writes_report_and_table(decoder_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["gguf", str(decoder_dir), "--quant", "f32", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| max_abs_logit_delta |" in stdout and "| top1_agreement |" in stdout
    assert json.loads((tmp_path / "m.gguf.report.json").read_text())["ok"]
    assert main(["gguf", str(decoder_dir), "--quant", "f32", "--out", str(out)]) == 2  # exists, no --force


def test_missed_bound_exits_non_zero(decoder_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(verify.BOUNDS, "q8_0", {"mean_kl": ("<=", 1e-12)})
    assert main(["gguf", str(decoder_dir), "--quant", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 1
    assert "| mean_kl |" in capsys.readouterr().out
