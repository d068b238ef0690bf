"""Win-rate against a base model: the counting and the interval against hand computations, position bias
cancelled by asking both orders, a model against itself at exactly 0.5 through `toolkit eval`, and the judge
served by llama.cpp (OpenAI-compatible endpoint) agreeing with the same judge in transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eval.winrate import JUDGE_PROMPT, Verdict, choose, judge_pair, summarize, win_rate
from tests.eval.helpers import toolkit_eval
from toolkit.errors import ToolkitError

ROOT = Path(__file__).resolve().parents[2]


def test_summary_against_a_hand_computation():
    outcomes = ["win"] * 5 + ["tie"] * 2 + ["loss"] * 3
    summary = summarize(outcomes)
    scores = [1.0] * 5 + [0.5] * 2 + [0.0] * 3
    mean = sum(scores) / 10
    stderr = math.sqrt(sum((s - mean) ** 2 for s in scores) / 9 / 10)
    assert (summary["win"], summary["tie"], summary["loss"], summary["n"]) == (5, 2, 3, 10)
    assert summary["win_rate"] == pytest.approx(0.6)
    assert summary["stderr"] == pytest.approx(stderr)
    assert summary["ci95"] == pytest.approx([0.6 - 1.96 * stderr, 0.6 + 1.96 * stderr])
    assert summarize(["tie"] * 7)["ci95"] == [0.5, 0.5]
    assert summarize(["win"] * 3)["ci95"] == [1.0, 1.0]


def test_exact_scoring_counts_who_alone_is_right():
    rows = [{"prompt": f"Add {i} and 1.", "answer": str(i + 1)} for i in range(6)]
    right = [str(i + 1) for i in range(6)]
    model = right[:4] + ["x", "x"]  # right on 0-3
    base = ["x", "x"] + right[2:5] + ["x"]  # right on 2-4
    summary, verdicts = win_rate(rows, model, base)
    assert [v["outcome"] for v in verdicts] == ["win", "win", "tie", "tie", "loss", "tie"]
    assert summary["win_rate"] == pytest.approx((2 + 0.5 * 3) / 6)
    assert summary["by_scoring"]["exact"]["n"] == 6 and "judge" not in summary["by_scoring"]


def test_an_open_prompt_without_a_judge_names_its_line():
    rows = [{"prompt": "Add 1 and 1.", "answer": "2"}, {"prompt": "Write a poem."}]
    with pytest.raises(ToolkitError, match=r"prompts.jsonl:2: an open prompt"):
        win_rate(rows, ["2", "a"], ["2", "b"], where="prompts.jsonl")


def test_both_orders_cancel_a_judge_that_favours_a_position():
    always_a = lambda text: Verdict("A", 1.0)  # noqa: E731
    assert judge_pair(always_a, "q", "model answer", "base answer")["outcome"] == "tie"

    def prefers_longer(text: str) -> Verdict:
        a = text.split("[Answer A]\n")[1].split("\n[End of answer A]")[0]
        b = text.split("[Answer B]\n")[1].split("\n[End of answer B]")[0]
        return choose(float(len(a)), float(len(b)))

    rows = [{"prompt": "p1"}, {"prompt": "p2"}, {"prompt": "p3"}]
    summary, verdicts = win_rate(
        rows, ["long answer", "s", "same"], ["short", "longer one", "same"], prefers_longer
    )
    assert [v["outcome"] for v in verdicts] == ["win", "loss", "tie"]
    assert verdicts[0]["model_first"]["choice"] == "A" and verdicts[0]["base_first"]["choice"] == "B"
    assert summary["win_rate"] == pytest.approx(0.5)


def test_choose_letters_missing_from_the_candidates():
    assert choose(-1.0, None).choice == "A"
    assert choose(None, -2.0).choice == "B"
    assert choose(None, None).choice == "tie"
    assert choose(-1.0, -3.0).margin == pytest.approx(2.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from tests.export.vllm_helpers import make_run

    return make_run(tmp_path_factory.mktemp("winrate"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Six checkable prompts and six open ones."""
    checkable = (ROOT / "data/eval/heldout.jsonl").read_text().splitlines()[:6]
    open_ = (ROOT / "data/eval/open.jsonl").read_text().splitlines()[:6]
    path = tmp_path_factory.mktemp("prompts") / "mixed.jsonl"
    path.write_text("\n".join(checkable + open_) + "\n")
    return path


@pytest.mark.slow
def test_a_model_against_itself_is_exactly_one_half(run, prompts, tmp_path):
    done = toolkit_eval(
        tmp_path, str(run), "--against", str(run), "--prompts", str(prompts), "--judge", str(run),
        "--max-new-tokens", "8", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert (result["n"], result["tie"], result["win_rate"], result["ci95"]) == (12, 12, 0.5, [0.5, 0.5])
    assert result["by_scoring"]["exact"]["n"] == 6 and result["by_scoring"]["judge"]["n"] == 6
    assert result["judge"] == str(run) and result["model"]["dtype"] == "float32"
    saved = sorted((run / "eval").glob("*/verdicts.jsonl"))[-1]
    verdicts = [json.loads(line) for line in saved.read_text().splitlines()]
    judged = [v for v in verdicts if v["scoring"] == "judge"]
    # The same answers in both orders are the same question: the judge picks the same letter twice.
    assert all(v["model_first"] == v["base_first"] for v in judged) and len(judged) == 6
    assert (saved.parent / "report.md").read_text().startswith(f"win-rate of {run} against {run}")


ANSWERS = ["3", "1 plus two", "three", "It is 3.", "2", "no idea", "3!", "4"]
JUDGED = [JUDGE_PROMPT.format(prompt=f"Add {i} and 2.", a=ANSWERS[i], b=ANSWERS[-1 - i]) for i in range(8)]


@pytest.fixture(scope="module")
def judge(run, tmp_path_factory) -> Path:
    """A judge that always answers a letter: an untied one-layer decoder whose output rows are zero but for
    "A" (v) and "B" (−v), so one letter leads every distribution; v is the direction in which the judged
    texts' last hidden states differ most, so that the answers move the verdict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.export.vllm_helpers import preset_config
    from toolkit.data.tokenizer import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(run / "sft" / "final")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(
        preset_config("decoder-tiny", tokenizer, 1, tie_word_embeddings=False)
    ).eval()
    with torch.no_grad():
        states = []
        for text in JUDGED:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1])
        centred = torch.stack(states) - torch.stack(states).mean(0)
        v = torch.linalg.svd(centred).Vh[0] * 50 / centred.norm(dim=1).mean()
        a, b = (tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in "AB")
        head = model.get_output_embeddings().weight
        head.zero_()
        head[a], head[b] = v, -v
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    folder = tmp_path_factory.mktemp("judge") / "judge"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_judge_served_by_llama_cpp_agrees_with_transformers(judge, tmp_path):
    """The judge as an OpenAI-compatible endpoint (llama-cpp-python's server on its f32 GGUF) picks what the
    same judge picks in transformers, whose margin equals a hand computation."""
    from eval.servers import llama_cpp_server
    from eval.stages import load_model_folder
    from eval.winrate import EndpointJudge, HFJudge
    from export.gguf import export_gguf

    gguf = export_gguf(judge, "f32", tmp_path / "judge-f32.gguf", verify=False).path
    model, tokenizer = load_model_folder(judge)
    local = HFJudge(model, tokenizer, "judge")
    answers = ["3", "1 plus two", "three", "It is 3.", "2", "no idea", "3!", "4"]
    texts = [
        JUDGE_PROMPT.format(prompt=f"Add {i} and 2.", a=answers[i], b=answers[-1 - i])
        for i in range(len(answers))
    ]
    ours = [local(text) for text in texts]

    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": texts[0]}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)
    a, b = (tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in "AB")
    assert ours[0].margin == pytest.approx(float(logprobs[a] - logprobs[b]), abs=1e-5)

    with llama_cpp_server(gguf, tmp_path / "server.log", 512) as url:  # the judge prompt: ~290 tokens
        served = [EndpointJudge(url)(text) for text in texts]
    assert [v.choice for v in served] == [v.choice for v in ours]
    assert {v.choice for v in ours} == {"A", "B"}  # the answers move the verdict: a test that can fail
