"""Reward functions for the RL stages (GRPO, RLOO), named in a recipe's `rewards:` section.

    rewards:
      - {builtin: exact_answer}                       # 1 when the answer checks (toolkit.data.tasks.score)
      - {builtin: format, weight: 0.25}               # 1 when the answer is one line and nothing else
      - {function: my_rewards:brevity, weight: 0.5}   # any importable function
      - {model: reward}                               # a reward model: an earlier `reward` stage, or a folder

A function is called the way TRL calls it: `fn(prompts=..., completions=..., completion_ids=..., **columns)`,
every dataset column (`answer`, `task`, ...) as a keyword argument holding one value per completion, and
returns one float (or None) per completion. A reward model (a score head with one label, as a `reward` stage
trains it) scores the prompt and completion as one conversation through its own tokenizer; TRL runs it. The weights go to TRL's `reward_weights`. Prefer weights that are
exact in binary (1, 0.5, 0.25, ...): TRL counts a group as having no reward variance (`frac_reward_zero_std`)
when the float32 std of its weighted sums is within 1e-8 of 0, and eight equal sums of 1 + 0.2 give a std of
1.3e-7, so with a weight of 0.2 no group ever counts and the measure reads 0% whatever happens.

Before any stage runs, every function is imported and called once on two real rows of the stage's data with a
dummy completion, so that an import error, a wrong signature or a wrong return is reported naming the function
(`preflight`), not discovered after a pretraining stage has run for an hour.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable
from typing import Any

from toolkit.data.tasks import normalise, score
from toolkit.errors import nearest
from toolkit.schema import Problems
from toolkit.stages import StageContext, resolve


def completion_text(completion: Any) -> str:
    """A completion's text, whether TRL passes it as a string or as a conversation (a list of messages)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def exact_answer(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion gives the row's `answer` by the rule that built the checkable tasks."""
    return [float(score(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def close_answer(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """Partial credit: how close the completion's first line is to the row's `answer`, 0.0 to 1.0, as
    difflib's similarity ratio of the normalised strings (1.0 exactly when `exact_answer` gives 1.0 for a plain
    answer). A group of answers that are all wrong, the usual case on hard prompts, still differs in how
    nearly right each is, so GRPO gets a signal where exact answers alone give every answer the same reward."""
    from difflib import SequenceMatcher

    rewards = []
    for completion, right in zip(completions, answer, strict=True):
        text = completion_text(completion)
        if score(text, right):
            rewards.append(1.0)
            continue
        first = next((line for line in text.splitlines() if line.strip()), "")
        rewards.append(SequenceMatcher(None, normalise(first), normalise(right)).ratio())
    return rewards


def answer_format(completions: list[Any], **_: Any) -> list[float]:
    """1.0 when the completion is one non-empty line without chat markup: an answer, not a conversation."""
    texts = [completion_text(c).strip() for c in completions]
    return [float(bool(t) and "\n" not in t and "<|" not in t) for t in texts]


LENGTH_LIMIT = 64  # characters: longer than any checkable answer in data/


def length(completions: list[Any], **_: Any) -> list[float]:
    """From 1.0 for an empty completion down to 0.0 at LENGTH_LIMIT characters and beyond: prefers brevity."""
    return [1.0 - min(len(completion_text(c)), LENGTH_LIMIT) / LENGTH_LIMIT for c in completions]


answer_format.__name__ = "format"
BUILTINS: dict[str, tuple[Callable[..., list[float]], tuple[str, ...]]] = {
    # name -> (function, dataset columns it needs)
    "exact_answer": (exact_answer, ("answer",)),
    "close_answer": (close_answer, ("answer",)),
    "format": (answer_format, ()),
    "length": (length, ()),
}
# Built-ins made per stage from its model and tokenizer, by a factory (model, tokenizer) -> function: the thought
# rewards read the thought tokens, which TRL's decoded `completions` no longer hold (it skips special tokens),
# from `completion_ids`; `thought_gain` scores the right answer with the policy itself (Quiet-STaR).
BOUND_BUILTINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "thought_answer": ("toolkit.train.thoughts:answer_reward", ("answer",)),
    "thought_format": ("toolkit.train.thoughts:format_reward", ()),
    "thought_gain": ("toolkit.train.thoughts:gain_reward", ("answer",)),
}
BUILTIN_NAMES = (*BUILTINS, *BOUND_BUILTINS)
REWARD_KEYS = {"builtin", "function", "model", "weight", "name"}


def builtin_columns(name: str) -> tuple[str, ...]:
    """The dataset columns a built-in reward reads."""
    return BUILTINS[name][1] if name in BUILTINS else BOUND_BUILTINS[name][1]


def parse_rewards(raw: Any, at: str, problems: Problems) -> list[dict[str, Any]]:
    """The `rewards:` section: a non-empty list of {builtin: NAME}, {function: "module:function"} or
    {model: STAGE|PATH}, each with an
    optional weight (default 1.0) and name. Entries keep their places (problems name `rewards[i]`)."""
    if not isinstance(raw, list) or not raw:
        problems.add(f"{at}: list the reward functions, e.g. [{{builtin: exact_answer}}]")
        return []
    return [_parse_reward(entry, f"{at}[{i}]", problems) for i, entry in enumerate(raw)]


def _entry_problem(entry: dict[str, Any], where: str) -> str | None:
    """What is wrong with what a reward entry names (None when it names one built-in or one function)."""
    kinds = [k for k in ("builtin", "function", "model") if k in entry]
    if len(kinds) != 1:
        return (
            f"{where}: give one of 'builtin' ({', '.join(BUILTIN_NAMES)}), 'function' (module:function) or "
            "'model' (a reward stage or folder)"
        )
    if "model" in entry and (not isinstance(entry["model"], str) or not entry["model"]):
        return f"{where}.model: give a stage name or a folder, got {entry['model']!r}"
    if "builtin" in entry and entry["builtin"] not in BUILTIN_NAMES:
        guess = nearest(str(entry["builtin"]), BUILTIN_NAMES)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        return f"{where}.builtin: unknown reward '{entry['builtin']}'{hint}; built-ins: {', '.join(BUILTIN_NAMES)}"
    if "function" in entry and (not isinstance(entry["function"], str) or ":" not in entry["function"]):
        return f"{where}.function: give 'module:function', got {entry['function']!r}"
    return None


def _parse_reward(entry: Any, where: str, problems: Problems) -> dict[str, Any]:
    entry = problems.mapping(entry, REWARD_KEYS, where)
    if problem := _entry_problem(entry, where):
        problems.add(problem)
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        problems.add(f"{where}.weight is {weight!r}; expected a number")
        weight = 1.0
    return {**entry, "weight": float(weight)}


def reward_function(
    entry: dict[str, Any], model: Any = None, tokenizer: Any = None
) -> Callable[..., list[float | None]]:
    """The callable an entry names, with the name TRL logs its reward under (`rewards/<name>/mean`); a bound
    built-in is made for `model` and `tokenizer`."""
    if "builtin" in entry:
        bound = BOUND_BUILTINS.get(entry["builtin"])
        fn = resolve(bound[0])(model, tokenizer) if bound else BUILTINS[entry["builtin"]][0]
        name = entry.get("name") or entry["builtin"]
    else:
        # A module beside the recipe run is found as `python -m` would find it: the working directory first.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        fn = resolve(entry["function"])
        name = entry.get("name") or entry["function"].rpartition(":")[2]
    if getattr(fn, "__name__", None) == name:
        return fn
    wrapped = functools.wraps(fn)(functools.partial(fn))
    wrapped.__name__ = name
    return wrapped


def config_values(ctx: StageContext, tokenizer: Any) -> dict[str, Any]:
    """TRL's `reward_weights`, from the section's weights; says first when `max_completion_length` is too
    short for some of the data's right answers."""
    if warning := truncation_warning(ctx.stage, tokenizer):
        from toolkit.train.runner import distributed_state

        if distributed_state().is_main_process:
            print(warning, flush=True)
    return {"reward_weights": [entry["weight"] for entry in ctx.stage.options or []]}


def truncation_warning(stage: Any, tokenizer: Any) -> str | None:
    """A warning when the stage's `max_completion_length` is shorter than some `answer` of its data takes in
    the model's tokens (end of turn included): such a completion is cut off before the answer ends, so an
    exact-answer reward can never score it right, and its group teaches nothing. None when all fit."""
    from toolkit.data.tokenizer import answer_tokens

    limit = stage.train.get("max_completion_length")
    if limit is None or tokenizer is None:
        return None
    answers, paths = [], []
    for entry in stage.data.get("sources") or []:
        rows, path = _source_rows(entry) or ([], "")
        found = [row["answer"] for row in rows if isinstance(row.get("answer"), str)]
        answers += found
        paths += [path] if found else []
    lengths = answer_tokens(tokenizer, answers)
    over = [n for n in lengths if n > limit]
    if not over:
        return None
    return (
        f"warning: stages.{stage.name}.train.max_completion_length={limit} is shorter than {len(over)} of the "
        f"{len(lengths)} answers in {', '.join(paths)} (the longest takes {max(over)} tokens with its end of "
        f"turn): those completions are cut off before the answer ends and can never be scored right; "
        f"max_completion_length: {max(over)} fits them all"
    )


def reward_model_path(value: str, run_dir: Any, recipe: Any = None) -> str:
    """A `model:` reward: an earlier stage of the run (its final/), else a folder or Hub id as given."""
    from pathlib import Path

    stages = [s.name for s in recipe.stages] if recipe is not None else []
    if value in stages or (run_dir is not None and (Path(run_dir) / value / "final").is_dir()):
        return str(Path(run_dir) / value / "final")
    return value


def trainer_rewards(ctx: StageContext, model: Any, tokenizer: Any, peft_config: Any) -> dict[str, Any]:
    """TRL's `reward_funcs`, and `reward_processing_classes` when a reward model is among them: each model
    is loaded here (safetensors only, through the registered Auto classes, so our architectures load) with
    its own tokenizer, and logs under its entry's name (TRL names a model reward after its folder)."""
    from transformers import AutoTokenizer

    from toolkit.train.trainer_stage import load_pretrained

    funcs: list[Any] = []
    tokenizers: list[Any] = []
    for i, entry in enumerate(ctx.stage.options or []):
        if "model" not in entry:
            funcs.append(reward_function(entry, model, tokenizer))
            tokenizers.append(None)
            continue
        path = reward_model_path(entry["model"], ctx.run_folder.path, ctx.recipe)
        where = f"stages.{ctx.stage.name}.rewards[{i}].model"
        scorer = load_pretrained(path, {}, where, "sequence_classification").eval()
        scorer.config._name_or_path = entry.get("name") or entry["model"].rstrip("/").rpartition("/")[2]
        funcs.append(scorer)
        tokenizers.append(AutoTokenizer.from_pretrained(path))
    extras: dict[str, Any] = {"reward_funcs": funcs}
    if any(t is not None for t in tokenizers):
        extras["reward_processing_classes"] = tokenizers
    return extras


def _source_rows(entry: dict[str, Any], count: int | None = None) -> tuple[list[dict[str, Any]], str] | None:
    """The rows of one data source (all, or the first `count`), as read (before normalisation), and its path;
    None when it cannot be read (the data checks report why, with file and line)."""
    from toolkit.data.loading import DataSource, open_source

    try:
        source = DataSource.from_dict(dict(entry), where="")
        rows, _ = open_source(source)
        return [r.data for r in itertools.islice(rows(), count) if r.data is not None], source.path
    except Exception:
        return None


def _first_rows(stage: Any, count: int = 2) -> tuple[list[dict[str, Any]], str] | None:
    """The first rows of the stage's first data source and its path; None when there are none to read."""
    sources = stage.data.get("sources") or []
    found = _source_rows(sources[0], count) if sources else None
    return found if found and found[0] else None


def preflight(stage: Any, at: str, problems: Problems, recipe: Any = None) -> None:
    """Import every reward function and call it on two real rows with a dummy completion; check the data has
    what the method and the built-ins read."""
    found = _first_rows(stage)
    if found is None:
        return
    rows, path = found
    columns = sorted({key for row in rows for key in row})
    listed = ", ".join(f"`{c}`" for c in columns)
    if "prompt" not in columns:
        problems.add(f"{at}: {stage.method} needs a `prompt` column; {path} has {listed}")
        return
    for i, entry in enumerate(stage.options or []):
        where = f"{at}.rewards[{i}]"
        if _entry_problem(entry, where):  # reported when the section was parsed
            continue
        if "model" in entry:
            _model_problem(entry["model"], stage, where, problems, recipe)
            continue
        if "builtin" in entry:
            missing = [c for c in builtin_columns(entry["builtin"]) if c not in columns]
            if missing:
                problems.add(
                    f"{where}: {entry['builtin']} needs the column `{missing[0]}`; {path} has {listed}"
                )
                continue
            if entry["builtin"] in BOUND_BUILTINS:  # made from the stage's model; tested with the toolkit
                continue
        try:
            fn = reward_function(entry)
        except Exception as error:  # ImportError, AttributeError, errors raised at import
            problems.add(
                f"{where}.function: cannot import '{entry['function']}': {type(error).__name__}: {error}"
            )
            continue
        problem = _call_problem(fn, rows)
        if problem:
            problems.add(f"{where}: reward '{fn.__name__}' {problem}")


def _model_problem(value: str, stage: Any, where: str, problems: Problems, recipe: Any) -> None:
    """A model reward names an earlier `reward` stage, or a folder holding a model."""
    from pathlib import Path

    from toolkit.stages import find_earlier

    ref = find_earlier(recipe, stage, value)
    if ref.later:
        problems.add(f"{where}.model: stage '{value}' runs after '{stage.name}'; a reward model comes first")
    elif ref.stage is not None and ref.stage.method != "reward":
        problems.add(
            f"{where}.model: stage '{value}' is a {ref.stage.method} stage; a reward model comes from a "
            "`method: reward` stage"
        )
    if ref.is_stage:
        return
    folder = Path(value)
    if folder.exists() and not (folder / "config.json").exists():
        problems.add(f"{where}.model: {value} holds no config.json; expected a reward model's folder")
    elif not folder.exists() and (value.startswith((".", "/")) or value.count("/") > 1):
        problems.add(
            f"{where}.model: {value} does not exist (a stage name of this recipe, a folder, or a Hub id)"
        )


def _call_problem(fn: Callable[..., Any], rows: list[dict[str, Any]]) -> str | None:
    """Why `fn` fails TRL's calling convention on `rows` (None when it answers one number per completion)."""
    prompts = [row["prompt"] for row in rows]
    conversational = isinstance(prompts[0], list)
    dummy = [{"role": "assistant", "content": "42"}] if conversational else "42"
    extra = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    try:
        result = fn(
            prompts=prompts, completions=[dummy] * len(rows), completion_ids=[[0]] * len(rows), **extra
        )
    except Exception as error:
        return f"raised {type(error).__name__}: {error} (called as TRL calls it: prompts, completions, completion_ids, {', '.join(extra)})"
    if not isinstance(result, (list, tuple)) or len(result) != len(rows):
        return f"returned {type(result).__name__} {result!r:.60}; expected a list of {len(rows)} numbers, one per completion"
    bad = [v for v in result if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
    if bad:
        return f"returned {bad[0]!r} for a completion; expected a number (or None)"
    return None
