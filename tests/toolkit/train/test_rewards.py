"""The built-in rewards against hand-checked cases: exact answers by the data's own rule, partial credit that
ranks near misses above far ones (and is 1.0 exactly where the exact reward is), format and length."""

from __future__ import annotations

import json
from difflib import SequenceMatcher

import pytest

from toolkit.train.rewards import BUILTINS, close_answer, exact_answer


def test_close_answer_is_exact_where_exact_is_and_ranks_near_misses():
    answers = ["7700", "7700", "7700", "7700", '{"tool": "time", "city": "Oslo"}']
    completions = ["7700.", "7600", "7", "", '{"city": "Oslo", "tool": "time"}\nthanks']
    close = close_answer(completions, answers)
    exact = exact_answer(completions, answers)
    assert [c == 1.0 for c in close] == [e == 1.0 for e in exact] == [True, False, False, False, True]
    assert close[1] == pytest.approx(SequenceMatcher(None, "7600", "7700").ratio()) == pytest.approx(0.75)
    assert close[1] > close[2] > close[3] == 0.0
    # Conversations (TRL's chat-format completions) count by their text.
    assert close_answer([[{"role": "assistant", "content": "7700"}]], ["7700"]) == [1.0]


def test_every_builtin_names_the_columns_it_needs():
    assert BUILTINS["close_answer"][1] == ("answer",) and BUILTINS["exact_answer"][1] == ("answer",)
    assert BUILTINS["format"][1] == () and BUILTINS["length"][1] == ()


def test_a_completion_limit_shorter_than_the_answers_is_named(tmp_path):
    """An answer longer than max_completion_length can never be completed, so it is never rewarded: said
    before training, with how many answers, where, and the limit that fits them."""
    from types import SimpleNamespace

    from toolkit.data.tokenizer import answer_tokens, train_tokenizer
    from toolkit.train.rewards import truncation_warning

    corpus = tmp_path / "c.txt"
    corpus.write_text(
        'Add 2 and 3. 5. {"tool": "flights", "origin": "Tokyo", "destination": "Bangkok"}\n' * 40
    )
    tokenizer = train_tokenizer([str(corpus)], vocab_size=300, out_dir=tmp_path / "t")
    answers = ["5", '{"tool": "flights", "origin": "Tokyo", "destination": "Bangkok"}']
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(f'{{"prompt": "q", "answer": {json.dumps(a)}}}\n' for a in answers))
    short, long = answer_tokens(tokenizer, answers)
    assert short < long

    def stage(limit):
        return SimpleNamespace(
            name="grpo", train={"max_completion_length": limit}, data={"sources": [{"path": str(data)}]}
        )

    warning = truncation_warning(stage(long - 1), tokenizer)
    assert f"max_completion_length={long - 1} is shorter than 1 of the 2 answers in {data}" in warning
    assert f"max_completion_length: {long} fits them all" in warning
    assert truncation_warning(stage(long), tokenizer) is None
    assert (
        truncation_warning(
            SimpleNamespace(name="grpo", train={}, data={"sources": [{"path": str(data)}]}), tokenizer
        )
        is None
    )
