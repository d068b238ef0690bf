"""Errors meant for people: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ToolkitError(Exception):
    """A problem with the user's input (recipe, data, paths, export target), worded for the user."""


class RecipeError(ToolkitError):
    """A recipe that cannot be run as written."""


class DataError(ToolkitError):
    """A data file or row that cannot be used; the message names file and line."""


class ExportError(ToolkitError):
    """An export that cannot be made; the message names the blocking component."""


def nearest(name: str, valid: Iterable[str]) -> str | None:
    """The closest valid name to `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_key_message(key: str, valid: Iterable[str], where: str) -> str:
    """`unknown key 'lerning_rate' in train (did you mean 'learning_rate'?)`."""
    guess = nearest(key, valid)
    hint = f" (did you mean '{guess}'?)" if guess else ""
    return f"unknown key '{key}' in {where}{hint}"
