"""Each input format against hand-written canonical rows, and the per-row checks against hand-written problems."""

import pytest

from toolkit.data.formats import FORMATS, KINDS, detect_format, formats_for, to_canonical


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


NORMALISED = [
    ("text", {"text": "Once upon a time", "source": "x"}, {"text": "Once upon a time"}),
    (
        "alpaca",
        {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
        {"messages": [user("Add the numbers.\n\n2 + 3"), assistant("5")]},
    ),
    (
        "alpaca",
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
        {"messages": [system("Be brief."), user("Say hi."), assistant("Hi!")]},
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
                {"from": "user", "value": "And 3+3?"},
                {"from": "assistant", "value": "6"},
            ]
        },
        {"messages": [system("Be brief."), user("2+2?"), assistant("4"), user("And 3+3?"), assistant("6")]},
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": "hi", "name": "ann"}, assistant("hello")], "id": 7},
        {"messages": [user("hi"), assistant("hello")]},
    ),
    (
        "preference",
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
    ),
    (
        "preference",
        {"prompt": [system("Be brief."), user("2+2?")], "chosen": [assistant("4")], "rejected": "5"},
        {
            "prompt": [system("Be brief."), user("2+2?")],
            "chosen": [assistant("4")],
            "rejected": [assistant("5")],
        },
    ),
    (
        "unpaired",
        {"prompt": "2+2?", "completion": "5", "label": False, "task": "addition"},
        {"prompt": [user("2+2?")], "completion": [assistant("5")], "label": False},
    ),
    (
        "prompt",
        {"prompt": "What is 6*7?", "answer": "42", "task": "arith"},
        {"prompt": [user("What is 6*7?")], "answer": "42", "task": "arith"},
    ),
    (
        "prompt",
        {"prompt": [system("Think."), user("6*7?")], "answer": 42},
        {"prompt": [system("Think."), user("6*7?")], "answer": 42},
    ),
]


@pytest.mark.parametrize(("fmt", "raw", "expected"), NORMALISED)
def test_each_format_becomes_its_canonical_row(fmt, raw, expected):
    row, problems = to_canonical(raw, fmt)
    assert problems == []
    assert row == expected
    assert detect_format(raw) == fmt


def test_every_kind_is_fed_and_conversations_do_not_feed_text():
    assert {kind: formats_for(kind) for kind in KINDS} == {
        "text": ["text"],
        "messages": ["sharegpt", "messages", "alpaca"],
        "preference": ["preference"],
        "unpaired": ["unpaired"],
        "prompt": ["prompt"],
    }


def test_preference_is_detected_before_prompt():
    assert detect_format(["prompt", "chosen", "rejected"]) == "preference"
    assert detect_format(["question", "answer"]) is None


PROBLEMS = [
    ("text", {"text": ""}, ["'text' is empty"]),
    ("text", {"body": "x"}, ["missing 'text'"]),
    ("text", {"text": ["a"]}, ["'text' is a list; expected a string"]),
    (
        "alpaca",
        {"instruction": "Do it", "input": 3},
        ["'input' is a number; expected a string", "missing 'output'"],
    ),
    (
        "messages",
        {"messages": "hi"},
        ["'messages' is a string; expected a list of {role, content} objects"],
    ),
    ("messages", {"messages": []}, ["'messages' is an empty list"]),
    (
        "messages",
        {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant"}]},
        [
            "messages[0].role is 'usr'; expected one of system, user, assistant (did you mean 'user'?)",
            "messages[1] has no 'content'",
        ],
    ),
    (
        "messages",
        {"messages": [user("hi"), assistant("hello"), user("bye")]},
        ["'messages' ends with a user message; SFT needs the assistant's answer last"],
    ),
    (
        "messages",
        {"messages": [user("hi"), system("late"), assistant("hello")]},
        [
            "messages[1] is a system message after the user message; expected assistant "
            "(a system message only comes first, then user and assistant alternate)"
        ],
    ),
    (
        "messages",
        {"messages": [assistant("hello")]},
        [
            "messages[0] is an assistant message first; expected user "
            "(a system message only comes first, then user and assistant alternate)"
        ],
    ),
    ("messages", {"messages": [user("hi"), assistant(" ")]}, ["messages[1].content is empty"]),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
        ["conversations[1].from is 'bot'; expected one of system, human, user, gpt, assistant"],
    ),
    (
        "preference",
        {"prompt": "2+2?", "chosen": "4", "rejected": "4"},
        ["'chosen' and 'rejected' are the same; a preference pair needs two different answers"],
    ),
    (
        "preference",
        {"prompt": [user("2+2?"), assistant("4")], "chosen": [user("4")], "rejected": "5"},
        [
            "'prompt' ends with an assistant message; a prompt ends with the user",
            "chosen[0] is a user message; 'chosen' holds the assistant's answer only",
        ],
    ),
    (
        "prompt",
        {"prompt": [system("Think.")]},
        ["'prompt' holds only a system message; expected a user message after it"],
    ),
    ("prompt", {"answer": "4"}, ["missing 'prompt'"]),
    (
        "unpaired",
        {"prompt": "2+2?", "completion": "4", "label": "yes"},
        ["'label' is a string; expected true (a good answer) or false (a bad one)"],
    ),
    (
        "unpaired",
        {"prompt": "2+2?", "completion": [user("4")], "label": True},
        ["completion[0] is a user message; 'completion' holds the assistant's answer only"],
    ),
    ("unpaired", {"prompt": "2+2?", "completion": "4"}, ["missing 'label'"]),
]


@pytest.mark.parametrize(("fmt", "raw", "expected"), PROBLEMS)
def test_bad_rows_say_what_is_wrong(fmt, raw, expected):
    _, problems = to_canonical(raw, fmt)
    assert problems == expected


def test_formats_table_is_consistent():
    for name, fmt in FORMATS.items():
        assert fmt.kind in KINDS, name
        assert fmt.signature, name
