"""Thought tokens: the format's validator, the shipped traces, the thought rewards, and the anti-theater checks
against scripted models whose answers do and do not depend on their thoughts."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.data.tasks import make_examples
from toolkit.data.thoughts import (
    STRATEGIES,
    THOUGHT_END,
    THOUGHT_START,
    THOUGHT_TOKENS,
    make_trace,
    shown,
    split_thought,
    thought_problems,
)
from toolkit.errors import RecipeError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[thinking]<step>1 + 1</step>[/endthinking]2", None),
        ("[thinking]<step>x[/endthinking]2", "unclosed <step> before [/endthinking]"),
        ("[thinking]<step>x</step><guess>y</guess>[/endthinking]2", "unknown tag <guess>"),
        ("[thinking]<step>x</step>", "unclosed [thinking]: no [/endthinking]"),
        ("<doubt>x</doubt>2", "<doubt> outside the thought"),
        ("[thinking]<step>x</doubt>[/endthinking]2", "</doubt> closes <step>"),
        ("[thinking]<step>x</step>[/endthinking]", "no answer after [/endthinking]"),
        ("2[thinking]<step>x</step>[/endthinking]2", "does not start with [thinking]"),
    ],
)
def test_the_validator_names_what_is_wrong(text, problem):
    found = thought_problems(text)
    assert (not found) if problem is None else any(problem in p for p in found), found


def test_split_and_shown():
    text = "[thinking]<step>7 + 5 = 12</step><doubt>is it 12? yes</doubt>[/endthinking]12"
    thought = split_thought(text)
    assert thought.answer == "12" and thought.strategies == ("step", "doubt")
    assert thought.thought == "<step>7 + 5 = 12</step><doubt>is it 12? yes</doubt>"
    assert shown(text, False) == "12" and shown(text, True) == text
    assert split_thought("[thinking]<step>cut off").answer == ""  # a thought cut by the length limit
    assert split_thought("12").answer == "12"


def test_traces_are_well_formed_answer_right_and_use_every_strategy():
    rows = make_examples(300, seed=5)
    rng = random.Random(0)
    used = set()
    for row in rows:
        trace = make_trace(row, rng)
        assert not thought_problems(trace), trace
        thought = split_thought(trace)
        assert thought.answer == row["answer"] and thought.strategies[0] == "step"
        used.update(thought.strategies)
    assert used == set(STRATEGIES)
    assert len(THOUGHT_TOKENS) == 12


def test_shipped_traces_pass_the_data_check_and_a_bad_row_is_named(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "data", "check", "data/thoughts/train.jsonl"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "[thinking]<step>1</step>[/endthinking]1"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "[thinking]<step>1<hunch>[/endthinking]1"},
            ]
        },
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "data", "check", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert f"{bad}:2: messages[1].content: unknown tag <hunch>" in result.stdout
    assert f"{bad}:2: messages[1].content: unclosed <step> before [/endthinking]" in result.stdout
    assert f"{bad}:1" not in result.stdout


def test_recipe_token_set_and_sections_are_checked():
    from toolkit.recipe import load

    recipe = load(ROOT / "recipes/thoughts.yaml")
    think = next(s for s in recipe.stages if s.name == "think")
    assert (
        think.sections["theater"]["min_divergence"] == 0.3 and think.sections["theater"]["check_every"] == 25
    )
    assert recipe.to_dict()["stages"][3]["theater"]["limit"] == 16  # written back to the run's recipe.yaml
    with pytest.raises(
        RecipeError,
        match=r"unknown key 'min_divergance' in .*: stages.think.theater \(did you mean 'min_divergence'\?\)",
    ):
        load(ROOT / "recipes/thoughts.yaml", overrides=["stages.think.theater.min_divergance=0.2"])
    with pytest.raises(RecipeError, match=r"unknown reward 'thought_gian' \(did you mean 'thought_gain'\?\)"):
        load(ROOT / "recipes/thoughts.yaml", overrides=["stages.think.rewards=[{builtin: thought_gian}]"])
    with pytest.raises(RecipeError, match=r"add_special_tokens: unknown token set 'thought'"):
        load(ROOT / "recipes/thoughts.yaml", overrides=["stages.pretrain.model.add_special_tokens=thought"])
    expanded = load(
        ROOT / "recipes/thoughts.yaml", overrides=["stages.pretrain.model.add_special_tokens=thoughts"]
    )
    assert expanded.stages[1].model["add_special_tokens"] == list(THOUGHT_TOKENS)


# --- with a tokenizer: rewards and the anti-theater checks ----------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.tiny import head
    from toolkit.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    corpus = head("data/corpus/facts.jsonl", 200, out / "corpus.jsonl")
    tokenizer = train_tokenizer([corpus], out_dir=out / "tokenizer", vocab_size=400)
    tokenizer.add_special_tokens({"extra_special_tokens": list(THOUGHT_TOKENS)})
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_thought_tokens_are_whole(tokenizer):
    encoded = ids(tokenizer, "[thinking]<step>1</step><doubt>2</doubt>[/endthinking]3")
    for token in (THOUGHT_START, "<step>", "<doubt>", THOUGHT_END):
        assert tokenizer.convert_tokens_to_ids(token) in encoded


def test_thought_rewards_read_the_tokens_trl_drops(tokenizer):
    from toolkit.train.thoughts import answer_reward, format_reward

    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    good = ids(tokenizer, "[thinking]<step>40 + 2</step>[/endthinking]42") + [eot]
    wrong = ids(tokenizer, "[thinking]<step>40 + 2</step>[/endthinking]41") + [eot]
    broken = ids(tokenizer, "[thinking]<step>40 + 2[/endthinking]42") + [eot]
    plain = ids(tokenizer, "42") + [eot]
    # What TRL hands the reward functions as text has no thought tokens left in it:
    assert "[thinking]" not in tokenizer.decode(good, skip_special_tokens=True)
    completions = [good, wrong, broken, plain]
    assert format_reward(None, tokenizer)(completion_ids=completions) == [1.0, 1.0, 0.0, 0.0]
    assert answer_reward(None, tokenizer)(completion_ids=completions, answer=["42"] * 4) == [
        1.0,
        0.0,
        1.0,
        1.0,
    ]


class Scripted:
    """A stand-in for a causal LM's `generate`, scripted on the decoded text: a thought is `<step>ANSWER</step>`
    plus random filler (so samples differ); an answer after a thought is the thought's step (`honest`) or the
    right answer whatever the thought (`theater`)."""

    device = torch.device("cpu")
    training = False

    def __init__(self, tokenizer, rows, honest: bool) -> None:
        self.tokenizer, self.rows, self.honest = tokenizer, rows, honest
        self.rng = random.Random(0)

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def _continue(self, text: str) -> str:
        row = next(r for r in self.rows if r["prompt"] in text)
        if text.endswith(THOUGHT_START):
            filler = " ".join(
                self.rng.choice(
                    [
                        "so",
                        "then",
                        "next",
                        "check",
                        "sum",
                        "ok",
                        "carry",
                        "add",
                        "one",
                        "ten",
                        "digit",
                        "count",
                    ]
                )
                for _ in range(6)
            )
            return f"<step>{row['answer']}</step><doubt>{filler}</doubt>{THOUGHT_END}"
        if not self.honest:
            return row["answer"] + "<|im_end|>"
        thought = text.rsplit(THOUGHT_START, 1)[1]
        step = thought.split("<step>")[1].split("</step>")[0] if "<step>" in thought else ""
        return step + "<|im_end|>"

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        rows = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            text = self.tokenizer.decode(
                [t for t, m in zip(row, mask, strict=True) if m], skip_special_tokens=False
            )
            new = ids(self.tokenizer, self._continue(text))[:max_new_tokens]
            rows.append(row + new)
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("honest", [True, False])
def test_anti_theater_tells_thoughts_that_matter_from_theater(tokenizer, honest):
    from toolkit.train.thought_stages import TheaterOptions
    from toolkit.train.thoughts import theater_measures

    rows = make_examples(6, seed=3, tasks=["addition", "successor"])
    measured = theater_measures(Scripted(tokenizer, rows, honest), tokenizer, rows, TheaterOptions(samples=3))
    assert measured["accuracy"] == 1.0
    if honest:  # the answer is read off the thought: no thought, no answer; another thought, another answer
        assert measured["accuracy_ablated"] == 0.0 and measured["ablation_gain"] == 1.0
        assert measured["dependence"] == 1.0 and measured["divergence"] > 0.3
        assert not measured["theater"] and measured["reasons"] == []
    else:  # right answers whatever was thought
        assert measured["accuracy_ablated"] == 1.0 and measured["dependence"] == 0.0
        assert measured["theater"]
        assert [r.split()[0] for r in measured["reasons"]] == ["ablation", "dependence"]


def test_a_config_set_over_a_pretrained_model_keeps_its_shapes(tmp_path):
    from transformers import AutoModelForCausalLM

    from toolkit.errors import ToolkitError
    from toolkit.models import build_config, register_auto_classes
    from toolkit.train.trainer_stage import load_pretrained

    register_auto_classes()
    AutoModelForCausalLM.from_config(build_config("decoder-tiny", vocab_size=64)).save_pretrained(tmp_path)
    loaded = load_pretrained(str(tmp_path), {"config": {"rms_norm_eps": 1e-3}}, "stages.s.model")
    assert loaded.config.rms_norm_eps == 1e-3
    with pytest.raises(
        ToolkitError, match=r"stages.s.model.config: intermediate_size would change the shapes"
    ):
        load_pretrained(str(tmp_path), {"config": {"intermediate_size": 100}}, "stages.s.model")
    with pytest.raises(RecipeError, match=r"unknown key 'rms_norm_epss'.*did you mean 'rms_norm_eps'"):
        load_pretrained(str(tmp_path), {"config": {"rms_norm_epss": 1.0}}, "stages.s.model")
