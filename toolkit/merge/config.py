"""A merge config: mergekit's YAML as it is, checked before anything is read or written.

mergekit's pydantic schema (`MergeConfiguration`) is the schema; what this adds is what it leaves unsaid:
keys it would silently ignore (pydantic drops unknown ones) are errors naming the nearest valid key, an
unknown method or parameter names the nearest registered one, and every input is a folder that exists (or a
Hub id). Inputs may also be the toolkit's own run folders and stage folders (their model), or, in a recipe,
earlier stages by name. `merge_method: dfs` (ours: toolkit/merge/dfs.py) is compiled into mergekit's
passthrough first, so mergekit runs every merge.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import ToolkitError, nearest, unknown_key_message


def read_config(path: str | Path) -> list[dict[str, Any]]:
    """The YAML documents in `path`: one merge config, or several (named intermediates, then the output:
    mergekit-multimerge's format). A missing or malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"merge config not found: {path}")
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as error:
        raise ToolkitError(f"{path}: not valid YAML: {error}") from None
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise ToolkitError(f"{path}: a merge config is a mapping (merge_method, models or slices, ...)")
    return documents


def _schema_keys(model: type) -> dict[str, Any]:
    """Field name (and alias) -> field info of a pydantic model."""
    keys = {}
    for name, info in model.model_fields.items():
        keys[name] = info
        if info.alias:
            keys[info.alias] = info
    return keys


def _nested_models(annotation: Any) -> list[type]:
    """The pydantic models a field's annotation holds (inside Optional, List, Dict, Union)."""
    from typing import get_args

    from pydantic import BaseModel

    found, stack = [], [annotation]
    while stack:
        current = stack.pop()
        if isinstance(current, type) and issubclass(current, BaseModel):
            found.append(current)
        stack.extend(get_args(current))
    return found


def unknown_keys(raw: Any, model: type, where: str) -> Iterator[str]:
    """Every key of `raw` (recursively) that the pydantic `model` does not have, as an error message.
    `parameters` mappings are the method's business (checked by `method_problems`)."""
    from mergekit.common import ModelReference

    if not isinstance(raw, dict) or model is ModelReference:
        return
    keys = _schema_keys(model)
    prefix = "" if where == "the merge config" else f"{where}."
    for key, value in raw.items():
        if key not in keys:
            yield unknown_key_message(str(key), keys, where)
            continue
        if key == "parameters":
            continue
        inner = [m for m in _nested_models(keys[key].annotation) if m is not ModelReference]
        if not inner:
            continue
        if isinstance(value, list):
            items = [(f"{prefix}{key}[{i}]", item) for i, item in enumerate(value)]
        elif key == "modules" and isinstance(value, dict):
            items = [(f"{prefix}{key}.{name}", item) for name, item in value.items()]
        else:
            items = [(f"{prefix}{key}", value)]
        for at, item in items:
            yield from unknown_keys(item, inner[0], at)


def parameter_settings(raw: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, parameters mapping) of every `parameters:` block in the config."""
    if isinstance(raw.get("parameters"), dict):
        yield "parameters", raw["parameters"]
    for i, entry in enumerate(raw.get("models") or []):
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            yield f"models[{i}].parameters", entry["parameters"]
    for i, out in enumerate(raw.get("slices") or []):
        if not isinstance(out, dict):
            continue
        if isinstance(out.get("parameters"), dict):
            yield f"slices[{i}].parameters", out["parameters"]
        for j, source in enumerate(out.get("sources") or []):
            if isinstance(source, dict) and isinstance(source.get("parameters"), dict):
                yield f"slices[{i}].sources[{j}].parameters", source["parameters"]


def method_names() -> dict[str, Any]:
    """mergekit's merge methods by name, and ours."""
    from mergekit.merge_methods import registered_methods

    from toolkit.merge.dfs import DFS

    return {**{m.spec.name: m for m in registered_methods()}, DFS: None}


def method_problems(raw: dict[str, Any]) -> Iterator[str]:
    """An unknown `merge_method`, or a parameter the method does not take."""
    from toolkit.merge.dfs import DFS, DFS_PARAMETERS

    methods = method_names()
    name = raw.get("merge_method")
    if name is None:
        yield "merge_method: missing (one of " + ", ".join(sorted(methods)) + ")"
        return
    if name not in methods:
        guess = nearest(str(name), methods)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        yield (
            f"merge_method: unknown method '{name}'{hint}; the methods (mergekit {mergekit_version()}'s, and dfs) are "
            + ", ".join(sorted(methods))
        )
        return
    valid = DFS_PARAMETERS if name == DFS else {p.name for p in methods[name].spec.parameters}
    for where, settings in parameter_settings(raw):
        for key in settings:
            if key not in valid:
                taken = ", ".join(sorted(valid)) or "no parameters"
                yield f"{unknown_key_message(str(key), valid, where)}; {name} takes {taken}"


def mergekit_version() -> str:
    from importlib.metadata import version

    return version("mergekit")


def references(raw: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any] | list[Any], Any]]:
    """(where, container, key) of every model reference in the config, so that it can be read or rewritten."""
    if "base_model" in raw:
        yield "base_model", raw, "base_model"
    source = raw.get("tokenizer_source")
    if source is not None and source not in ("union", "base"):
        yield "tokenizer_source", raw, "tokenizer_source"
    for i, entry in enumerate(raw.get("models") or []):
        if isinstance(entry, dict) and "model" in entry:
            yield f"models[{i}].model", entry, "model"
    for i, out in enumerate(raw.get("slices") or []):
        if not isinstance(out, dict):
            continue
        if "base_model" in out:
            yield f"slices[{i}].base_model", out, "base_model"
        for j, src in enumerate(out.get("sources") or []):
            if isinstance(src, dict) and "model" in src:
                yield f"slices[{i}].sources[{j}].model", src, "model"


def _missing(name: str) -> str | None:
    """Why `name` is neither a local folder nor a Hub id (None when it may be a Hub id)."""
    from toolkit.data.loading import local_path_problem  # imports `datasets`: only for names not found here

    return local_path_problem(name, folder=True)


def resolve_inputs(
    raw: dict[str, Any], resolve: Callable[[str, str], str] | None = None, base_dir: Path | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The config with every model reference made a path mergekit reads (a run or stage folder becomes its
    model folder; `resolve(name, where)` may map other names, e.g. a recipe's stage names), and the problems:
    a reference that is neither an existing folder nor a Hub id."""
    from toolkit.run_folder import model_folder_of

    raw = copy.deepcopy(raw)
    problems = []
    for where, container, key in references(raw):
        value = container[key]
        if not isinstance(value, str):
            problems.append(f"{where}: expected a model folder or Hub id, got {value!r}")
            continue
        name, plus, lora = value.partition("+")  # mergekit's "model+lora" syntax
        mapped = resolve(name, where) if resolve else None
        if mapped is None:
            local = Path(name) if base_dir is None or Path(name).is_absolute() else base_dir / name
            if local.exists():
                try:
                    mapped = str(model_folder_of(local)[0])
                except ToolkitError as error:
                    problems.append(f"{where}: {error}")
                    continue
            elif (problem := _missing(name)) is None:
                mapped = name  # a Hub id, read by mergekit (and the preflight) from the Hub
            else:
                problems.append(f"{where}: {name}: {problem} (nor a Hub id 'org/name')")
                continue
        container[key] = mapped + plus + lora
    return raw, problems


def check(raw: dict[str, Any]) -> list[str]:
    """Every problem of the config's text: unknown keys, an unknown method or parameter, a malformed dfs
    path. Inputs are checked by `resolve_inputs`."""
    from mergekit.config import MergeConfiguration

    from toolkit.merge.dfs import DFS, dfs_problems

    problems = list(unknown_keys(raw, MergeConfiguration, "the merge config"))
    problems += list(method_problems(raw))
    if raw.get("merge_method") == DFS and not problems:
        problems += dfs_problems(raw)
    return problems


def parse(raw: dict[str, Any], where: str = "merge config") -> Any:
    """mergekit's `MergeConfiguration` of a checked config whose inputs are resolved (a dfs config is
    compiled to passthrough first); mergekit's own validation errors are reported as ours."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from toolkit.merge.dfs import DFS, compile_dfs

    compiled = compile_dfs(raw) if raw.get("merge_method") == DFS else raw
    try:
        return MergeConfiguration.model_validate(compiled)
    except (ValidationError, RuntimeError, ValueError) as error:
        raise ToolkitError(f"{where}: {_pydantic_message(error)}") from None


def _pydantic_message(error: Exception) -> str:
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        lines.append(f"{location}: {item['msg']}")
    return "; ".join(lines)
