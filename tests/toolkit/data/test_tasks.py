"""Checkable tasks and the datasets shipped in data/.

Answers are checked against arithmetic and parsing written here, independently of `toolkit.data.tasks`.
"""

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from toolkit.data import tasks

DATA = Path(__file__).resolve().parents[3] / "data"

# The unit factors, restated here so a wrong table in the module cannot check itself.
FACTORS = {
    ("centimetres", "metres"): 100,
    ("metres", "kilometres"): 1000,
    ("grams", "kilograms"): 1000,
    ("millilitres", "litres"): 1000,
    ("millimetres", "centimetres"): 10,
    ("cents", "dollars"): 100,
}


def problem(task: str, prompt: str) -> str:
    """The problem a prompt asks, whatever its wording."""
    return tasks.problem_key(task, tasks.parse_prompt(task, prompt))


def problems(rows: list[dict]) -> list[str]:
    """The problems of rows `{"task", "prompt", ...}`, as make_examples writes them."""
    return [problem(r["task"], r["prompt"]) for r in rows]


def expected_answer(task: str, prompt: str) -> str:
    """The answer to `prompt`, computed from the prompt text alone."""
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    if task == "addition":
        return str(sum(numbers))
    if task == "successor":
        return str(numbers[0] + 1)
    if task == "comparison":
        return str(max(numbers))
    if task == "unit_conversion":
        match = re.match(r"How many (\w+) are in \d+ (\w+)\?$", prompt) or re.match(
            r"Convert \d+ (\w+) to (\w+)\.$", prompt
        )
        small, big = match.groups() if prompt.startswith("How") else match.groups()[::-1]
        return str(numbers[0] * FACTORS[(small, big)])
    if task == "copy":
        return prompt.split(": ", 1)[1]
    if task == "tool_call":
        tool = re.search(r"the (\w+) tool", prompt).group(1)
        flight = re.search(r"(?:from|origin) (.+?) (?:to|and destination) (.+?)\.$", prompt)
        if flight:
            return json.dumps({"tool": tool, "origin": flight.group(1), "destination": flight.group(2)})
        return json.dumps({"tool": tool, "city": re.search(r"(?:for|city) (.+?)\.$", prompt).group(1)})
    raise AssertionError(f"no reference for task {task!r}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- generators -----------------------------------------------------------------------------------------


def test_examples_are_deterministic_per_seed():
    assert tasks.make_examples(120, seed=7) == tasks.make_examples(120, seed=7)
    assert tasks.make_examples(120, seed=7) != tasks.make_examples(120, seed=8)


def test_examples_are_balanced_distinct_and_well_formed():
    rows = tasks.make_examples(600, seed=3)
    assert Counter(r["task"] for r in rows) == {name: 100 for name in tasks.TASKS}
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert all(set(r) == {"task", "prompt", "answer"} and "\n" not in r["answer"] for r in rows)


def test_every_template_is_used():
    rows = tasks.make_examples(1200, seed=4)
    for name, task in tasks.TASKS.items():
        used = {
            p.pattern for p in task.patterns() for r in rows if r["task"] == name and p.match(r["prompt"])
        }
        assert len(used) == len(task.templates), name


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_answers_match_an_independent_computation(name):
    for row in tasks.make_examples(300, seed=11, tasks=[name]):
        assert row["answer"] == expected_answer(name, row["prompt"]), row


def test_task_subset_and_unknown_task():
    assert {r["task"] for r in tasks.make_examples(20, seed=0, tasks=["copy", "addition"])} == {
        "copy",
        "addition",
    }
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_examples(5, seed=0, tasks=["division"])


def test_train_and_heldout_never_share_a_problem():
    train = tasks.make_examples(3000, seed=1)
    heldout = tasks.make_examples(300, seed=1, split="heldout")  # same seed on purpose: the split decides
    assert set(problems(train)).isdisjoint(problems(heldout))
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in heldout)
    assert all(
        tasks.split_of(r["task"], tasks.parse_prompt(r["task"], r["prompt"])) == "heldout" for r in heldout
    )


def test_heldout_problems_are_about_one_in_ten():
    # Every problem of the smallest family, enumerated: the split is a partition with the documented share.
    slots = [
        {"qty": str(q), "big": big, "small": small} for (big, small) in tasks.UNITS for q in range(2, 100)
    ]
    share = sum(tasks.split_of("unit_conversion", s) == "heldout" for s in slots) / len(slots)
    assert 0.05 < share < 0.15


def test_parse_prompt_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="matches no template"):
        tasks.parse_prompt("addition", "What is the capital of France?")


# --- scoring --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("42", "42"),
        (" 42.\n", "42"),
        ("42\nWhat is 1 + 1?", "42"),  # only the first line counts
        ("\n\n42", "42"),
        ("Blue  River!", "blue river"),
        ('{"city": "Paris", "tool": "weather"}', '{"tool": "weather", "city": "Paris"}'),
        ('{"tool":"weather","city":"Paris"}\nmore', '{"tool": "weather", "city": "Paris"}'),
    ],
)
def test_score_accepts_right_answers(prediction, answer):
    assert tasks.score(prediction, answer)


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("43", "42"),
        ("The answer is 42", "42"),
        ("", "42"),
        ("4 2", "42"),
        ("blue", "blue river"),
        ("river blue", "blue river"),
        ('{"tool": "weather", "city": "Paris"', '{"tool": "weather", "city": "Paris"}'),
        ('{"tool": "weather", "city": "paris"}', '{"tool": "weather", "city": "Paris"}'),
        ('{"tool": "time", "city": "Paris"}', '{"tool": "weather", "city": "Paris"}'),
        ("weather Paris", '{"tool": "weather", "city": "Paris"}'),
    ],
)
def test_score_rejects_wrong_answers(prediction, answer):
    assert not tasks.score(prediction, answer)


def test_wrong_answers_are_rejected_and_deterministic():
    rows = tasks.make_examples(1200, seed=5)
    wrong = [tasks.wrong_answer(r, random.Random(i)) for i, r in enumerate(rows)]
    assert wrong == [tasks.wrong_answer(r, random.Random(i)) for i, r in enumerate(rows)]
    assert all(w and not tasks.score(w, r["answer"]) for w, r in zip(wrong, rows, strict=True))
    assert tasks.accuracy(wrong, [r["answer"] for r in rows]) == 0.0


def test_accuracy():
    assert tasks.accuracy(["42", "7", "x"], ["42", "8", "x"]) == pytest.approx(2 / 3)
    assert tasks.accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        tasks.accuracy(["1"], ["1", "2"])


def test_statements_state_the_answer():
    rng = random.Random(0)
    for row in tasks.make_examples(120, seed=9):
        sentence = tasks.statement(row, rng)
        assert row["answer"] in sentence and sentence.endswith(".")


# --- shipped datasets -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    names = ["sft/train", "sft/alpaca_sample", "sft/sharegpt_sample", "preference/train", "rl/prompts"]
    return {name: read_jsonl(DATA / f"{name}.jsonl") for name in names + ["eval/heldout"]}


def training_questions(shipped) -> list[tuple[str | None, str]]:
    """(task or None, prompt) for every question asked in a training file."""
    questions = [(r["task"], r["messages"][0]["content"]) for r in shipped["sft/train"]]
    questions += [
        (r["task"], r["prompt"][0]["content"]) for r in shipped["preference/train"] + shipped["rl/prompts"]
    ]
    questions += [(None, r["instruction"] + " " + r["input"]) for r in shipped["sft/alpaca_sample"]]
    questions += [
        (None, turn["value"]) for r in shipped["sft/sharegpt_sample"] for turn in r["conversations"]
    ]
    return questions


def test_shipped_rows_have_the_documented_fields(shipped):
    for row in shipped["sft/train"]:
        assert set(row) == {"messages", "task"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][1]["content"] == expected_answer(row["task"], row["messages"][0]["content"])
    for row in shipped["preference/train"]:
        assert set(row) == {"prompt", "chosen", "rejected", "task"}
        prompt, answer = (
            row["prompt"][0]["content"],
            expected_answer(row["task"], row["prompt"][0]["content"]),
        )
        assert [m["role"] for m in row["prompt"] + row["chosen"] + row["rejected"]] == [
            "user",
            "assistant",
            "assistant",
        ]
        assert tasks.score(row["chosen"][0]["content"], answer), prompt
        assert not tasks.score(row["rejected"][0]["content"], answer), prompt
    for row in shipped["rl/prompts"]:
        assert set(row) == {"prompt", "answer", "task"}
        assert row["answer"] == expected_answer(row["task"], row["prompt"][0]["content"])
    for row in shipped["eval/heldout"]:
        assert set(row) == {"task", "prompt", "answer"}
        assert row["answer"] == expected_answer(row["task"], row["prompt"])
    for row in shipped["sft/alpaca_sample"]:
        assert set(row) == {"instruction", "input", "output"}
    for row in shipped["sft/sharegpt_sample"]:
        assert {turn["from"] for turn in row["conversations"]} <= {"system", "human", "gpt"}
        assert row["conversations"][-1]["from"] == "gpt"


def test_shipped_sizes(shipped):
    sizes = {name: len(rows) for name, rows in shipped.items()}
    assert sizes == {
        "sft/train": 3000,
        "sft/alpaca_sample": 20,
        "sft/sharegpt_sample": 20,
        "preference/train": 1500,
        "rl/prompts": 1000,
        "eval/heldout": 300,
    }
    assert set(Counter(r["task"] for r in shipped["eval/heldout"]).values()) == {50}


def test_heldout_is_disjoint_from_every_training_file(shipped):
    heldout = shipped["eval/heldout"]
    questions = training_questions(shipped)
    asked = {prompt for _, prompt in questions}
    assert not [r["prompt"] for r in heldout if r["prompt"] in asked]
    # Not only the wording: no held-out problem is asked in training under another template either.
    trained = {problem(t, p) for t, p in questions if t}
    assert not [r["prompt"] for r in heldout if problem(r["task"], r["prompt"]) in trained]


def test_rl_prompts_are_problems_the_sft_set_does_not_hold(shipped):
    sft = {problem(r["task"], r["messages"][0]["content"]) for r in shipped["sft/train"]}
    rl = [problem(r["task"], r["prompt"][0]["content"]) for r in shipped["rl/prompts"]]
    assert sft.isdisjoint(rl)
    assert set(Counter(r["task"] for r in shipped["rl/prompts"]).values()) == {166, 167}


def test_make_examples_never_draws_an_excluded_problem():
    taken = set(problems(tasks.make_examples(600, seed=1)))
    rows = tasks.make_examples(600, seed=2, exclude=taken)
    assert taken.isdisjoint(problems(rows))
    assert len(rows) == 600
    # Without the exclusion the same seed draws some of them: the exclusion is what keeps them apart.
    assert not taken.isdisjoint(problems(tasks.make_examples(600, seed=2)))


def test_corpus_is_a_few_megabytes_of_documents_without_heldout_facts(shipped):
    train, valid = read_jsonl(DATA / "corpus" / "train.jsonl"), read_jsonl(DATA / "corpus" / "valid.jsonl")
    assert all(set(r) == {"text"} and r["text"].strip() for r in train + valid)
    texts = [r["text"] for r in train + valid]
    assert 2e6 < sum(len(t) for t in texts) < 5e6
    assert 0 < len(valid) < len(train) / 10
    assert not set(r["text"] for r in train) & set(r["text"] for r in valid)
    sentences = {s for t in texts for s in re.split(r"(?<=\.) ", t)}
    facts = [r["text"] for r in read_jsonl(DATA / "corpus" / "facts.jsonl")]
    assert 5e5 < sum(len(t) for t in facts) < 1.2e6
    sentences |= {s for t in facts for s in re.split(r"(?<=\.) ", t)}
    for row in shipped["eval/heldout"]:
        slots = tasks.parse_prompt(row["task"], row["prompt"])
        for state in tasks.TASKS[row["task"]].statements:
            assert state(slots, row["answer"]) not in sentences, row


def test_total_shipped_size_stays_small():
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 8e6


def test_markup_corpora_ask_no_heldout_problem():
    """tools.jsonl and perspectives.jsonl pair problems with answers: none of them may be a held-out one."""
    heldout = read_jsonl(DATA / "eval" / "heldout.jsonl")
    held = set(problems(heldout))
    found = 0
    for name, marker in (("tools", "<tool>"), ("perspectives", "<perspective>question</perspective> ")):
        rows = read_jsonl(DATA / "corpus" / f"{name}.jsonl")
        assert all(set(r) == {"text"} and marker in r["text"] for r in rows)
        for line in (line for r in rows for line in r["text"].splitlines()):
            prompt = line.split(marker)[-1 if name == "perspectives" else 0].strip()
            if name == "perspectives":
                prompt = prompt.rsplit(" ", 1)[0]  # the answer follows the question
            for task in tasks.TASKS:
                try:
                    slots = tasks.parse_prompt(task, prompt)
                except ValueError:
                    continue
                found += 1
                assert tasks.problem_key(task, slots) not in held, line
    assert found > 3000  # the lines were parsed, not skipped
