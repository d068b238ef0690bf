"""The built-in rewards against hand-checked cases: exact answers by the data's own rule, partial credit that
ranks near misses above far ones (and is 1.0 exactly where the exact reward is), format and length."""

from __future__ import annotations

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
