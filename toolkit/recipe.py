"""Recipes: YAML files that describe a run as a chain of stages, validated before anything runs.

A recipe is either one stage written at the top level (`method`, `model`, `data`, `train`, ...) or a list of
`stages`, each reading the previous stage's output. The keys of a stage's `train:` section are exactly the
fields of the TRL/Trainer config dataclass of its method (`SFTConfig`, `DPOConfig`, ...): those dataclasses are
the schema, so there is no second copy of their fields to drift. Every unknown key is an error that names the
key, where it is, and the nearest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import RecipeError, nearest, unknown_key_message
from toolkit.models import PRESETS
from toolkit.schema import Problems, check_values, field_types, type_problem


class _Loader(yaml.SafeLoader):
    """YAML with `1e-3` read as a float: YAML 1.1 wants `1.0e-3` and would hand the trainer a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse recipe YAML (safe: no Python objects)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


@dataclass(frozen=True)
class Method:
    """What a stage does: its trainer-config dataclass (None for stages that do not train) and data kind."""

    config_class: str | None  # "module:Class", imported only when the stage is validated or run
    data_kind: str | None  # canonical row kind of toolkit.data (text, messages, preference, prompt)
    defaults: dict[str, Any] = field(default_factory=dict)  # our defaults, under the user's keys


# Defaults that differ from TRL's: TRL assumes a GPU (bf16, activation checkpointing); the runner switches
# those on only where they help (see `toolkit.train.runner.device_defaults`).
METHODS: dict[str, Method] = {
    "tokenizer": Method(None, "text"),
    "pretrain": Method(
        "trl:SFTConfig",
        "text",
        # Concatenate documents and cut into full windows: no padding waste, as in classic LM pretraining.
        {"packing": True, "packing_strategy": "wrapped"},
    ),
    "sft": Method("trl:SFTConfig", "messages"),
    "dpo": Method("trl:DPOConfig", "preference"),
    # GGUF (+ Ollama Modelfile) of the previous stage, verified in llama.cpp; `eval.tasks` then asks the
    # GGUF itself, through llama.cpp and the chat template inside the file.
    "export": Method(None, None),
}

RECIPE_KEYS = {"name", "description", "output_dir", "seed", "stages"}
STAGE_KEYS = {"name", "method", "model", "tokenizer", "data", "train", "peft", "eval", "export"}
EXPORT_KEYS = {"quant", "verify", "system"}
MODEL_KEYS = {
    "preset",
    "path",
    "from",
    "config",
    "trust_remote_code",
    "dtype",
    "attn_implementation",
    "revision",
    "add_special_tokens",
    "pad_vocab_to_multiple_of",
}
TOKENIZER_STAGE_KEYS = {"vocab_size", "min_frequency", "model_max_length", "extra_special_tokens"}
DATA_KEYS = {"sources", "eval_sources", "eval_fraction"}
EVAL_KEYS = {"tasks", "perplexity", "max_new_tokens", "limit", "batch_size", "samples"}


@dataclass
class Stage:
    """One validated stage of a recipe."""

    name: str
    method: str
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None  # tokenizer-stage options (dict) or, for training stages, a path/stage name
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    export: dict[str, Any] | None = None


@dataclass
class Recipe:
    """A validated recipe; `raw` is the resolved mapping written to the run folder."""

    name: str
    output_dir: Path
    seed: int
    stages: list[Stage]
    source: Path | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "output_dir": str(self.output_dir),
            "seed": self.seed,
            "stages": [
                {k: v for k, v in dataclasses.asdict(s).items() if v not in (None, {})} for s in self.stages
            ],
        }


def import_object(path: str) -> Any:
    """`"trl:SFTConfig"` -> the class."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer_fields(method: str) -> set[str]:
    """The keys a `train:` section may hold for `method`."""
    config_class = METHODS[method].config_class
    if config_class is None:
        return set()
    return {f.name for f in dataclasses.fields(import_object(config_class)) if f.init}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides; values are parsed as YAML (`3`, `1e-3`, `true`, `[a, b]`).

    In a staged recipe, `stages.<stage name>.train.max_steps=10` addresses one stage by name.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override '{item}' must look like dotted.key=value")
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                matches = [s for s in node if isinstance(s, dict) and s.get("name") == part]
                if not matches:
                    names = [s.get("name") for s in node if isinstance(s, dict)]
                    raise RecipeError(
                        f"override '{key}': no stage named '{part}' (stages: {', '.join(map(str, names))})"
                    )
                node = matches[0]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise RecipeError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a mapping")
        node[parts[-1]] = read_yaml(value)
    return raw


def parse(raw: Any, source: Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Validate a recipe mapping (already read from YAML) and fill in defaults; every problem in it is
    reported at once, each with its place."""
    problems = Problems(str(source) if source else "recipe")
    recipe = _parse(raw, source, overrides, problems)
    problems.raise_if_any()
    return recipe


def _parse(raw: Any, source: Path | None, overrides: list[str], problems: Problems) -> Recipe:
    where = problems.where
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    if "stages" not in raw:  # a single-stage recipe: lift the stage keys into one stage
        stage_keys = {k: raw.pop(k) for k in list(raw) if k in STAGE_KEYS and k != "name"}
        raw["stages"] = [{"name": stage_keys.get("method", "train"), **stage_keys}]
    raw = problems.mapping(raw, RECIPE_KEYS, where)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        problems.add(f"{where}: 'stages' must be a non-empty list")
        stages_raw = []
    name = raw.get("name") or (source.stem if source else None)
    if not name:
        problems.add(f"{where}: the recipe needs a 'name'")
    stages: list[Stage] = []
    for index, stage_raw in enumerate(stages_raw):
        stage = _parse_stage(stage_raw, index, stages, where, problems)
        if stage is not None:
            stages.append(stage)
    seed = raw.get("seed", 42)
    if type_problem(seed, int):
        problems.add(f"{where}: seed is {seed!r}; expected a whole number")
        seed = 42
    return Recipe(
        name=str(name),
        output_dir=Path(raw.get("output_dir") or Path("runs") / str(name)),
        seed=int(seed),
        stages=stages,
        source=source,
        description=str(raw.get("description", "")),
    )


def _parse_stage(raw: Any, index: int, earlier: list[Stage], where: str, problems: Problems) -> Stage | None:
    if not isinstance(raw, dict):
        problems.add(f"{where}: stages[{index}] must be a mapping")
        return None
    method = raw.get("method")
    label = f"stages[{index}]" + (f" ({raw['name']})" if "name" in raw else "")
    if method not in METHODS:
        if method is None:
            problems.add(f"{where}: {label} needs a 'method' (one of: {', '.join(METHODS)})")
        else:
            problems.add(f"{where}: {unknown_key_message(str(method), METHODS, f'{label}.method')}")
        return None
    name = str(raw.get("name", method))
    if any(s.name == name for s in earlier):
        problems.add(f"{where}: two stages are named '{name}'; give each a unique 'name'")
    at = f"{where}: stages.{name}"
    raw = problems.mapping(raw, STAGE_KEYS, at)
    stage = Stage(name=name, method=method)
    if method == "export":
        return _parse_export_stage(stage, raw, earlier, at, problems)
    stage.data = problems.mapping(raw.get("data"), DATA_KEYS, f"{at}.data")
    if not stage.data.get("sources"):
        problems.add(f"{at}.data.sources: list at least one data source")
    for key in ("sources", "eval_sources"):  # a bare path stands for {path: ...}; one source for a list
        if key in stage.data:
            entries = stage.data[key] if isinstance(stage.data[key], list) else [stage.data[key]]
            stage.data[key] = [s if isinstance(s, dict) else {"path": s} for s in entries]

    if method == "tokenizer":
        stage.tokenizer = problems.mapping(raw.get("tokenizer"), TOKENIZER_STAGE_KEYS, f"{at}.tokenizer")
        stage.tokenizer.setdefault("vocab_size", 4096)
        for key in ("model", "train", "peft", "eval"):
            if raw.get(key):
                problems.add(f"{at}.{key}: a tokenizer stage takes only 'data' and 'tokenizer'")
        return stage

    stage.model = problems.mapping(raw.get("model"), MODEL_KEYS, f"{at}.model")
    trained = _training_stages(earlier)
    sources = [k for k in ("preset", "path", "from") if k in stage.model]
    if len(sources) > 1:
        problems.add(f"{at}.model: give one of preset/path/from, not {' and '.join(sources)}")
    if not sources:
        if not trained:
            problems.add(f"{at}.model: the first training stage needs 'preset' or 'path'")
        else:
            stage.model["from"] = trained[-1]  # by default each stage continues from the previous one
    if "from" in stage.model and stage.model["from"] not in trained:
        problems.add(
            f"{at}.model.from: '{stage.model['from']}' is not an earlier training stage "
            f"(earlier: {', '.join(trained) or 'none'})"
        )
    if "preset" in stage.model and stage.model["preset"] not in PRESETS:
        guess = nearest(str(stage.model["preset"]), PRESETS)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        problems.add(f"{at}.model.preset: unknown preset '{stage.model['preset']}'{hint}")
    added = stage.model.get("add_special_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, str) and t for t in added):
        problems.add(f"{at}.model.add_special_tokens: give a list of token strings, got {added!r}")
    multiple = stage.model.get("pad_vocab_to_multiple_of", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        problems.add(f"{at}.model.pad_vocab_to_multiple_of: give a positive integer, got {multiple!r}")
    tokenizer = raw.get("tokenizer")
    if tokenizer is None:
        tokenizer_stages = [s.name for s in earlier if s.method == "tokenizer"]
        # A fresh model from a preset needs a tokenizer; a checkpoint brings its own.
        if "preset" in stage.model:
            if not tokenizer_stages:
                problems.add(f"{at}.tokenizer: a model built from a preset needs a tokenizer path or stage")
            else:
                tokenizer = tokenizer_stages[-1]
    elif not isinstance(tokenizer, str):
        problems.add(f"{at}.tokenizer: give a tokenizer folder, Hub id or tokenizer stage name")
        tokenizer = None
    stage.tokenizer = tokenizer

    config_class = import_object(METHODS[method].config_class)
    types_ = field_types(config_class)
    stage.train = problems.mapping(raw.get("train"), types_, f"{at}.train")
    check_values(stage.train, types_, f"{at}.train", problems)
    if "output_dir" in stage.train:
        problems.add(f"{at}.train.output_dir: set by the runner (runs/<name>/<stage>/checkpoints)")
    if raw.get("peft") is not None:
        stage.peft = _parse_peft(raw["peft"], f"{at}.peft", problems)
    if raw.get("eval") is not None:
        stage.eval = problems.mapping(raw["eval"], EVAL_KEYS, f"{at}.eval")
    return stage


def _training_stages(earlier: list[Stage]) -> list[str]:
    """Names of the earlier stages that produce a model (what `model.from` may name)."""
    return [s.name for s in earlier if METHODS[s.method].config_class]


def _parse_export_stage(
    stage: Stage, raw: dict[str, Any], earlier: list[Stage], at: str, problems: Problems
) -> Stage:
    """An export stage takes the model of an earlier training stage (by default the last one)."""
    for key in ("data", "train", "peft", "tokenizer"):
        if raw.get(key):
            problems.add(f"{at}.{key}: an export stage takes only 'model', 'export' and 'eval'")
    model = problems.mapping(raw.get("model"), {"from"}, f"{at}.model")
    trained = _training_stages(earlier)
    source = model.get("from") or (trained[-1] if trained else None)
    if source not in trained:
        problems.add(
            f"{at}.model.from: export needs an earlier training stage (earlier: {', '.join(trained) or 'none'})"
        )
    stage.model = {"from": source}
    stage.export = {
        "quant": "q8_0",
        "verify": True,
        **problems.mapping(raw.get("export"), EXPORT_KEYS, f"{at}.export"),
    }
    if raw.get("eval") is not None:
        stage.eval = problems.mapping(raw["eval"], EVAL_KEYS, f"{at}.eval")
    return stage


def _parse_peft(raw: Any, where: str, problems: Problems) -> dict[str, Any]:
    """A `peft:` section: `method: lora` plus the fields of `peft.LoraConfig` (the schema again)."""
    from peft import LoraConfig

    types_ = field_types(LoraConfig)
    section = problems.mapping(raw, {"method", *types_}, where)
    check_values({k: v for k, v in section.items() if k != "method"}, types_, where, problems)
    if section.setdefault("method", "lora") != "lora":
        problems.add(f"{where}.method: only 'lora' is supported (QLoRA is lora with a 4-bit model dtype)")
    return section


def check_inputs(recipe: Recipe, problems: Problems) -> None:
    """Report every input a recipe names that is not there, as far as that can be told without the
    network: data files, eval files, model and tokenizer folders (a Hub id is checked when it loads)."""
    from toolkit.data.loading import local_path_problem

    stages = {s.name: s for s in recipe.stages}
    for stage in recipe.stages:
        at = f"{problems.where}: stages.{stage.name}"
        for key in ("sources", "eval_sources"):
            for i, entry in enumerate(stage.data.get(key) or []):
                path = entry.get("path") if isinstance(entry, dict) else None
                if isinstance(path, str) and (problem := local_path_problem(path)):
                    problems.add(f"{at}.data.{key}[{i}]: {path}: {problem}")
        for key in ("tasks", "perplexity"):
            path = (stage.eval or {}).get(key)
            if isinstance(path, str) and not Path(path).is_file():
                problems.add(f"{at}.eval.{key}: file not found: {path}")
        for key, value in (("model.path", stage.model.get("path")), ("tokenizer", stage.tokenizer)):
            if not isinstance(value, str) or (key == "tokenizer" and value in stages):
                continue
            if problem := local_path_problem(value, folder=True):
                problems.add(f"{at}.{key}: {value}: {problem}")


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file: its structure, and that the inputs it names exist; every problem is
    reported at once."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    problems = Problems(str(path))
    recipe = _parse(raw, path, list(overrides), problems)
    check_inputs(recipe, problems)
    problems.raise_if_any()
    return recipe
