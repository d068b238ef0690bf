"""`toolkit arch check NAME`: which exports an architecture reaches, decided before any training.

NAME is an architecture (its default config), a preset, or a local HF model folder. Each export target is
asked the exporter's own questions, through the exporter's own code, on the model built on the meta device
(shapes without memory) or, for a folder with weights, on its safetensors headers:

- `gguf`: the plan has a GGUF part, its config checks pass (`export.gguf.check_config`) and every tensor the
  model saves has a GGUF name (`export.gguf.plan_tensors`).
- `vllm-native`: the plan names a transformers class vLLM implements; the config converts to it
  (`export.vllm.target_config`) and every renamed, transformed tensor is one of that class's, in its shape.
- `vllm-transformers`: the class vLLM's Transformers backend would load declares
  `_supports_attention_backend` (attention through `ALL_ATTENTION_FUNCTIONS`); for a toolkit architecture
  that class travels as remote code, so the remote-code route must hold too.
- `remote-code`: the plan allows remote code and the modelling files can be copied on their own
  (`export.vllm.portable_sources`).

A blocked target names the component that stops it, in the words the exporter would refuse with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from export.gguf import Checkpoint, check_config, gguf_plan, plan_tensors
from export.vllm import (
    Route,
    choose_route,
    remote_code_files,
    rename,
    require_attention_backend,
    target_config,
    transform,
    vllm_plan,
)
from toolkit.errors import ExportError, ToolkitError, nearest
from toolkit.models.plans import Config
from toolkit.models.registry import ARCHITECTURES, PRESETS, build_config, meta_model, register_auto_classes

# Target key -> what the table calls it, in the order they are checked.
TARGETS = {
    "gguf": "GGUF (llama.cpp)",
    "vllm-native": "vLLM native",
    "vllm-transformers": "vLLM Transformers backend",
    "remote-code": "Hub remote code",
}
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
Shapes = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)


@dataclass(frozen=True)
class TargetVerdict:
    """Whether one export target is reachable."""

    target: str  # a key of TARGETS
    ok: bool
    # ok: the graph or class it becomes and how; blocked: the component that stops it.
    detail: str
    name: str | None = None  # the llama.cpp graph or transformers class, when ok

    @property
    def label(self) -> str:
        return TARGETS[self.target]


@dataclass(frozen=True)
class ArchCheck:
    """The verdicts of every export target for one architecture, preset or folder."""

    name: str  # as asked
    model_type: str
    source: str  # where the config and tensors came from
    targets: tuple[TargetVerdict, ...]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.targets)

    def target(self, key: str) -> TargetVerdict:
        return next(t for t in self.targets if t.target == key)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check(name: str | Path) -> ArchCheck:
    """Check every export target for `name`: an architecture, a preset or an HF model folder.

    An unknown name is a `ToolkitError` that suggests the nearest architecture or preset.
    """
    model_type, config, tensors, source = _resolve(str(name))
    return ArchCheck(
        name=str(name),
        model_type=model_type,
        source=source,
        targets=(
            _gguf(model_type, config, tensors),
            _vllm_native(model_type, config, tensors),
            _vllm_transformers(model_type),
            _remote_code(model_type),
        ),
    )


def saved_tensors(model: PreTrainedModel) -> Shapes:
    """The tensors `save_pretrained` would write for `model` (tied copies left out), with their shapes."""
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    return {name: (tuple(t.shape), SAFETENSORS_DTYPE.get(t.dtype, str(t.dtype))) for name, t in state.items()}


def config_json(config: PreTrainedConfig) -> Config:
    """`config` as `save_pretrained` writes it to config.json, which is what the exporters read."""
    return json.loads(config.to_json_string())


def _resolve(name: str) -> tuple[str, Config, Shapes, str]:
    # Registered names first: a folder that happens to share one is still reachable as ./NAME.
    if name in ARCHITECTURES:
        loaded = ARCHITECTURES[name].config_class()
        return name, config_json(loaded), saved_tensors(meta_model(loaded)), "default config"
    if name in PRESETS:
        loaded = build_config(name)
        return PRESETS[name].arch, config_json(loaded), saved_tensors(meta_model(loaded)), f"preset {name}"
    folder = Path(name)
    if not folder.is_dir():
        guess = nearest(name, [*ARCHITECTURES, *PRESETS])
        hint = f" (did you mean '{guess}'?)" if guess else ""
        raise ToolkitError(
            f"unknown architecture or preset '{name}'{hint}, and no folder of that name; "
            "`toolkit arch list` shows them all"
        )
    if not (folder / "config.json").exists():
        raise ToolkitError(f"{folder} has no config.json; expected an HF model folder")
    config = json.loads((folder / "config.json").read_text())
    if any(folder.glob("*.safetensors")):
        return config.get("model_type", "?"), config, Checkpoint.scan(folder).shapes(), f"folder {folder}"
    register_auto_classes()  # a toolkit architecture's config.json needs its config class
    try:
        loaded = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as error:
        raise ToolkitError(f"{folder}/config.json: transformers cannot read it: {error}") from error
    return loaded.model_type, config, saved_tensors(meta_model(loaded)), f"folder {folder} (no weights)"


def _blocked(target: str, error: Exception) -> TargetVerdict:
    if isinstance(error, KeyError):  # a config.json without a field the plan reads
        return TargetVerdict(
            target, False, f"config has no value for `{error.args[0]}`, which the plan reads"
        )
    return TargetVerdict(target, False, str(error))


def _gguf(model_type: str, config: Config, tensors: Shapes) -> TargetVerdict:
    try:
        plan = gguf_plan(model_type)
        check_config(plan, config)
        jobs = plan_tensors(tensors, plan, config)
    except (ExportError, KeyError) as error:
        return _blocked("gguf", error)
    return TargetVerdict("gguf", True, f"llama.cpp graph `{plan.arch}`, {len(jobs)} tensors named", plan.arch)


def _vllm_native(model_type: str, config: Config, tensors: Shapes) -> TargetVerdict:
    try:
        route = choose_route(model_type, "native")
        class_name = route.model_class.__name__
        try:
            native = target_config(route, config, eos=[])
        except (TypeError, ValueError) as error:
            raise ExportError(f"the config does not convert to {class_name}'s: {error}") from error
        with torch.device("meta"):
            model = route.model_class(native)
        problem = _native_tensor_problem(route, model, tensors)
    except (ExportError, KeyError) as error:
        return _blocked("vllm-native", error)
    if problem:
        return TargetVerdict("vllm-native", False, problem)
    detail = f"`{class_name}` (model_type {route.target_model_type}), {len(tensors)} tensors fit"
    return TargetVerdict("vllm-native", True, detail, class_name)


def _native_tensor_problem(route: Route, model: PreTrainedModel, tensors: Shapes) -> str | None:
    """What keeps the renamed tensors from loading into the native class, as the export's load would find."""
    class_name = type(model).__name__
    known = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems: list[str] = []
    provided: set[str] = set()
    for name, (shape, _) in tensors.items():
        target = rename(name, route.tensor_renames)
        provided.add(target)
        landed = tuple(transform(target, torch.empty(shape, device="meta"), route.tensor_transforms).shape)
        if target not in known:
            problems.append(f"tensor `{name}` becomes `{target}`, which {class_name} does not have")
        elif landed != known[target]:
            problems.append(
                f"tensor `{name}` becomes `{target}` of shape {list(landed)}; {class_name}'s is "
                f"{list(known[target])}"
            )
    problems += [
        f"{class_name} needs `{name}`, which no tensor is renamed to"
        for name in saved_tensors(model)
        if name not in provided
    ]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}; the plan's tensor_renames and tensor_transforms must fit {class_name}"


def _ours(model_type: str) -> bool:
    """An architecture whose modelling code is this project's (a transformers one registered here is not)."""
    return model_type in ARCHITECTURES and not ARCHITECTURES[model_type].in_transformers


def _vllm_transformers(model_type: str) -> TargetVerdict:
    try:
        if _ours(model_type):  # served from a remote-code folder: the whole route must hold
            route = choose_route(model_type, "remote-code")
            how = "remote-code folder"
        else:  # a transformers architecture: vLLM loads transformers' own class
            plan = vllm_plan(model_type)
            route = choose_route(model_type, "native")
            require_attention_backend(model_type, plan, route.model_class)
            how = "transformers' own class, `--model-impl transformers`"
    except (ExportError, KeyError) as error:
        return _blocked("vllm-transformers", error)
    class_name = route.model_class.__name__
    return TargetVerdict("vllm-transformers", True, f"`{class_name}` ({how})", class_name)


def _remote_code(model_type: str) -> TargetVerdict:
    if not _ours(model_type):  # a transformers architecture: a Hub folder loads without any code
        if model_type in ARCHITECTURES:
            class_name = ARCHITECTURES[model_type].model_class.__name__
        else:  # transformers' own table, not the vLLM plan: a Hub folder does not depend on vLLM
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                return _blocked(
                    "remote-code",
                    ExportError(f"transformers has no causal LM class for model_type '{model_type}'"),
                )
            class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        return TargetVerdict(
            "remote-code", True, f"not needed: transformers' own `{class_name}` loads the folder", class_name
        )
    try:
        # The Hub folder carries the modelling files whatever vLLM can serve: no vLLM plan is read.
        arch = ARCHITECTURES[model_type]
        files, auto_map = remote_code_files(arch)
    except ExportError as error:
        return _blocked("remote-code", error)
    detail = f"{', '.join(sorted(files))}; auto_map {', '.join(auto_map)}"
    return TargetVerdict("remote-code", True, detail, arch.model_class.__name__)


def format_check(result: ArchCheck) -> str:
    """The verdicts as an aligned table, headed by what was checked."""
    rows = [(t.label, "ok" if t.ok else "blocked", t.detail) for t in result.targets]
    width = [max(len(r[i]) for r in [("target", "verdict", ""), *rows]) for i in range(2)]
    lines = [f"{result.name}: architecture `{result.model_type}`, {result.source}", ""]
    lines += [
        f"{a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip()
        for a, b, c in [("target", "verdict", "detail"), *rows]
    ]
    blocked = sum(not t.ok for t in result.targets)
    lines += ["", "every target is reachable" if not blocked else f"{blocked} of {len(rows)} targets blocked"]
    return "\n".join(lines)
