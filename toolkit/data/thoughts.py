"""Thought tokens: the format, reasoning traces for the checkable tasks, and reading a thought back.

An answer with a thought reads

    [thinking]<step>ones 7 + 5 = 12, carry 1</step><step>tens 1 + 2 + 1 = 4</step><falsify>42 - 25 = 17</falsify>[/endthinking]42

Two outer tokens open and close the thought; inside it, ten strategies each open with their token and close
with the matching `</name>` tag (plain text, not a token). The twelve tokens are added to a tokenizer as
special tokens (`model.add_special_tokens: thoughts`): never split or merged with neighbours, exported as
control tokens to GGUF, kept with their ids in every export.

`thought_problems` is the format's one validator (used by `toolkit data check`, the baking stage's format
accuracy and the format reward); `split_thought` reads a completion back into (thought, answer);
`make_traces` writes traces for `toolkit.data.tasks` rows, each trace computing the answer step by step and
checking it with one of the other strategies.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from toolkit.data.tasks import TASKS, parse_prompt

THOUGHT_START = "[thinking]"
THOUGHT_END = "[/endthinking]"
STRATEGIES = (
    "step",
    "mece",
    "falsify",
    "expert",
    "orthogonal",
    "doubt",
    "bayesian",
    "multidomain",
    "correct",
    "uncertain",
)
THOUGHT_TOKENS = (THOUGHT_START, THOUGHT_END, *(f"<{s}>" for s in STRATEGIES))
# `model.add_special_tokens: thoughts` in a recipe stands for the twelve tokens.
TOKEN_SET_NAMES = {"thoughts": THOUGHT_TOKENS}

_TAG = re.compile(r"\[thinking\]|\[/endthinking\]|</?([A-Za-z][A-Za-z_-]*)>")


def has_thought(text: str) -> bool:
    """Whether `text` uses the thought format at all (an outer token or a strategy tag)."""
    return THOUGHT_START in text or THOUGHT_END in text or any(f"<{s}>" in text for s in STRATEGIES)


def thought_problems(text: str) -> list[str]:
    """What is wrong with the thought format of one answer (empty when it is well formed): one thought at the
    start, strategies only inside it, each closed before the next opens, no unknown tags, an answer after it."""
    problems: list[str] = []
    stripped = text.lstrip()
    if not stripped.startswith(THOUGHT_START):
        problems.append(f"the answer does not start with {THOUGHT_START}")
    if stripped.count(THOUGHT_START) > 1:
        problems.append(
            f"{THOUGHT_START} appears {stripped.count(THOUGHT_START)} times; one thought per answer"
        )
    inside, open_tag, closed = False, None, False
    for match in _TAG.finditer(stripped):
        token, name = match.group(0), match.group(1)
        if token == THOUGHT_START:
            inside = True
        elif token == THOUGHT_END:
            if open_tag:
                problems.append(f"unclosed <{open_tag}> before {THOUGHT_END}")
                open_tag = None
            if not inside:
                problems.append(f"{THOUGHT_END} without {THOUGHT_START}")
            inside, closed = False, True
        elif name not in STRATEGIES:
            known = ", ".join(f"<{s}>" for s in STRATEGIES)
            problems.append(f"unknown tag {token} (strategies: {known})")
        elif not inside:
            problems.append(f"{token} outside the thought")
        elif token.startswith("</"):
            if open_tag != name:
                problems.append(f"{token} closes " + (f"<{open_tag}>" if open_tag else "nothing"))
            open_tag = None if open_tag == name else open_tag
        else:
            if open_tag:
                problems.append(f"unclosed <{open_tag}> before {token}")
            open_tag = name
    if inside:
        problems.append(
            f"unclosed {THOUGHT_START}: no {THOUGHT_END}" + (f" (and <{open_tag}> open)" if open_tag else "")
        )
    elif closed and not stripped.split(THOUGHT_END, 1)[1].strip():
        problems.append(f"no answer after {THOUGHT_END}")
    return problems


def is_well_formed(text: str) -> bool:
    return not thought_problems(text)


@dataclass(frozen=True)
class Thought:
    """A completion read back: the thought's text (between the outer tokens), the answer after it, and the
    strategies it used in order."""

    thought: str
    answer: str
    strategies: tuple[str, ...]


def split_thought(text: str) -> Thought:
    """(thought, answer) of a completion; a completion without a closed thought is all answer (a thought cut
    off by the length limit gives an empty answer)."""
    text = text.strip()
    if THOUGHT_START in text and THOUGHT_END in text:
        head, _, answer = text.partition(THOUGHT_END)
        thought = head.split(THOUGHT_START, 1)[-1]  # an end before any start: all of it before the end
    elif THOUGHT_START in text:
        thought, answer = text.split(THOUGHT_START, 1)[1], ""
    else:
        thought, answer = "", text
    used = tuple(
        m.group(1) for m in _TAG.finditer(thought) if m.group(1) in STRATEGIES and m.group(0)[1] != "/"
    )
    return Thought(thought.strip(), answer.strip(), used)


def with_thought(thought: str, answer: str) -> str:
    """An answer in the format: `[thinking]` thought `[/endthinking]` answer."""
    return f"{THOUGHT_START}{thought}{THOUGHT_END}{answer}"


EMPTY_THOUGHT = THOUGHT_START + THOUGHT_END  # the ablation: the same answer position with nothing thought
# New tokens a thought may take on top of an answer's token budget, when a model with thought tokens answers.
THOUGHT_BUDGET = 96


# --- with a tokenizer ------------------------------------------------------------------------------------


def has_thought_tokens(tokenizer: Any) -> bool:
    """Whether the tokenizer carries the outer thought tokens (a model baked with thoughts)."""
    vocab = tokenizer.get_vocab()
    return THOUGHT_START in vocab and THOUGHT_END in vocab


def decode_with_thoughts(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as text with the thought tokens kept and every other special token (end of turn, padding)
    dropped: `skip_special_tokens=True`, as TRL and most generation code decode, drops the thought tokens too."""
    from toolkit.data.tokenizer import end_of_turn_ids

    keep = {tokenizer.convert_tokens_to_ids(t) for t in THOUGHT_TOKENS}
    # End-of-turn tokens may be added tokens that are not in `all_special_ids` (the toolkit's ChatML ones).
    special = {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    drop = (set(tokenizer.all_special_ids) | special | set(end_of_turn_ids(tokenizer))) - keep
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)


def shown(text: str, show_thoughts: bool) -> str:
    """A completion as a user sees it: whole with `show_thoughts`, else only the answer after the thought."""
    return text.strip() if show_thoughts else split_thought(text).answer


def score_completions(
    rows: list[dict], completions: list[str], samples: int, show_thoughts: bool = False
) -> dict[str, Any]:
    """`score_answers` of the answers after the thoughts of a thought model's completions (whatever generated
    them: transformers, llama.cpp), the share of completions in the format, and with `show_thoughts` the whole
    completion beside each sample."""
    from toolkit.data.tasks import score_answers

    scored = score_answers(rows, [shown(c, False) for c in completions], samples)
    if show_thoughts:
        for sample, completion in zip(scored["samples"], completions, strict=False):
            sample["completion"] = completion
    return {**scored, "thought_format": sum(map(is_well_formed, completions)) / max(len(completions), 1)}


# --- traces for the checkable tasks ---------------------------------------------------------------------


def _tag(strategy: str, text: str) -> str:
    return f"<{strategy}>{text}</{strategy}>"


def _steps(task: str, s: dict[str, str], answer: str) -> list[str]:
    """The computation, as `<step>`s a small model can follow digit by digit."""
    if task == "addition":
        a, b = int(s["a"]), int(s["b"])
        ones = a % 10 + b % 10
        carry = ones // 10
        return [
            f"ones {a % 10} + {b % 10} = {ones}" + (f", carry {carry}" if carry else ""),
            f"tens {a // 10} + {b // 10}"
            + (f" + {carry}" if carry else "")
            + f" = {a // 10 + b // 10 + carry}",
        ]
    if task == "successor":
        return [f"{s['n']} + 1 = {answer}"]
    if task == "comparison":
        return [f"{s['a']} vs {s['b']}: {answer} is larger"]
    if task == "unit_conversion":
        factor = int(answer) // int(s["qty"])
        return [f"1 {s['big'].rstrip('s')} = {factor} {s['small']}", f"{s['qty']} x {factor} = {answer}"]
    if task == "copy":
        return [f"words: {', '.join(s['text'].split())}"]
    if task == "tool_call":
        arguments = ", ".join(f"{k} {v}" for k, v in s.items() if k != "tool")
        return [f"tool {s['tool']}, {arguments}"]
    raise ValueError(f"no trace for task {task!r}")


_DOMAINS = {
    "addition": "arithmetic",
    "successor": "counting",
    "comparison": "ordering",
    "unit_conversion": "measurement",
    "copy": "text",
    "tool_call": "api",
}


def _check(task: str, s: dict[str, str], answer: str) -> str:
    """A task-specific check of the answer (what `<falsify>` and `<orthogonal>` say)."""
    if task == "addition":
        return f"{answer} - {s['b']} = {s['a']}"
    if task == "successor":
        return f"{answer} - 1 = {s['n']}"
    if task == "comparison":
        other = s["b"] if answer == s["a"] else s["a"]
        return f"{other} < {answer}"
    if task == "unit_conversion":
        return f"{answer} / {int(answer) // int(s['qty'])} = {s['qty']}"
    if task == "copy":
        return f"{len(s['text'].split())} words in, {len(answer.split())} out"
    return "one json object, key tool first"


def _aside(strategy: str, task: str, s: dict[str, str], answer: str) -> str:
    """What one of the nine other strategies says about the answer."""
    short = answer if len(answer) < 24 else "the call"
    return {
        "mece": f"one answer, {short}, no other case",
        "falsify": _check(task, s, answer),
        "expert": f"{_DOMAINS[task]}: {short}",
        "orthogonal": f"check another way: {_check(task, s, answer)}",
        "doubt": f"is it {short}? yes",
        "bayesian": f"most likely {short}",
        "multidomain": f"{_DOMAINS[task]} and words agree: {short}",
        "correct": f"keep {short}",
        "uncertain": f"sure: {short}",
    }[strategy]


def make_trace(row: dict, rng: random.Random) -> str:
    """The answer of a task row `{"task", "prompt", "answer"}` with a thought: the computation as `<step>`s
    and one other strategy checking it."""
    task, answer = row["task"], row["answer"]
    slots = parse_prompt(task, row["prompt"]) if task in TASKS else {}
    parts = [_tag("step", text) for text in _steps(task, slots, answer)]
    aside = rng.choice(STRATEGIES[1:])
    parts.append(_tag(aside, _aside(aside, task, slots, answer)))
    return with_thought("".join(parts), answer)


def make_traces(rows: list[dict], seed: int) -> list[dict]:
    """`messages` rows whose answers carry thoughts, one per task row (every strategy appears when there are
    more than a few dozen rows)."""
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": make_trace(row, rng)},
            ],
            "task": row["task"],
            "answer": row["answer"],
        }
        for row in rows
    ]
