"""Recipes: YAML files that describe a run as a chain of stages, validated before anything runs.

A recipe is either one stage written at the top level (`method`, `model`, `data`, `train`, ...) or a list of
`stages`, each reading the previous stage's output. What a stage may hold is its kind's, in the stage
registry (`toolkit.stages`): the common keys it takes, and its own section. The keys of a training stage's
`train:` section are exactly the fields of its TRL/Trainer config dataclass (`SFTConfig`, `DPOConfig`,
`GRPOConfig`, ...): those dataclasses are the schema, so there is no second copy of their fields to drift.
Every problem is reported at once, each with where it is and, for a misspelt key, the nearest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import RecipeError, nearest, unknown_key_message
from toolkit.models import PRESETS
from toolkit.schema import Problems, check_values, field_types, type_problem
from toolkit.stages import StageKind, get_stage, load_plugins, resolve, section_hooks, stage_kinds


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


RECIPE_KEYS = {"name", "description", "output_dir", "seed", "stages"}
MODEL_KEYS = (
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
    "quantization",  # transformers.BitsAndBytesConfig fields: QLoRA's 4-bit base (`load_in_4bit: true`)
)
DATA_KEYS = {"sources", "eval_sources", "eval_fraction"}


@dataclass
class Stage:
    """One validated stage of a recipe. `options` is the stage kind's own section (e.g. `export:`,
    `rewards:`); `eval` the values of the `eval:` section hook."""

    name: str
    method: str
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None  # a tokenizer folder, Hub id or tokenizer stage name
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    options: Any = None
    sections: dict[str, Any] = field(default_factory=dict)  # the kind's further sections, by key

    def to_dict(self) -> dict[str, Any]:
        """The stage as the recipe would write it (its section under its own key)."""
        skip = ("options", "sections")
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip and v not in (None, {})}
        section = get_stage(self.method).section
        if section and self.options is not None:
            out[section] = self.options
        return {**out, **self.sections}


@dataclass
class Recipe:
    """A validated recipe; `to_dict` is the resolved mapping written to the run folder."""

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
            "stages": [stage.to_dict() for stage in self.stages],
        }


class ToolkitOptim(enum.Enum):
    """Optimizers `train.optim` may name besides TrainingArguments' own (toolkit/train/optimizers.py)."""

    MUON = "muon"


@dataclass
class Grokfast:
    """`train.grokfast`: the EMA's decay (`alpha`, in [0, 1)) and the amplification of its part (`lamb`);
    the defaults are the paper's (Lee et al. 2024, Grokfast-EMA)."""

    alpha: float = 0.98
    lamb: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha is {self.alpha}; the EMA's decay lies in [0, 1)")
        if self.lamb < 0:
            raise ValueError(f"lamb is {self.lamb}; the amplification is ≥ 0")


# `train:` keys of the toolkit's own, beside the method's TRL config fields; the trainer stage takes them out
# before it builds that config (toolkit/train/trainer_stage.py).
TOOLKIT_TRAIN_KEYS: dict[str, Any] = {
    "grokfast": dict,  # {alpha, lamb}: Grokfast-EMA gradient filter (toolkit/train/optimizers.py)
    "auto_batch_size": bool,  # the largest micro-batch that fits, the global batch kept by accumulation
}


def train_types(config: str) -> dict[str, Any]:
    """Key -> annotation of a `train:` section whose TRL config is `config` (a "module:Class" name)."""
    types_ = {**field_types(resolve(config)), **TOOLKIT_TRAIN_KEYS}
    if "optim" in types_:
        types_["optim"] = ToolkitOptim | types_["optim"]
    return types_


def trainer_fields(method: str) -> set[str]:
    """The keys a `train:` section may hold for `method` (none for a stage that does not train)."""
    spec = get_stage(method).trainer
    return set(train_types(spec.config)) if spec else set()


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
        try:
            node[parts[-1]] = read_yaml(value)
        except yaml.YAMLError as error:  # e.g. a flow mapping cut by the shell: `a={b: 1, c:` ...
            reason = str(getattr(error, "problem", None) or error).strip()
            raise RecipeError(
                f"override '{item}': the value is not YAML ({reason}); quote it for the shell"
            ) from None
    return raw


def parse(raw: Any, source: Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Validate a recipe mapping (already read from YAML) and fill in defaults; every problem in it is
    reported at once, each with its place."""
    problems = Problems(str(source) if source else "recipe")
    recipe = _parse(raw, source, overrides, problems)
    problems.raise_if_any()
    return recipe


def _parse(raw: Any, source: Path | None, overrides: list[str], problems: Problems) -> Recipe:
    load_plugins()
    where = problems.where
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    if "stages" not in raw:  # a single-stage recipe: lift the stage keys into one stage
        kind = stage_kinds().get(raw.get("method"))
        keys = kind.recipe_keys if kind else set()
        stage_keys = {k: raw.pop(k) for k in list(raw) if k in keys and k != "name"}
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
    kinds = stage_kinds()
    method = raw.get("method")
    label = f"stages[{index}]" + (f" ({raw['name']})" if "name" in raw else "")
    if method not in kinds:
        if method is None:
            problems.add(f"{where}: {label} needs a 'method' (one of: {', '.join(kinds)})")
        else:
            problems.add(f"{where}: {unknown_key_message(str(method), kinds, f'{label}.method')}")
        return None
    kind = kinds[method]
    name = str(raw.get("name", method))
    if any(s.name == name for s in earlier):
        problems.add(f"{where}: two stages are named '{name}'; give each a unique 'name'")
    at = f"{where}: stages.{name}"
    known = set().union(*(k.recipe_keys for k in kinds.values()))
    for key in sorted(set(raw) - kind.recipe_keys):
        if key in known:
            takes = ", ".join(sorted(kind.recipe_keys - {"name", "method"})) or "nothing else"
            problems.add(f"{at}.{key}: method '{method}' takes only {takes}")
        else:
            problems.add(unknown_key_message(str(key), kind.recipe_keys, at))
    raw = {k: v for k, v in raw.items() if k in kind.recipe_keys}
    stage = Stage(name=name, method=method)
    if "data" in kind.keys:
        stage.data = _parse_data(raw.get("data"), f"{at}.data", problems)
    if "model" in kind.keys:
        stage.model = _parse_model(raw, kind, earlier, at, problems)
    if "tokenizer" in kind.keys:
        stage.tokenizer = _parse_tokenizer_ref(raw.get("tokenizer"), stage, earlier, at, problems)
    if kind.trainer is not None:
        types_ = train_types(kind.trainer.config)
        stage.train = problems.mapping(raw.get("train"), types_, f"{at}.train")
        check_values(stage.train, types_, f"{at}.train", problems)
        if isinstance(stage.train.get("grokfast"), dict):
            stage.train["grokfast"] = _parse_section(
                stage.train["grokfast"], Grokfast, f"{at}.train.grokfast", problems
            )
        if "output_dir" in stage.train:
            problems.add(f"{at}.train.output_dir: set by the runner (runs/<name>/<stage>/checkpoints)")
    if "peft" in kind.keys and raw.get("peft") is not None:
        stage.peft = _parse_peft(raw["peft"], f"{at}.peft", problems)
    if "eval" in kind.keys and raw.get("eval") is not None:
        hook = section_hooks().get("eval")
        stage.eval = _parse_section(raw["eval"], hook.schema if hook else None, f"{at}.eval", problems)
    quantization = (stage.model or {}).get("quantization") if "model" in kind.keys else None
    if isinstance(quantization, dict) and quantization.get("method") == "bitnet":
        from toolkit.quantization.staged import check_options

        for problem in check_options(quantization, stage.eval, f"{at}.model.quantization"):
            problems.add(problem)
        if quantization.get("groups") is not None and "preset" in stage.model:
            problems.add(
                f"{at}.model.quantization.groups: staged quantization keeps a trained model's accuracy; a "
                "preset starts from random weights (give path/from, or drop groups to train ternary from scratch)"
            )
        if quantization.get("groups") is not None and raw.get("peft") is not None:
            problems.add(f"{at}.peft: staged BitNet quantization trains the model's own weights; drop peft:")
    if kind.section:
        stage.options = _parse_section(raw.get(kind.section), kind.schema, f"{at}.{kind.section}", problems)
    for key, schema in kind.sections:
        stage.sections[key] = _parse_section(raw.get(key), schema, f"{at}.{key}", problems)
    return stage


def _parse_section(raw: Any, schema: Any, at: str, problems: Problems) -> Any:
    """A section against its schema: a dataclass (keys, types, defaults) or a validating function."""
    schema = resolve(schema) if schema is not None else None
    if schema is None:
        return raw
    if not dataclasses.is_dataclass(schema):
        return schema(raw, at, problems)
    types_ = field_types(schema)
    values = problems.mapping(raw, types_, at)
    check_values(values, types_, at, problems)
    try:
        return dataclasses.asdict(schema(**values))
    except (TypeError, ValueError) as error:
        problems.add(f"{at}: {error}")
        return values


def _parse_data(raw: Any, at: str, problems: Problems) -> dict[str, Any]:
    data = problems.mapping(raw, DATA_KEYS, at)
    if not data.get("sources"):
        problems.add(f"{at}.sources: list at least one data source")
    for key in ("sources", "eval_sources"):  # a bare path stands for {path: ...}; one source for a list
        if key in data:
            entries = data[key] if isinstance(data[key], list) else [data[key]]
            data[key] = [s if isinstance(s, dict) else {"path": s} for s in entries]
    return data


def model_stages(earlier: list[Stage]) -> list[str]:
    """Names of the earlier stages that produce a model (what `model.from` may name)."""
    return [s.name for s in earlier if get_stage(s.method).produces_model]


def _parse_model(
    raw: dict[str, Any], kind: StageKind, earlier: list[Stage], at: str, problems: Problems
) -> dict[str, Any]:
    """A trainer stage's model: a preset, a path (folder or Hub id), or `from` an earlier stage (by default the
    last one that made a model); a stage that does not train takes only `from`."""
    keys = MODEL_KEYS if kind.trainer is not None else ("from",)
    model = problems.mapping(raw.get("model"), keys, f"{at}.model")
    trained = model_stages(earlier)
    sources = [k for k in ("preset", "path", "from") if k in model]
    if len(sources) > 1:
        problems.add(f"{at}.model: give one of preset/path/from, not {' and '.join(sources)}")
    if not sources:
        if trained:
            model["from"] = trained[-1]  # by default each stage continues from the previous one
        elif kind.trainer is not None:
            problems.add(f"{at}.model: the first training stage needs 'preset' or 'path'")
        else:
            problems.add(f"{at}.model.from: a {kind.method} stage needs an earlier stage with a model")
    if "from" in model and model["from"] not in trained:
        problems.add(
            f"{at}.model.from: '{model['from']}' is not an earlier stage with a model "
            f"(earlier: {', '.join(trained) or 'none'})"
        )
    if "preset" in model and model["preset"] not in PRESETS:
        guess = nearest(str(model["preset"]), PRESETS)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        problems.add(f"{at}.model.preset: unknown preset '{model['preset']}'{hint}")
    added = model.get("add_special_tokens", [])
    if isinstance(added, str):  # a named set: `thoughts` is the twelve thought tokens (toolkit.data.thoughts)
        from toolkit.data.thoughts import TOKEN_SET_NAMES

        if added in TOKEN_SET_NAMES:
            added = model["add_special_tokens"] = list(TOKEN_SET_NAMES[added])
        else:
            problems.add(
                f"{at}.model.add_special_tokens: unknown token set {added!r} (sets: {', '.join(TOKEN_SET_NAMES)}); "
                "or give a list of token strings"
            )
            added = []
    if not isinstance(added, list) or not all(isinstance(t, str) and t for t in added):
        problems.add(f"{at}.model.add_special_tokens: give a list of token strings, got {added!r}")
    multiple = model.get("pad_vocab_to_multiple_of", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        problems.add(f"{at}.model.pad_vocab_to_multiple_of: give a positive integer, got {multiple!r}")
    if "quantization" in model:
        _check_quantization(model["quantization"], model, f"{at}.model.quantization", problems)
    return model


def _check_quantization(raw: Any, model: dict[str, Any], at: str, problems: Problems) -> None:
    """`model.quantization`: `{method: bitnet, exclude: [...]}` (BitNet quantization-aware training, from a
    preset too), or keys of transformers' BitsAndBytesConfig, on a pretrained model (a preset starts from
    random weights: nothing to quantize)."""
    import dataclasses
    import inspect

    from transformers import BitsAndBytesConfig

    if isinstance(raw, dict) and "method" in raw:
        from toolkit.quantization.bitnet import BitNetOptions

        section = problems.mapping(raw, [f.name for f in dataclasses.fields(BitNetOptions)], at)
        if section.get("method") != "bitnet":
            guess = nearest(str(section.get("method")), ["bitnet"])
            hint = " (did you mean 'bitnet'?)" if guess else ""
            problems.add(
                f"{at}.method: unknown quantization method {section.get('method')!r}{hint}; 'bitnet' for "
                "ternary quantization-aware training, or no method and BitsAndBytesConfig keys for QLoRA"
            )
        exclude = section.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) and e for e in exclude):
            problems.add(f"{at}.exclude: give a list of module names or patterns, got {exclude!r}")
        return

    valid = [
        k for k in inspect.signature(BitsAndBytesConfig.__init__).parameters if k not in ("self", "kwargs")
    ]
    section = problems.mapping(raw, valid, at)
    if "preset" in model:
        problems.add(
            f"{at}: a preset model starts from random weights; quantize a pretrained base (path/from)"
        )
    if section and not (section.get("load_in_4bit") or section.get("load_in_8bit")):
        problems.add(f"{at}: set load_in_4bit: true (QLoRA) or load_in_8bit: true")


def _parse_tokenizer_ref(
    tokenizer: Any, stage: Stage, earlier: list[Stage], at: str, problems: Problems
) -> str | None:
    if tokenizer is None:
        # A fresh model from a preset needs a tokenizer (the last tokenizer stage's); a checkpoint brings its own.
        if "preset" not in stage.model:
            return None
        tokenizer_stages = [s.name for s in earlier if get_stage(s.method).produces_tokenizer]
        if not tokenizer_stages:
            problems.add(f"{at}.tokenizer: a model built from a preset needs a tokenizer path or stage")
            return None
        return tokenizer_stages[-1]
    if not isinstance(tokenizer, str):
        problems.add(f"{at}.tokenizer: give a tokenizer folder, Hub id or tokenizer stage name")
        return None
    return tokenizer


def _parse_peft(raw: Any, where: str, problems: Problems) -> dict[str, Any]:
    """A `peft:` section: `method: lora` plus the fields of `peft.LoraConfig` (the schema again)."""
    from peft import LoraConfig

    types_ = field_types(LoraConfig)
    section = problems.mapping(raw, {"method", *types_}, where)
    check_values({k: v for k, v in section.items() if k != "method"}, types_, where, problems)
    if section.setdefault("method", "lora") != "lora":
        problems.add(f"{where}.method: only 'lora' is supported (QLoRA is lora with a 4-bit model dtype)")
    return section


def _input_files(values: Any, schema: Any) -> list[tuple[str, str]]:
    """(field, path) of a section's fields that name input files (`metadata={"input": "file"}`)."""
    schema = resolve(schema) if schema is not None else None
    if not isinstance(values, dict) or not dataclasses.is_dataclass(schema):
        return []
    return [
        (f.name, values[f.name])
        for f in dataclasses.fields(schema)
        if f.metadata.get("input") == "file" and isinstance(values.get(f.name), str)
    ]


def check_inputs(recipe: Recipe, problems: Problems) -> None:
    """Report every input a recipe names that is not there, as far as that can be told without the
    network: data files, the files a section names, model and tokenizer folders (a Hub id is checked when it
    loads); then each stage kind's own preflight (e.g. that reward functions import and answer)."""
    from toolkit.data.loading import DataSource, local_path_problem, preview_problems

    stages = {s.name: s for s in recipe.stages}
    hooks = section_hooks()
    for stage in recipe.stages:
        kind = get_stage(stage.method)
        at = f"{problems.where}: stages.{stage.name}"
        for key in ("sources", "eval_sources"):
            for i, entry in enumerate(stage.data.get(key) or []):
                path = entry.get("path") if isinstance(entry, dict) else None
                if isinstance(path, str) and (problem := local_path_problem(path)):
                    problems.add(f"{at}.data.{key}[{i}]: {path}: {problem}")
                elif isinstance(path, str) and kind.data_kind and stage.data.get("sources"):
                    # The first rows, as the stage's method reads them: a KTO stage given preference pairs
                    # fails here, not after the stages before it have trained.
                    try:
                        source = DataSource.from_dict(dict(entry), where=f"{at}.data.{key}[{i}]")
                    except Exception:  # reported by the data section's own checks
                        continue
                    for problem in preview_problems(source, kind.data_kind)[:3]:
                        problems.add(f"{at}.data.{key}[{i}]: {problem}")
        sections = [("eval", stage.eval, hooks["eval"].schema if "eval" in hooks else None)]
        sections.append((kind.section, stage.options, kind.schema))
        sections += [(key, stage.sections.get(key), schema) for key, schema in kind.sections]
        for section, values, schema in sections:
            for key, path in _input_files(values, schema):
                if not Path(path).is_file():
                    problems.add(f"{at}.{section}.{key}: file not found: {path}")
        for key, value in (("model.path", stage.model.get("path")), ("tokenizer", stage.tokenizer)):
            if not isinstance(value, str) or (key == "tokenizer" and value in stages):
                continue
            if problem := local_path_problem(value, folder=True):
                problems.add(f"{at}.{key}: {value}: {problem}")
        if kind.preflight is not None:
            resolve(kind.preflight)(stage, at, problems, recipe)


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
