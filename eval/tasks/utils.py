"""Data loaders and scoring for the toolkit's own lm-eval tasks (the YAML files beside this one).

lm-eval imports this file by path (`!function utils.NAME` in a task's YAML), from the toolkit's command or from
lm-eval's own (`lm_eval --include_path eval/tasks`). The tasks are built on the repository's checkable data:
the held-out questions (`data/eval/heldout.jsonl`) and the held-out corpus (`data/corpus/valid.jsonl`), read
from the checkout this file belongs to, whatever the working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "data"


def _rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_heldout(**_: Any) -> Any:
    """The held-out checkable questions as lm-eval's `test` split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(DATA / "eval" / "heldout.jsonl"))})


CHOICES = 4


def load_heldout_choices(**_: Any) -> Any:
    """The held-out questions as multiple choice: the answer and three other answers of the same task family
    (distinct, drawn with a fixed seed), in an order fixed by the seed too; `gold` is the answer's index."""
    import random

    import datasets

    rows = _rows(DATA / "eval" / "heldout.jsonl")
    answers: dict[str, list[str]] = {}
    for row in rows:
        if row["answer"] not in answers.setdefault(row["task"], []):
            answers[row["task"]].append(row["answer"])
    rng = random.Random(0)
    docs = []
    for row in rows:
        others = [a for a in answers[row["task"]] if a != row["answer"]]
        choices = [row["answer"], *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        docs.append({**row, "choices": choices, "gold": choices.index(row["answer"])})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_corpus(**_: Any) -> Any:
    """The held-out corpus (one `text` per document) as lm-eval's `test` split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(DATA / "corpus" / "valid.jsonl"))})


def exact_answer(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the generation gives the answer by the rule that built the data (`toolkit.data.tasks.score`:
    first non-empty line, whitespace, case and trailing punctuation forgiven, JSON compared as objects)."""
    from toolkit.data.tasks import score

    return {"exact_match": float(score(results[0], doc["answer"]))}
