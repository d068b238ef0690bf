"""Validation of recipe sections against the dataclasses that are their schema (TRL/Trainer configs,
`peft.LoraConfig`, the toolkit's own stage options), collecting every problem instead of stopping at the
first, so that a recipe with three mistakes is fixed in one edit, not three runs.

Types are read from the dataclass annotations: a value is checked where the annotation says plainly what it
takes (bool, int, float, str, a list, a mapping, a Literal, an Enum, or unions of those); anything richer is
left to the dataclass itself when the stage runs. Written here because neither the dataclasses nor TRL check
types on construction: `max_steps: ten` would otherwise surface as a TypeError deep inside a training loop.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from toolkit.errors import RecipeError, nearest, unknown_key_message


class Problems:
    """The problems found in one recipe, each with its place; `raise_if_any` reports them all at once."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def mapping(self, section: Any, valid: Iterable[str], at: str) -> dict[str, Any]:
        """`section` as a dict with every unknown key reported (and dropped); {} when it is no mapping."""
        if section is None:
            return {}
        if not isinstance(section, dict):
            self.add(f"{at} must be a mapping, got {type(section).__name__}")
            return {}
        valid = set(valid)
        for key in section:
            if key not in valid:
                self.add(unknown_key_message(str(key), valid, at))
        return {k: v for k, v in section.items() if k in valid}

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise RecipeError(self.items[0])
        if self.items:
            lines = "\n".join(f"  {item}" for item in self.items)
            raise RecipeError(f"{len(self.items)} problems in {self.where}:\n{lines}")


def field_types(config_class: type) -> dict[str, Any]:
    """Init field name -> annotation of a dataclass (resolved; a field whose annotation cannot be read
    maps to Any, which accepts every value)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation naming something not importable here: no type checks then
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_class) if f.init}


def check_values(values: Mapping[str, Any], types_: Mapping[str, Any], at: str, problems: Problems) -> None:
    """Report every value in `values` that its field's annotation rules out."""
    for key, value in values.items():
        expected = type_problem(value, types_.get(key, Any))
        if expected:
            problems.add(f"{at}.{key} is {value!r}; expected {expected}")


def type_problem(value: Any, annotation: Any) -> str | None:
    """What `annotation` expects, when `value` is not of it; None when it is (or cannot be told)."""
    options = _options(annotation)
    if options is None:
        return None
    accepted = [option for option in options if _matches(value, option) is not False]
    if accepted:
        return _enum_problem(value, options)
    return " or ".join(dict.fromkeys(_describe(option) for option in options))


def _options(annotation: Any) -> list[Any] | None:
    """The alternatives of a union (or the annotation alone); None when it is too rich to check."""
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        parts = []
        for arg in typing.get_args(annotation):
            inner = _options(arg)
            if inner is None:
                return None
            parts += inner
        return parts
    return [annotation]


def _matches(value: Any, option: Any) -> bool | None:
    """True/False when `value` is/is not of `option`; None when `option` cannot be checked (accepted)."""
    if option is type(None):
        return value is None
    if option is bool:
        return isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if option is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if option is str:
        return isinstance(value, str)
    if isinstance(option, type) and issubclass(option, enum.Enum):
        return isinstance(value, option) or value in {m.value for m in option}
    origin = typing.get_origin(option)
    if origin is typing.Literal:
        return value in typing.get_args(option)
    if origin in (list, tuple) or option in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or option is dict:
        return isinstance(value, dict)
    return None


def _enum_problem(value: Any, options: list[Any]) -> str | None:
    """A str accepted by `Enum | str` must still be one of the Enum's values (TrainingArguments converts it
    when the stage runs, and fails there)."""
    enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
    if not enums or not isinstance(value, str):
        return None
    values = [m.value for e in enums for m in e if isinstance(m.value, str)]
    if value in values:
        return None
    guess = nearest(value, values)
    hint = f" (did you mean '{guess}'?)" if guess else ""
    return f"one of {', '.join(repr(v) for v in values[:12])}{', ...' if len(values) > 12 else ''}{hint}"


def _describe(option: Any) -> str:
    names = {
        type(None): "null",
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a string",
    }
    if option in names:
        return names[option]
    if isinstance(option, type) and issubclass(option, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in option)
    origin = typing.get_origin(option)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(option))
    if origin in (list, tuple) or option in (list, tuple):
        return "a list"
    if origin is dict or option is dict:
        return "a mapping"
    return getattr(option, "__name__", str(option))
