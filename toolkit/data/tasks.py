"""Checkable tasks: small question families whose answers can be verified exactly.

They give the toolkit something a tiny model (a few million parameters) can measurably learn in a couple of
CPU minutes, so every stage (pretrain, SFT, DPO, RL, eval) has a number that moves: accuracy on questions
like "What is 17 + 25?" -> "42" or "Call the weather tool for Paris." ->
`{"tool": "weather", "city": "Paris"}`.

Each family is data: a few prompt templates (so a model cannot get by on one phrasing), a sampler for the
template slots, a solver, a way to be plausibly wrong (for preference pairs) and plain-English statements of
the fact (for the pretraining corpus).

Train and held-out questions never share a problem. A problem is a family plus its slot values, whatever the
phrasing; a stable hash of it puts every problem in exactly one split (`split_of`), and `make_examples` only
draws problems from the split it is asked for. So held-out accuracy measures answers the model never saw in
any training file, for any seed: train with `make_examples(n, seed)`, evaluate on
`make_examples(n, seed, split="heldout")` or the shipped `data/eval/heldout.jsonl`.
"""

from __future__ import annotations

import json
import random
import re
import string
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass

Slots = dict[str, str]

# One problem in ten is held out: enough held-out problems in the smallest family (unit conversion, 588
# problems) for a balanced eval set, while leaving nine tenths of every family to train on.
HELDOUT_ONE_IN = 10


@dataclass(frozen=True)
class Task:
    """One family of questions. Templates are `str.format` strings whose fields are the slots."""

    name: str
    templates: tuple[str, ...]
    sample: Callable[[random.Random], Slots]
    solve: Callable[[Slots], str]
    corrupt: Callable[[Slots, str, random.Random], str]  # a plausible wrong answer; may equal the right one
    statements: tuple[Callable[[Slots, str], str], ...]  # the fact as a sentence, for the corpus
    # Slots whose order does not matter: 17 + 25 is the same problem as 25 + 17 (and "25 is larger than 17"
    # states both comparisons), so they must fall in the same split.
    unordered: tuple[str, ...] = ()

    def patterns(self) -> list[re.Pattern[str]]:
        """The templates as anchored regexes, so a prompt can be read back into its slots."""
        patterns = []
        for template in self.templates:
            parts = []
            for literal, field, _, _ in string.Formatter().parse(template):
                parts.append(re.escape(literal))
                if field is not None:
                    parts.append(f"(?P<{field}>.+?)")
            patterns.append(re.compile("^" + "".join(parts) + "$"))
        return patterns


def _near_number(value: int, rng: random.Random, steps: tuple[int, ...] = (1, -1, 10, -10)) -> str:
    # Off by one or by ten: the mistakes a model that half-learned carrying makes.
    return str(abs(value + rng.choice(steps)))


# --- addition -------------------------------------------------------------------------------------------


def _addition_sample(rng: random.Random) -> Slots:
    return {"a": str(rng.randint(10, 99)), "b": str(rng.randint(10, 99))}


ADDITION = Task(
    name="addition",
    templates=("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    sample=_addition_sample,
    solve=lambda s: str(int(s["a"]) + int(s["b"])),
    corrupt=lambda s, answer, rng: _near_number(int(answer), rng),
    statements=(lambda s, a: f"{s['a']} plus {s['b']} is {a}.", lambda s, a: f"{s['a']} + {s['b']} = {a}."),
    unordered=("a", "b"),
)

# --- successor ------------------------------------------------------------------------------------------

SUCCESSOR = Task(
    name="successor",
    templates=(
        "What number comes after {n}?",
        "What is the next number after {n}?",
        "Count up by one from {n}.",
    ),
    sample=lambda rng: {"n": str(rng.randint(0, 998))},
    solve=lambda s: str(int(s["n"]) + 1),
    corrupt=lambda s, answer, rng: rng.choice([s["n"], str(int(s["n"]) + 2), _near_number(int(answer), rng)]),
    statements=(lambda s, a: f"After {s['n']} comes {a}.", lambda s, a: f"The number after {s['n']} is {a}."),
)

# --- comparison -----------------------------------------------------------------------------------------


def _comparison_sample(rng: random.Random) -> Slots:
    a, b = rng.sample(range(1, 100), 2)  # distinct, so there is always one right answer
    return {"a": str(a), "b": str(b)}


def _smaller(s: Slots) -> str:
    return min(s["a"], s["b"], key=int)


COMPARISON = Task(
    name="comparison",
    templates=(
        "Which is larger, {a} or {b}?",
        "Which number is bigger: {a} or {b}?",
        "Pick the larger number: {a}, {b}.",
    ),
    sample=_comparison_sample,
    solve=lambda s: max(s["a"], s["b"], key=int),
    corrupt=lambda s, answer, rng: _smaller(s),
    statements=(
        lambda s, a: f"{a} is larger than {_smaller(s)}.",
        lambda s, a: f"Between {s['a']} and {s['b']}, the larger is {a}.",
    ),
    unordered=("a", "b"),
)

# --- unit conversion ------------------------------------------------------------------------------------

# Only factors that are powers of ten: the answer is the quantity followed by zeros, a pattern a tiny model
# can learn digit by digit (a factor of 60 or 24 would need multiplication).
UNITS = {
    ("metres", "centimetres"): 100,
    ("kilometres", "metres"): 1000,
    ("kilograms", "grams"): 1000,
    ("litres", "millilitres"): 1000,
    ("centimetres", "millimetres"): 10,
    ("dollars", "cents"): 100,
}


def _units_sample(rng: random.Random) -> Slots:
    big, small = rng.choice(sorted(UNITS))
    return {"qty": str(rng.randint(2, 99)), "big": big, "small": small}  # from 2: the units are plural


def _units_solve(s: Slots) -> str:
    return str(int(s["qty"]) * UNITS[(s["big"], s["small"])])


UNIT_CONVERSION = Task(
    name="unit_conversion",
    templates=("How many {small} are in {qty} {big}?", "Convert {qty} {big} to {small}."),
    sample=_units_sample,
    solve=_units_solve,
    # A zero too many or too few: the typical slip with powers of ten.
    corrupt=lambda s, answer, rng: rng.choice([answer + "0", answer[:-1]]),
    statements=(
        lambda s, a: f"There are {a} {s['small']} in {s['qty']} {s['big']}.",
        lambda s, a: f"{s['qty']} {s['big']} is {a} {s['small']}.",
    ),
)

# --- copy -----------------------------------------------------------------------------------------------

WORDS = (
    "red blue green black white yellow orange purple silver golden small big quiet loud quick slow "
    "warm cold bright dark river mountain forest garden window table apple lemon bread coffee paper "
    "pencil letter bottle candle basket rabbit horse tiger eagle whale spider cloud storm rain snow "
    "summer winter morning evening bridge castle village market island harbour engine rocket piano "
    "violin drum song story dream"
).split()


def _copy_sample(rng: random.Random) -> Slots:
    return {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3)))}


def _copy_corrupt(s: Slots, answer: str, rng: random.Random) -> str:
    words = answer.split()
    choice = rng.randrange(3)
    if choice == 0:
        return " ".join(words[:-1])  # stops one word early
    if choice == 1:
        return " ".join(words[::-1])  # right words, wrong order (may equal the answer for "red red")
    index = rng.randrange(len(words))
    words[index] = rng.choice([w for w in WORDS if w != words[index]])
    return " ".join(words)


COPY = Task(
    name="copy",
    templates=("Repeat after me: {text}", "Say exactly this: {text}", "Echo the words: {text}"),
    sample=_copy_sample,
    solve=lambda s: s["text"],
    corrupt=_copy_corrupt,
    statements=(lambda s, a: f'Asked to repeat "{s["text"]}", you say: {a}.',),
)

# --- tool call ------------------------------------------------------------------------------------------

CITIES = (
    "Amsterdam Athens Atlanta Auckland Bangkok Beijing Berlin Bogota Boston Brussels Cairo Chicago "
    "Copenhagen Dallas Delhi Denver Dhaka Dubai Dublin Geneva Hanoi Havana Helsinki Houston Istanbul "
    "Jakarta Lagos Lima Lisbon London Madrid Manila Miami Milan Montreal Moscow Mumbai Munich Nairobi "
    "Naples Osaka Oslo Paris Perth Phoenix Prague Quito Rome Santiago Seattle Seoul Shanghai Stockholm "
    "Sydney Tokyo Toronto Vancouver Vienna Warsaw Zurich"
).split() + [
    "New York",
    "Los Angeles",
    "San Francisco",
    "Buenos Aires",
    "Cape Town",
    "Mexico City",
    "Hong Kong",
]

# tool -> the argument names it takes, in the order the JSON lists them.
TOOLS = {"weather": ("city",), "time": ("city",), "flights": ("origin", "destination")}


def _tool_sample(rng: random.Random) -> Slots:
    tool = rng.choice(sorted(TOOLS))
    cities = rng.sample(CITIES, len(TOOLS[tool]))
    return {"tool": tool, **dict(zip(TOOLS[tool], cities, strict=True))}


def _tool_call(tool: str, **arguments: str) -> str:
    # json.dumps' default separators give the one canonical spelling the model is trained on.
    return json.dumps({"tool": tool, **arguments})


def _tool_solve(s: Slots) -> str:
    return _tool_call(s["tool"], **{name: s[name] for name in TOOLS[s["tool"]]})


def _tool_corrupt(s: Slots, answer: str, rng: random.Random) -> str:
    choice = rng.randrange(3)
    if choice == 0:
        return answer[:-1]  # unclosed object: not valid JSON
    if choice == 1:
        other = rng.choice(
            [t for t in TOOLS if t != s["tool"] and TOOLS[t] == TOOLS[s["tool"]]] or [s["tool"]]
        )
        if other != s["tool"]:
            return _tool_call(other, **{name: s[name] for name in TOOLS[other]})
    # a different city in the first argument
    first = TOOLS[s["tool"]][0]
    wrong = {name: s[name] for name in TOOLS[s["tool"]]}
    wrong[first] = rng.choice([c for c in CITIES if c not in wrong.values()])
    return _tool_call(s["tool"], **wrong)


def _tool_statement(s: Slots, answer: str) -> str:
    if s["tool"] == "flights":
        return f"To find flights from {s['origin']} to {s['destination']}, the call is {answer}."
    return f"To get the {s['tool']} in {s['city']}, the call is {answer}."


TOOL_CALL = Task(
    name="tool_call",
    templates=(
        "Call the {tool} tool for {city}.",
        "Use the {tool} tool with city {city}.",
        "Call the {tool} tool from {origin} to {destination}.",
        "Use the {tool} tool with origin {origin} and destination {destination}.",
    ),
    sample=_tool_sample,
    solve=_tool_solve,
    corrupt=_tool_corrupt,
    statements=(_tool_statement,),
)

TASKS: dict[str, Task] = {
    task.name: task for task in (ADDITION, SUCCESSOR, COMPARISON, UNIT_CONVERSION, COPY, TOOL_CALL)
}


# --- problems and splits --------------------------------------------------------------------------------


def _templates_for(task: Task, slots: Slots) -> list[str]:
    # Tool templates name their arguments; only those whose fields match the sampled tool fit.
    return [t for t in task.templates if {f for _, f, _, _ in string.Formatter().parse(t) if f} == set(slots)]


def parse_prompt(task: str, prompt: str) -> Slots:
    """Read a prompt back into its slots (the inverse of filling a template); ValueError if none fits."""
    for pattern in TASKS[task].patterns():
        match = pattern.match(prompt)
        if match:
            return match.groupdict()
    raise ValueError(f"prompt {prompt!r} matches no template of task {task!r}")


def problem_key(task: str, slots: Slots) -> str:
    """The problem independent of phrasing: family plus slot values, unordered slots sorted."""
    unordered = TASKS[task].unordered
    canonical = dict(slots) | dict(zip(unordered, sorted(slots[name] for name in unordered), strict=True))
    return task + "|" + "|".join(f"{k}={canonical[k]}" for k in sorted(canonical))


def split_of(task: str, slots: Slots) -> str:
    """'heldout' or 'train'. crc32, not hash(): stable across processes and Python versions."""
    return "heldout" if zlib.crc32(problem_key(task, slots).encode()) % HELDOUT_ONE_IN == 0 else "train"


def make_examples(
    n: int,
    seed: int,
    tasks: list[str] | None = None,
    split: str = "train",
    exclude: Collection[str] = (),
) -> list[dict]:
    """`n` rows `{"task", "prompt", "answer"}`, distinct prompts, balanced across `tasks` (default: all).

    Deterministic for a given (n, seed, tasks, split, exclude). Only problems of `split` ('train' or
    'heldout') are drawn, so rows from the two splits never share a problem, whatever the seeds; problems
    whose `problem_key` is in `exclude` are never drawn (e.g. an RL set apart from the SFT set's problems).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    for i in range(n):
        name = names[i % len(names)]
        task = TASKS[name]
        for _ in range(10_000):  # rejection sampling; the bound only trips when a family is exhausted
            slots = task.sample(rng)
            prompt = rng.choice(_templates_for(task, slots)).format(**slots)
            if (
                prompt not in seen
                and split_of(name, slots) == split
                and problem_key(name, slots) not in exclude
            ):
                break
        else:
            raise ValueError(f"task {name!r} has run out of distinct {split} prompts after {i} rows")
        seen.add(prompt)
        rows.append({"task": name, "prompt": prompt, "answer": task.solve(slots)})
    rng.shuffle(rows)
    return rows


# --- scoring --------------------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    # A model's answer may run on after the first line (another turn, an explanation): judge only the line.
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalise(text: str) -> str:
    """First non-empty line, whitespace collapsed, case folded, trailing . ! ? , ; : removed."""
    return " ".join(_first_line(text).split()).casefold().rstrip(".!?,;: ")


def score(prediction: str, answer: str) -> bool:
    """True when `prediction` gives `answer`.

    The rule: only the first non-empty line of the prediction counts. If the answer is a JSON object (tool
    calls), that line must parse as JSON and equal it as an object: key order and spacing are free, values
    are compared exactly, case included. Otherwise both sides are normalised (`normalise`: whitespace
    collapsed, case folded, trailing sentence punctuation dropped) and must be equal, so "42." and " 42"
    match "42" but "The answer is 42" does not.
    """
    if answer.lstrip().startswith("{"):
        try:
            return json.loads(_first_line(prediction)) == json.loads(answer)
        except json.JSONDecodeError:
            return False
    return normalise(prediction) == normalise(answer)


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions that `score` accepts; 0.0 for no predictions."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(score(p, a) for p, a in zip(predictions, answers, strict=True)) / len(answers)


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible answer to `row` that `score` rejects: off by one, the other choice, malformed JSON, ..."""
    task = TASKS[row["task"]]
    slots = parse_prompt(row["task"], row["prompt"])
    for _ in range(100):
        candidate = task.corrupt(slots, row["answer"], rng)
        if candidate and not score(candidate, row["answer"]):
            return candidate
    raise ValueError(f"could not make a wrong answer for {row['prompt']!r}")


def statement(row: dict, rng: random.Random) -> str:
    """The row's fact as a plain-English sentence, e.g. "17 plus 25 is 42." (for pretraining text)."""
    task = TASKS[row["task"]]
    return rng.choice(task.statements)(parse_prompt(row["task"], row["prompt"]), row["answer"])


def score_answers(rows: list[dict], predictions: list[str], samples: int = 5) -> dict:
    """Overall and per-task exact-match accuracy of `predictions` for rows `{"task", "prompt", "answer"}`."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, prediction in zip(rows, predictions, strict=True):
        hits[row.get("task", "all")].append(score(prediction, row["answer"]))
    every = [h for task in hits.values() for h in task]
    return {
        "accuracy": sum(every) / max(len(every), 1),
        "n": len(every),
        "per_task": {task: sum(h) / len(h) for task, h in sorted(hits.items())},
        "samples": [
            {"prompt": r["prompt"], "answer": r["answer"], "prediction": p}
            for r, p in zip(rows[:samples], predictions[:samples], strict=True)
        ],
    }
