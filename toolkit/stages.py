"""The stage registry: what a recipe's `method:` names, and the sections a stage may carry.

One entry per method, a `StageKind`: the recipe keys the stage takes, its own options (a section validated
against a dataclass, or by a function for list-shaped sections such as `rewards:`), whether it produces a
model that a later stage may take `from`, and the function that runs it. Training methods are entries of one
generic trainer stage (`toolkit/train/trainer_stage.py`), each parametrised by a `TrainerSpec`: TRL's config
and trainer classes (the config is the `train:` schema), the data kind, the columns the trainer reads, and
what else the trainer takes (a reference model, reward functions).

Besides the toolkit's own methods (toolkit/train/methods.py), packages contribute stage kinds and sections
through the `forge_toolkit.stages` entry-point group (pyproject.toml): `export` registers the export stage,
`eval` the `eval:` section that scores a trained model. So the runner names no method, and nothing under
`toolkit/` imports `export` or `eval`. Adding a method is one `register_stage` call.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import RecipeError, unknown_key_message
from toolkit.models.registry import import_path

if TYPE_CHECKING:
    from toolkit.recipe import Recipe, Stage
    from toolkit.run_folder import RunFolder, StageFolder

ENTRY_POINT_GROUP = "forge_toolkit.stages"

# The keys every stage may carry besides its own section; each kind names those it takes.
COMMON_KEYS = ("name", "method", "model", "tokenizer", "data", "train", "peft", "eval")


# `"package.module:name"` -> the object; anything else is returned as it is (the architecture table's rule).
resolve: Callable[[str | Callable | type], Any] = import_path


@dataclass(frozen=True)
class TrainerSpec:
    """A training method as one TRL/Trainer trainer: its config class is the `train:` schema."""

    config: str  # "trl:SFTConfig"
    trainer: str  # "trl:SFTTrainer"
    columns: tuple[str, ...]  # what the trainer reads; other columns are dropped (unless keep_columns)
    defaults: dict[str, Any] = field(default_factory=dict)  # ours, applied under the recipe's `train:` keys
    # Reward functions receive every dataset column (e.g. `answer`): RL stages keep them all.
    keep_columns: bool = False
    # "module:function" (StageContext, tokenizer) -> config values derived from the stage (under the recipe's)
    config_values: str | None = None
    # "module:function" (StageContext, model, tokenizer, peft_config) -> extra trainer keyword arguments
    extras: str | None = None
    # The model it trains: "causal_lm", or "sequence_classification" (a score head with one label: reward models).
    model_class: str = "causal_lm"
    # Logged measures of the method to plot beside loss, learning rate and grad norm, one figure per group.
    plots: tuple[tuple[str, ...], ...] = ()
    # "module:function" (StageContext, model, tokenizer) -> Trainer callbacks of the method (checks while training)
    callbacks: str | None = None


@dataclass(frozen=True)
class StageKind:
    """One method a recipe can name."""

    method: str
    run: str | Callable[[StageContext], StageOutcome]
    description: str
    keys: tuple[str, ...] = ()  # common keys (COMMON_KEYS) the stage takes
    # The stage's own section: recipe key, and its schema (a dataclass, or a function
    # (raw, where, problems) -> value for sections that are no mapping).
    section: str | None = None
    schema: type | Callable[..., Any] | str | None = None
    # Further sections of its own: (recipe key, schema) pairs, their values in `Stage.sections`.
    sections: tuple[tuple[str, type | Callable[..., Any] | str], ...] = ()
    produces_model: bool = False
    produces_tokenizer: bool = False  # its `final/` is a tokenizer a later preset model takes by default
    data_kind: str | None = None  # the canonical row kind of toolkit.data its `data:` rows become
    trainer: TrainerSpec | None = None
    # "module:function" (stage, where, problems, recipe) run when a recipe file is loaded, before any stage
    # runs: checks that need more than the stage's text (e.g. that reward functions import and answer, or that
    # the stages it names come before it).
    preflight: str | Callable[..., None] | None = None

    @property
    def recipe_keys(self) -> set[str]:
        own = [self.section] if self.section else []
        return {"name", "method", *self.keys, *own, *(key for key, _ in self.sections)}


@dataclass(frozen=True)
class SectionHook:
    """A section any model-producing stage may carry (e.g. `eval:`), run after the stage with its model."""

    section: str
    schema: type | str
    run: str | Callable[..., dict[str, Any] | None]
    description: str = ""
    # Run before the stage when the section's `before` is true: (StageContext, section values) -> result,
    # kept under "before" beside what `run` returns (e.g. held-out accuracy before and after RL).
    before: str | Callable[..., dict[str, Any] | None] | None = None


@dataclass
class StageContext:
    """What a stage's run function gets."""

    recipe: Recipe
    stage: Stage
    run_folder: RunFolder
    folder: StageFolder
    resume: bool = False

    @property
    def kind(self) -> StageKind:
        return get_stage(self.stage.method)


@dataclass
class StageOutcome:
    """What a stage left: its model folder (for stages that make one), the model object when it is still in
    memory (so that section hooks need not reload it), evaluation results and whatever else it reports."""

    final: Path | None = None
    model: Any = None
    tokenizer: Any = None
    eval: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


STAGES: dict[str, StageKind] = {}
SECTIONS: dict[str, SectionHook] = {}
_loaded = False


def register_stage(kind: StageKind) -> None:
    """Add (or replace) a stage kind."""
    STAGES[kind.method] = kind


def register_section(hook: SectionHook) -> None:
    SECTIONS[hook.section] = hook


def load_plugins() -> None:
    """Register the toolkit's methods, then every `forge_toolkit.stages` entry point (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("toolkit.train.methods")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()()


def get_stage(method: str) -> StageKind:
    load_plugins()
    if method not in STAGES:
        raise RecipeError(unknown_key_message(str(method), STAGES, "the stage registry (method)"))
    return STAGES[method]


def stage_kinds() -> dict[str, StageKind]:
    load_plugins()
    return dict(STAGES)


def section_hooks() -> dict[str, SectionHook]:
    load_plugins()
    return dict(SECTIONS)


@dataclass(frozen=True)
class StageRef:
    """What a stage name in another stage's section refers to, seen from that stage."""

    stage: Stage | None  # the earlier stage of that name, None when there is none
    later: bool  # a stage of that name exists, but runs after the one naming it (or is it)
    earlier: list[str]  # the names of the stages before the one naming it

    @property
    def is_stage(self) -> bool:
        return self.stage is not None or self.later


def find_earlier(recipe: Recipe | None, stage: Stage, name: str) -> StageRef:
    """Look `name` up among the stages of `recipe` that run before `stage` (a later stage has no output yet)."""
    stages = list(recipe.stages) if recipe is not None else []
    names = [s.name for s in stages]
    before = stages[: names.index(stage.name)] if stage.name in names else stages
    found = next((s for s in before if s.name == name), None)
    return StageRef(found, found is None and name in names, [s.name for s in before])


def schema_fields(schema: type) -> set[str]:
    """The keys a dataclass schema accepts."""
    return {f.name for f in dataclasses.fields(schema) if f.init}
