"""The rest of TRL's post-training family as registry entries (kto, orpo, cpo, reward, distill), each run by
`toolkit train` in a fresh process on a tiny model, each judged by its own measure computed here, outside
the trainer: the preference methods raise log p(chosen) - log p(rejected) on their pairs, the reward model ranks
held-out pairs it never saw, the distilled student comes closer to its teacher, and a reward model trained
by one stage scores GRPO's completions in the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.export.conftest import save_preset_model
from tests.toolkit.train.test_rl import toolkit_train
from toolkit.models import register_auto_classes

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

ROOT = Path(__file__).resolve().parents[3]
TRAIN = {"per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 1000, "report_to": "none"}


def rows(path: str, start: int, stop: int) -> list[dict]:
    return [json.loads(line) for line in (ROOT / path).read_text().splitlines()[start:stop]]


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path.name


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("methods")
    save_preset_model("decoder-tiny", work / "model", train=True)
    save_preset_model("decoder-tiny", work / "student", train=False)  # same tokenizer, untrained
    write_jsonl(work / "pairs.jsonl", rows("data/preference/train.jsonl", 0, 64))
    write_jsonl(work / "unpaired.jsonl", rows("data/preference/unpaired.jsonl", 0, 64))
    write_jsonl(work / "prompts.jsonl", rows("data/rl/prompts.jsonl", 0, 64))
    # A preference a tiny score head can learn in a few steps, on prompts split into disjoint halves: the
    # plain answer over the same answer with a hedge after it.
    hedged = [
        {**r, "rejected": [{"role": "assistant", "content": r["chosen"][0]["content"] + " maybe, not sure"}]}
        for r in rows("data/preference/train.jsonl", 0, 192)
    ]
    write_jsonl(work / "hedge_train.jsonl", hedged[:128])
    write_jsonl(work / "hedge_heldout.jsonl", hedged[128:])
    return work


def completion_logp(model, tokenizer, prompt: list[dict], completion: list[dict]) -> float:
    """log p(completion | prompt) under the chat template, summed over the completion's tokens."""
    start = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    prefix = len(tokenizer(start, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logps[prefix - 1 :].gather(-1, targets[prefix - 1 :, None]).sum().item()


def mean_margin(folder: Path, pairs: list[dict]) -> float:
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    margins = [
        completion_logp(model, tokenizer, r["prompt"], r["chosen"])
        - completion_logp(model, tokenizer, r["prompt"], r["rejected"])
        for r in pairs
    ]
    return sum(margins) / len(margins)


@pytest.mark.parametrize("method", ["orpo", "cpo"])
def test_preference_methods_raise_the_margin_of_their_pairs(work, method):
    stage = {
        "name": method,
        "method": method,
        "model": {"path": "model"},
        "data": {"sources": ["pairs.jsonl"]},
        "train": {**TRAIN, "max_steps": 16, "learning_rate": 2e-3},
    }
    result = toolkit_train(work, method, stage)
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = rows("data/preference/train.jsonl", 0, 64)
    before = mean_margin(work / "model", pairs)
    after = mean_margin(work / "runs" / method / method / "final", pairs)
    assert after > before + 0.5, (before, after)
    logged = [json.loads(line) for line in (work / "runs" / method / method / "metrics.jsonl").open()]
    assert all("rewards/margins" in r for r in logged if "loss" in r)
    assert (work / "runs" / method / method / "plots" / "rewards-margins.png").exists()


def test_kto_raises_good_answers_and_lowers_bad_ones(work):
    stage = {
        "name": "kto",
        "method": "kto",
        "model": {"path": "model"},
        "data": {"sources": ["unpaired.jsonl"]},
        "train": {**TRAIN, "max_steps": 16, "learning_rate": 1e-3},
    }
    result = toolkit_train(work, "kto", stage)
    assert result.returncode == 0, result.stderr[-3000:]
    register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    start = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    final = AutoModelForCausalLM.from_pretrained(work / "runs" / "kto" / "kto" / "final").eval()
    shift = {True: [], False: []}  # KTO's implicit reward: log p_final - log p_start, by label
    for r in rows("data/preference/unpaired.jsonl", 0, 64):
        change = completion_logp(final, tokenizer, r["prompt"], r["completion"]) - completion_logp(
            start, tokenizer, r["prompt"], r["completion"]
        )
        shift[r["label"]].append(change)
    good, bad = (sum(v) / len(v) for v in (shift[True], shift[False]))
    assert good - bad > 0.5, (good, bad)
    logged = [json.loads(line) for line in (work / "runs" / "kto" / "kto" / "metrics.jsonl").open()]
    assert any("kl" in r for r in logged)


def pairwise_accuracy(folder: Path, pairs: list[dict]) -> float:
    register_auto_classes()
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def score(messages: list[dict]) -> float:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    right = [score(r["prompt"] + r["chosen"]) > score(r["prompt"] + r["rejected"]) for r in pairs]
    return sum(right) / len(right)


def test_reward_model_ranks_held_out_pairs_and_scores_grpo_completions(work):
    reward = {
        "name": "reward",
        "method": "reward",
        "model": {"path": "model"},
        "data": {"sources": ["hedge_train.jsonl"]},
        "train": {**TRAIN, "max_steps": 24, "learning_rate": 1e-3},
    }
    grpo = {
        "name": "grpo",
        "method": "grpo",
        "model": {"path": "model"},
        "data": {"sources": ["prompts.jsonl"]},
        "rewards": [{"model": "reward"}, {"builtin": "exact_answer"}],
        "train": {**TRAIN, "max_steps": 2, "num_generations": 4, "max_completion_length": 8},
    }
    result = toolkit_train(work, "rm", reward, grpo)
    assert result.returncode == 0, result.stderr[-3000:]
    final = work / "runs" / "rm" / "reward" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["DecoderForSequenceClassification"] and len(config["id2label"]) == 1
    held_out = [json.loads(line) for line in (work / "hedge_heldout.jsonl").open()]
    assert pairwise_accuracy(final, held_out) >= 0.9
    logged = [json.loads(line) for line in (work / "runs" / "rm" / "grpo" / "metrics.jsonl").open()]
    assert all(
        {"rewards/reward/mean", "rewards/exact_answer/mean"} <= set(r) for r in logged if "reward" in r
    )


def next_token_kl(teacher, student, tokenizer, prompts: list[list[dict]]) -> float:
    """Mean KL(teacher || student) of next-token distributions over the rendered prompts' positions."""
    total, count = 0.0, 0
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = torch.log_softmax(teacher(ids).logits[0].float(), -1)
            q = torch.log_softmax(student(ids).logits[0].float(), -1)
        total += (p.exp() * (p - q)).sum(-1).sum().item()
        count += ids.shape[1]
    return total / count


def test_distilled_student_comes_closer_to_its_teacher(work):
    stage = {
        "name": "distill",
        "method": "distill",
        "model": {"path": "student"},
        "teacher": {"path": "model"},
        "data": {"sources": ["prompts.jsonl"]},
        "train": {**TRAIN, "max_steps": 12, "learning_rate": 2e-3, "max_completion_length": 12, "beta": 0.0},
    }
    result = toolkit_train(work, "distill", stage)
    assert result.returncode == 0, result.stderr[-3000:]
    register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    teacher = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows("data/eval/heldout.jsonl", 0, 16)]
    before = next_token_kl(
        teacher, AutoModelForCausalLM.from_pretrained(work / "student").eval(), tokenizer, prompts
    )
    final = AutoModelForCausalLM.from_pretrained(work / "runs" / "distill" / "distill" / "final").eval()
    after = next_token_kl(teacher, final, tokenizer, prompts)
    assert after < 0.8 * before, (before, after)


def test_method_data_and_teacher_mistakes_are_reported_before_training(work):
    kto_on_pairs = {
        "name": "kto",
        "method": "kto",
        "model": {"path": "model"},
        "data": {"sources": ["pairs.jsonl"]},
        "train": {**TRAIN, "max_steps": 1},
    }
    no_teacher = {
        "name": "distill",
        "method": "distill",
        "model": {"path": "student"},
        "teacher": {"stage": "later"},
        "data": {"sources": ["prompts.jsonl"]},
    }
    reward_from_sft = {
        "name": "grpo",
        "method": "grpo",
        "model": {"path": "model"},
        "data": {"sources": ["prompts.jsonl"]},
        "rewards": [{"model": "kto"}],
    }
    result = toolkit_train(work, "bad", kto_on_pairs, no_teacher, reward_from_sft)
    assert result.returncode != 0
    err = result.stderr
    assert "rows in the preference format feed kind 'preference', not 'unpaired'" in err, err[-2000:]
    assert "stages.distill.teacher.stage: 'later' is no earlier stage (earlier: kto)" in err
    assert "stages.grpo.rewards[0].model: stage 'kto' is a kto stage" in err
    assert not (work / "runs" / "bad" / "kto" / "final").exists()
