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

from toolkit.errors import RecipeError, unknown_key_message


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


def _check_keys(section: Any, valid: set[str], where: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in valid:
            raise RecipeError(unknown_key_message(str(key), valid, where))
    return section


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
    """Validate a recipe mapping (already read from YAML) and fill in defaults."""
    where = str(source) if source else "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    if "stages" not in raw:  # a single-stage recipe: lift the stage keys into one stage
        stage_keys = {k: raw.pop(k) for k in list(raw) if k in STAGE_KEYS and k != "name"}
        raw["stages"] = [{"name": stage_keys.get("method", "train"), **stage_keys}]
    _check_keys(raw, RECIPE_KEYS, where)
    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{where}: 'stages' must be a non-empty list")
    name = raw.get("name") or (source.stem if source else None)
    if not name:
        raise RecipeError(f"{where}: the recipe needs a 'name'")
    stages: list[Stage] = []
    for index, stage_raw in enumerate(stages_raw):
        stages.append(_parse_stage(stage_raw, index, stages, where))
    return Recipe(
        name=str(name),
        output_dir=Path(raw.get("output_dir") or Path("runs") / str(name)),
        seed=int(raw.get("seed", 42)),
        stages=stages,
        source=source,
        description=str(raw.get("description", "")),
    )


def _parse_stage(raw: Any, index: int, earlier: list[Stage], where: str) -> Stage:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: stages[{index}] must be a mapping")
    method = raw.get("method")
    label = f"stages[{index}]" + (f" ({raw['name']})" if "name" in raw else "")
    if method not in METHODS:
        if method is None:
            raise RecipeError(f"{where}: {label} needs a 'method' (one of: {', '.join(METHODS)})")
        raise RecipeError(f"{where}: {unknown_key_message(str(method), METHODS, f'{label}.method')}")
    name = str(raw.get("name", method))
    if any(s.name == name for s in earlier):
        raise RecipeError(f"{where}: two stages are named '{name}'; give each a unique 'name'")
    at = f"{where}: stages.{name}"
    _check_keys(raw, STAGE_KEYS, at)
    stage = Stage(name=name, method=method)
    if method == "export":
        return _parse_export_stage(stage, raw, earlier, at)
    stage.data = dict(_check_keys(raw.get("data"), DATA_KEYS, f"{at}.data"))
    sources = stage.data.get("sources")
    if not sources:
        raise RecipeError(f"{at}.data.sources: list at least one data source")
    for key in ("sources", "eval_sources"):  # a bare path stands for {path: ...}; one source for a list
        if key in stage.data:
            entries = stage.data[key] if isinstance(stage.data[key], list) else [stage.data[key]]
            stage.data[key] = [s if isinstance(s, dict) else {"path": s} for s in entries]

    if method == "tokenizer":
        stage.tokenizer = dict(_check_keys(raw.get("tokenizer"), TOKENIZER_STAGE_KEYS, f"{at}.tokenizer"))
        stage.tokenizer.setdefault("vocab_size", 4096)
        for key in ("model", "train", "peft", "eval"):
            if raw.get(key):
                raise RecipeError(f"{at}.{key}: a tokenizer stage takes only 'data' and 'tokenizer'")
        return stage

    stage.model = dict(_check_keys(raw.get("model"), MODEL_KEYS, f"{at}.model"))
    trained = _training_stages(earlier)
    sources = [k for k in ("preset", "path", "from") if k in stage.model]
    if len(sources) > 1:
        raise RecipeError(f"{at}.model: give one of preset/path/from, not {' and '.join(sources)}")
    if not sources:
        if not trained:
            raise RecipeError(f"{at}.model: the first training stage needs 'preset' or 'path'")
        stage.model["from"] = trained[-1]  # by default each stage continues from the previous one
    if "from" in stage.model and stage.model["from"] not in trained:
        raise RecipeError(
            f"{at}.model.from: '{stage.model['from']}' is not an earlier training stage "
            f"(earlier: {', '.join(trained) or 'none'})"
        )
    added = stage.model.get("add_special_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, str) and t for t in added):
        raise RecipeError(f"{at}.model.add_special_tokens: give a list of token strings, got {added!r}")
    multiple = stage.model.get("pad_vocab_to_multiple_of", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise RecipeError(f"{at}.model.pad_vocab_to_multiple_of: give a positive integer, got {multiple!r}")
    tokenizer = raw.get("tokenizer")
    if tokenizer is None:
        tokenizer_stages = [s.name for s in earlier if s.method == "tokenizer"]
        # A fresh model from a preset needs a tokenizer; a checkpoint brings its own.
        if "preset" in stage.model:
            if not tokenizer_stages:
                raise RecipeError(
                    f"{at}.tokenizer: a model built from a preset needs a tokenizer path or stage"
                )
            tokenizer = tokenizer_stages[-1]
    elif not isinstance(tokenizer, str):
        raise RecipeError(f"{at}.tokenizer: give a tokenizer folder, Hub id or tokenizer stage name")
    stage.tokenizer = tokenizer

    valid_train = trainer_fields(method)
    stage.train = dict(_check_keys(raw.get("train"), valid_train, f"{at}.train"))
    if "output_dir" in stage.train:
        raise RecipeError(f"{at}.train.output_dir: set by the runner (runs/<name>/<stage>/checkpoints)")
    if raw.get("peft") is not None:
        stage.peft = _parse_peft(raw["peft"], f"{at}.peft")
    if raw.get("eval") is not None:
        stage.eval = dict(_check_keys(raw["eval"], EVAL_KEYS, f"{at}.eval"))
    return stage


def _training_stages(earlier: list[Stage]) -> list[str]:
    """Names of the earlier stages that produce a model (what `model.from` may name)."""
    return [s.name for s in earlier if METHODS[s.method].config_class]


def _parse_export_stage(stage: Stage, raw: dict[str, Any], earlier: list[Stage], at: str) -> Stage:
    """An export stage takes the model of an earlier training stage (by default the last one)."""
    for key in ("data", "train", "peft", "tokenizer"):
        if raw.get(key):
            raise RecipeError(f"{at}.{key}: an export stage takes only 'model', 'export' and 'eval'")
    model = _check_keys(raw.get("model"), {"from"}, f"{at}.model")
    trained = _training_stages(earlier)
    source = model.get("from") or (trained[-1] if trained else None)
    if source not in trained:
        raise RecipeError(
            f"{at}.model.from: export needs an earlier training stage (earlier: {', '.join(trained) or 'none'})"
        )
    stage.model = {"from": source}
    stage.export = {
        "quant": "q8_0",
        "verify": True,
        **_check_keys(raw.get("export"), EXPORT_KEYS, f"{at}.export"),
    }
    if raw.get("eval") is not None:
        stage.eval = dict(_check_keys(raw["eval"], EVAL_KEYS, f"{at}.eval"))
    return stage


def _parse_peft(raw: Any, where: str) -> dict[str, Any]:
    """A `peft:` section: `method: lora` plus the fields of `peft.LoraConfig` (the schema again)."""
    from peft import LoraConfig

    section = dict(_check_keys(raw, {"method"} | {f.name for f in dataclasses.fields(LoraConfig)}, where))
    if section.setdefault("method", "lora") != "lora":
        raise RecipeError(
            f"{where}.method: only 'lora' is supported (QLoRA is lora with a 4-bit model dtype)"
        )
    return section


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    return parse(raw, source=path, overrides=overrides)
