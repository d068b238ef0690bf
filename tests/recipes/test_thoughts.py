"""`recipes/thoughts.yaml` end to end, cut to a few steps, as a user runs it: the 12 thought tokens baked in,
thought RL rewarded for length only (a run that must come out as theater, and be flagged so), the GGUF with the
thought tokens as control tokens that tokenize as in transformers; then the model answered through
`toolkit chat` and `toolkit eval` with and without `--show-thoughts`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.data.thoughts import THOUGHT_END, THOUGHT_START, THOUGHT_TOKENS

ROOT = Path(__file__).resolve().parents[2]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    from tests.tiny import head

    tmp = tmp_path_factory.mktemp("thoughts")
    corpus = head("data/corpus/train.jsonl", 300, tmp / "corpus.jsonl")
    out = tmp / "run"
    overrides = [
        f"output_dir={out}",
        f"stages.tokenizer.data.sources=[{corpus}]",
        "stages.tokenizer.tokenizer.vocab_size=400",
        f"stages.pretrain.data.sources=[{corpus}]",
        "stages.pretrain.train.max_steps=10",
        "stages.bake.train.max_steps=20",
        "stages.bake.thoughts={check_every: 10, limit: 6, min_steps: 0, max_new_tokens: 32}",
        "stages.bake.eval.limit=6",
        "stages.think.train.max_steps=4",
        "stages.think.train.max_completion_length=32",
        "stages.think.rewards=[{builtin: length}]",  # rewards length only: theater by construction
        "stages.think.theater={check_every: 2, limit: 3, samples: 2, max_new_tokens: 24}",
        "stages.think.eval.limit=6",
    ]
    done = subprocess.run(
        [TOOLKIT, "train", "recipes/thoughts.yaml", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_baking_reports_the_format_bound(run):
    out, done = run
    baked = json.loads((out / "bake" / "eval.json").read_text())
    report = baked["thoughts"]
    assert report["bound"] == 0.85 and isinstance(report["passed"], bool)
    assert [h["step"] for h in report["history"]] == [10, 20]
    assert (out / "bake" / "plots" / "thoughts-format_accuracy.png").exists()
    tasks = baked["tasks"]  # the eval section scores the answer after the thought, and with it ablated
    assert {"accuracy", "accuracy_without_thoughts", "thought_format"} <= set(tasks)
    assert "thought format accuracy" in done.stdout and "no thoughts" in done.stdout
    tokenizer = json.loads((out / "bake" / "final" / "tokenizer_config.json").read_text())
    assert set(THOUGHT_TOKENS) <= set(tokenizer["extra_special_tokens"])


def test_a_length_rewarded_run_is_flagged_as_theater(run):
    out, done = run
    theater = json.loads((out / "think" / "eval.json").read_text())["theater"]
    assert theater["theater"] and theater["reasons"]
    assert {"accuracy", "accuracy_ablated", "ablation_gain", "divergence", "dependence"} <= set(theater)
    checks = [json.loads(line) for line in (out / "think" / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks if "theater/divergence" in c] == [2, 4]
    assert (out / "think" / "plots" / "theater-divergence.png").exists()
    assert "think: THEATER" in done.stdout


def test_the_gguf_keeps_the_thought_tokens_as_control_tokens(run):
    import gguf
    from transformers import AutoTokenizer

    from export.llama_cpp import load_for_verification
    from export.tokenizer_gguf import CONTROL

    out, _ = run
    path = next((out / "gguf").glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    text = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    kind = [int(types.parts[i][0]) for i in types.data]
    tokenizer = AutoTokenizer.from_pretrained(out / "think" / "final")
    for token in THOUGHT_TOKENS:
        index = tokenizer.convert_tokens_to_ids(token)
        assert text[index] == token and kind[index] == CONTROL
    trace = "[thinking]<step>ones 7 + 5 = 12, carry 1</step><doubt>is it 42? yes</doubt>[/endthinking]42"
    llm = load_for_verification(path)
    assert (
        llm.tokenize(trace.encode(), add_bos=False, special=True)
        == tokenizer(trace, add_special_tokens=False)["input_ids"]
    )
    report = json.loads(next((out / "gguf").glob("*.report.json")).read_text())
    assert report["ok"] and report["measures"]["tokenization_identical"] == 1.0


def test_chat_and_eval_hide_or_show_thoughts(run):
    out, _ = run
    model = str(out / "think" / "final")
    ask = ["--prompt", "What is 17 + 25?", "--max-new-tokens", "40"]
    hidden = subprocess.run([TOOLKIT, "chat", model, *ask], capture_output=True, text=True, cwd=ROOT)
    shown = subprocess.run(
        [TOOLKIT, "chat", model, *ask, "--show-thoughts"], capture_output=True, text=True, cwd=ROOT
    )
    assert hidden.returncode == 0 and shown.returncode == 0, hidden.stderr[-2000:] + shown.stderr[-2000:]
    assert shown.stdout.startswith("thinking: ") and not hidden.stdout.startswith("thinking: ")
    assert THOUGHT_START not in hidden.stdout and THOUGHT_END not in hidden.stdout
    evaluated = subprocess.run(
        [TOOLKIT, "eval", model, "--tasks", "data/eval/heldout.jsonl", "--limit", "4", "--show-thoughts"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert {"accuracy", "accuracy_without_thoughts"} <= set(result["tasks"])
    assert all("completion" in s for s in result["tasks"]["samples"])


# ids other than "vllm": the suite skips every test with a `vllm` keyword outside the vLLM environment
@pytest.mark.parametrize("target", ["vllm", "hf"], ids=["vllm-folder", "hub-folder"])
def test_vllm_and_hub_folders_keep_the_thought_token_ids(run, tmp_path, target):
    from transformers import AutoTokenizer

    out, _ = run
    folder = tmp_path / target
    # --verify-in clean: transformers in a fresh process; the vLLM suite serves such folders in vLLM itself.
    verify = ["--verify-in", "clean"] if target == "vllm" else []
    done = subprocess.run(
        [TOOLKIT, "export", target, str(out / "think" / "final"), "--out", str(folder), *verify],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    source = AutoTokenizer.from_pretrained(out / "think" / "final")
    exported = AutoTokenizer.from_pretrained(folder)
    trace = "[thinking]<step>7 + 5 = 12</step><mece>one case</mece>[/endthinking]12"
    assert exported(trace)["input_ids"] == source(trace)["input_ids"]
    for token in THOUGHT_TOKENS:
        assert exported.convert_tokens_to_ids(token) == source.convert_tokens_to_ids(token)
    assert json.loads((folder / "export_report.json").read_text())["ok"]


def test_the_gguf_answers_through_llama_cpp_after_its_thought(run):
    out, _ = run
    tasks = json.loads((out / "gguf" / "eval.json").read_text())["tasks"]
    assert tasks["runtime"] == "llama.cpp" and "thought_format" in tasks
    think = json.loads((out / "think" / "eval.json").read_text())["tasks"]
    # greedy in both; q8_0 may flip a near tie, so the scores are close, not equal
    assert abs(tasks["accuracy"] - think["accuracy"]) <= 0.34
