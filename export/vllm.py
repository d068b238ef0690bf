"""vLLM export: a run or HF folder becomes a folder that `vllm serve DIR` accepts as it is, then verified.

The architecture's export plan (`toolkit.models.plans.VLLMPlan`) says which of two forms it can take:
- native: config keys and tensor names are rewritten into a transformers architecture vLLM implements itself
  (`decoder` -> `LlamaForCausalLM`); native Hub folders (llama, mistral, qwen2) are copied and normalised the
  same way. vLLM then runs its own, fastest kernels.
- remote code: the architecture's modelling files are copied into the folder and `config.json` gets an
  `auto_map` (AutoConfig, AutoModel, AutoModelForCausalLM), so `from_pretrained(..., trust_remote_code=True)`
  and vLLM's Transformers backend work where forge-toolkit is not installed. Imports of the copied files are
  checked (and absolute imports of each other rewritten as relative ones) before anything is written.

Either way the folder holds safetensors weights (sharded past `max_shard_size`) in a dtype vLLM accepts,
`generation_config.json` whose eos lists every end-of-turn token, the tokenizer files and the chat template.
A LoRA run gives `merged/` (the merged model), `adapter/` (for `vllm serve --enable-lora --lora-modules`) and
`base/` (the adapter's base, rewritten the same way so that vLLM can load it); an adapter vLLM's LoRA loader
refuses (whole embedding rows after added tokens, DoRA, LoRA biases) gives `merged/` only, and the report
says why. The folder is built under a
temporary name beside its target and renamed into place; verification (`export/verify_hf.py`) runs in a clean
process before the rename and its figures go to `export_report.json`.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.source import resolve_source
from toolkit.errors import ExportError
from toolkit.io import atomic_path, write_json
from toolkit.models.plans import VLLMPlan, get_plan
from toolkit.models.registry import ARCHITECTURES, Architecture

FORMS = ("auto", "native", "remote-code")
# Where an export is verified: a clean process always; vLLM itself when asked, or in "auto" where it is set up.
VERIFY_IN = ("auto", "clean", "vllm")
# What vLLM's `--dtype` accepts for weights; "auto" keeps the source's when it is one of these.
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Rewritten or re-derived for the target; everything else in config.json is carried over (renamed per plan).
DERIVED_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "transformers_version",
    "auto_map",
    "_name_or_path",
    "dtype",
)
# Copied modelling files may import these and the standard library: all are installed wherever transformers is.
ALLOWED_IMPORTS = frozenset({"torch", "transformers", "huggingface_hub", "safetensors", "tokenizers"})
# Named layout changes a plan's `tensor_transforms` may ask for; the plan stays data, the code lives here.
TENSOR_TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "transpose": lambda tensor: tensor.t().contiguous(),  # nn.Linear's [out, in] <-> Conv1D's [in, out]
}


@dataclass
class Route:
    """The form an export takes: the class that writes it and, for remote code, the files that travel."""

    form: str
    model_class: type
    target_model_type: str
    tensor_renames: tuple[tuple[str, str], ...] = ()
    tensor_transforms: tuple[tuple[str, str], ...] = ()
    config_keys: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> source text (imports rewritten)
    auto_map: dict[str, str] = field(default_factory=dict)

    @property
    def expected_class(self) -> str:
        """A regex of the class a clean process must load: transformers' own, or the folder's remote code
        (`transformers_modules.<folder>.<hash>.<file>.<Class>`, where folder and hash vary)."""
        if self.form == "native":
            return re.escape(f"{self.model_class.__module__}.{self.model_class.__qualname__}")
        return rf"transformers_modules\..*\.{re.escape(self.model_class.__qualname__)}"


@dataclass
class VLLMResult:
    """What `export_vllm` wrote and measured."""

    path: Path
    form: str
    dtype: str
    seconds: float
    report: dict[str, Any]
    model_dir: Path  # the folder to serve: `path`, or `path/merged` for a LoRA run
    adapter_dir: Path | None = None
    base_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return bool(self.report.get("ok", True))


def vllm_plan(model_type: str) -> VLLMPlan:
    plan = get_plan(model_type).vllm
    if plan is None:
        raise ExportError(f"architecture '{model_type}' declares no vLLM export in its plan")
    return plan


def _refusal(model_type: str, plan: VLLMPlan, why: str) -> ExportError:
    reason = plan.blocker or why
    return ExportError(f"architecture '{model_type}' cannot be served by vLLM: {reason}")


def choose_route(model_type: str, form: str = "auto") -> Route:
    """The export form for `model_type`, or an error naming what blocks it; nothing is written here."""
    import transformers

    if form not in FORMS:
        raise ExportError(f"unknown form '{form}'; choose one of {', '.join(FORMS)}")
    plan = vllm_plan(model_type)
    if form == "auto":
        form = "native" if plan.architecture else "remote-code"
    if form == "native":
        if not plan.architecture:
            raise _refusal(model_type, plan, "its plan names no native transformers architecture")
        model_class = getattr(transformers, plan.architecture, None)
        if model_class is None:
            raise ExportError(
                f"the plan of '{model_type}' names {plan.architecture}, which transformers "
                f"{transformers.__version__} does not have"
            )
        unknown = [name for _, name in plan.tensor_transforms if name not in TENSOR_TRANSFORMS]
        if unknown:
            raise ExportError(
                f"the plan of '{model_type}' names tensor transform '{unknown[0]}'; "
                f"known: {', '.join(TENSOR_TRANSFORMS)}"
            )
        return Route(
            "native",
            model_class,
            plan.model_type or "",
            plan.tensor_renames,
            plan.tensor_transforms,
            dict(plan.config_keys),
        )
    return _remote_code_route(model_type, plan)


def _remote_code_route(model_type: str, plan: VLLMPlan) -> Route:
    arch = remote_code_architecture(model_type, plan)
    require_attention_backend(model_type, plan, arch.causal_lm_class)
    files, auto_map = remote_code_files(arch)
    return Route("remote-code", arch.causal_lm_class, model_type, files=files, auto_map=auto_map)


def remote_code_architecture(model_type: str, plan: VLLMPlan) -> Architecture:
    """The toolkit architecture whose modelling files a remote-code folder carries, or why there is none."""
    if not plan.remote_code:
        why = "its plan does not declare remote code (VLLMPlan.remote_code)"
        if not plan.architecture:
            why = "its plan declares neither a native architecture nor remote code"
        raise _refusal(model_type, plan, why)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"'{model_type}' is not one of the toolkit's architectures, so it has no modelling files to copy; "
            "export it with --form native"
        )
    return arch


def require_attention_backend(model_type: str, plan: VLLMPlan, model_class: type) -> None:
    """vLLM's Transformers backend serves only models that route attention through ALL_ATTENTION_FUNCTIONS."""
    if not getattr(model_class, "_supports_attention_backend", False):
        raise _refusal(
            model_type,
            plan,
            f"{model_class.__name__} does not declare `_supports_attention_backend = True` "
            "(attention through transformers' attention interface), which vLLM's Transformers backend needs",
        )


def remote_code_files(arch: Architecture) -> tuple[dict[str, str], dict[str, str]]:
    """The modelling files a remote-code folder carries (name -> source text) and its `auto_map`."""
    classes = {"AutoConfig": arch.config_class, "AutoModel": arch.base_model_class}
    if arch.is_language_model:
        classes["AutoModelForCausalLM"] = arch.causal_lm_class
    package = arch.model_class.__module__.rpartition(".")[0]
    files = portable_sources([inspect.getsourcefile(cls) for cls in classes.values()], package)
    auto_map = {
        auto: f"{Path(inspect.getsourcefile(cls)).stem}.{cls.__name__}" for auto, cls in classes.items()
    }
    return files, auto_map


def portable_sources(paths: list[str | None], package: str) -> dict[str, str]:
    """The source text of `paths` and of every sibling module they import, made loadable on their own.

    Relative imports stay (transformers copies sibling files of remote code); absolute imports of a copied
    module become relative ones; any other import must be the standard library or a package transformers
    itself depends on. Anything else is an error naming file and line.
    """
    pending = [Path(p) for p in paths if p]
    if len(pending) != len(paths):
        raise ExportError("an architecture class has no source file to copy (was it defined interactively?)")
    folder = pending[0].parent
    sources: dict[str, str] = {}
    while pending:
        path = pending.pop()
        if path.name in sources:
            continue
        if path.parent != folder:
            raise ExportError(
                f"{path}: modelling files must live in one folder ({folder}) to be copied together"
            )
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                siblings = [node.module] if node.module else [alias.name for alias in node.names]
                pending.extend(folder / f"{name}.py" for name in siblings)
            elif (
                isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith(package + ".")
            ):
                leaf = node.module[len(package) + 1 :]
                if "." in leaf or not (folder / f"{leaf}.py").exists():
                    raise ExportError(
                        f"{path}:{node.lineno}: imports {node.module}, which is not a sibling module"
                    )
                line = lines[node.lineno - 1]
                lines[node.lineno - 1] = line.replace(f"from {node.module} import", f"from .{leaf} import", 1)
                pending.append(folder / f"{leaf}.py")
            elif isinstance(node, ast.ImportFrom | ast.Import):
                level = getattr(node, "level", 0)  # deeper relative imports leave the copied folder
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    top = (name or "").split(".")[0]
                    if level or (top not in ALLOWED_IMPORTS and top not in sys.stdlib_module_names):
                        raise ExportError(
                            f"{path}:{node.lineno}: imports {'.' * level}{name or ''}, which a machine "
                            f"without forge-toolkit lacks; modelling files may import only "
                            f"{', '.join(sorted(ALLOWED_IMPORTS))} and the standard library"
                        )
        sources[path.name] = "".join(lines)
    return sources


def resolve_dtype(dtype: str, config: dict[str, Any]) -> str:
    """The weights' dtype: `dtype`, or with "auto" the source's when vLLM accepts it, else bfloat16."""
    if dtype == "auto":
        source = config.get("dtype") or config.get("torch_dtype") or "float32"
        return source if source in DTYPES else "bfloat16"
    if dtype not in DTYPES:
        raise ExportError(f"dtype '{dtype}' is not one vLLM serves; choose one of auto, {', '.join(DTYPES)}")
    return dtype


def rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


def transform(name: str, tensor: Any, transforms: tuple[tuple[str, str], ...]) -> Any:
    """`tensor` (already renamed to `name`) through every plan transform whose pattern matches `name`."""
    for pattern, kind in transforms:
        if re.search(pattern, name):
            tensor = TENSOR_TRANSFORMS[kind](tensor)
    return tensor


def end_of_turn_ids(tokenizer_folder: Path, model_folder: Path) -> list[int]:
    """Every token that ends a turn (toolkit.data.tokenizer.end_of_turn_ids: the template's, the tokenizer's
    and the model configs' EOS), for the exported folder's generation config."""
    from transformers import AutoTokenizer

    from toolkit.data.tokenizer import end_of_turn_ids as ids
    from toolkit.data.tokenizer import folder_eos_ids

    return ids(AutoTokenizer.from_pretrained(tokenizer_folder), folder_eos_ids(model_folder))


def target_config(route: Route, config: dict[str, Any], eos: list[int]) -> Any:
    """The target's config: `config` (a config.json) with keys renamed per plan and serving defaults."""
    from transformers import AutoConfig

    values: dict[str, Any] = {}
    for key, value in config.items():
        if key not in DERIVED_CONFIG_KEYS:
            targets = route.config_keys.get(key, key)
            values.update(dict.fromkeys((targets,) if isinstance(targets, str) else targets, value))
    values["eos_token_id"] = eos if len(eos) > 1 else (eos[0] if eos else None)
    values["use_cache"] = True  # training runs save use_cache=False; serving wants the KV cache
    if route.form == "native":
        target = AutoConfig.for_model(route.target_model_type, **values)
    else:
        target = route.model_class.config_class(**values)
        target.auto_map = route.auto_map
    return target


def write_model_folder(
    folder: Path, out: Path, route: Route, dtype: str, max_shard_size: str, tokenizer_from: Path | None = None
) -> list[int]:
    """Write the servable form of the HF folder `folder` into the (new, empty) folder `out`; returns the
    eos ids written to its generation config."""
    import torch
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    config = json.loads((folder / "config.json").read_text())
    eos = end_of_turn_ids(tokenizer_from or folder, folder)
    target = target_config(route, config, eos)
    torch_dtype = getattr(torch, dtype)
    state: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            target_name = rename(name, route.tensor_renames)
            state[target_name] = transform(
                target_name,
                tensor.to(torch_dtype) if tensor.is_floating_point() else tensor,
                route.tensor_transforms,
            )
    model, info = route.model_class.from_pretrained(
        None, config=target, state_dict=state, dtype=torch_dtype, output_loading_info=True
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v} | (
        {"errors": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise ExportError(
            f"the weights of {folder} do not fit {route.model_class.__name__} after renaming: {problems}; "
            "the plan's tensor_renames must map every checkpoint tensor"
        )
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for name, text in route.files.items():
        (out / name).write_text(text, encoding="utf-8")

    generation = (
        GenerationConfig.from_pretrained(folder)
        if (folder / "generation_config.json").exists()
        else GenerationConfig.from_model_config(target)
    )
    generation.eos_token_id = eos
    _copy_tokenizer(tokenizer_from or folder, folder, out)
    if generation.pad_token_id is None and config.get("pad_token_id") is not None:
        generation.pad_token_id = config["pad_token_id"]
    generation.save_pretrained(out)
    return eos


def _copy_tokenizer(*candidates_and_out: Path) -> None:
    *candidates, out = candidates_and_out
    for name in TOKENIZER_FILES:
        for folder in candidates:
            if (folder / name).exists():
                shutil.copy(folder / name, out / name)
                break
    if not (out / "tokenizer_config.json").exists() and not (out / "tokenizer.json").exists():
        raise ExportError(f"no tokenizer files in {', '.join(map(str, candidates))}; vLLM needs one")


def write_adapter(adapter_dir: Path, out: Path, route: Route, base_dir: Path) -> None:
    """The LoRA adapter with tensor names in the target layout and its base pointing at `base_dir`."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise ExportError(
            f"{adapter_dir} has no adapter_model.safetensors (save with safe_serialization=True)"
        )
    tensors = {rename(k, route.tensor_renames): v for k, v in load_file(weights).items()}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    _copy_tokenizer(adapter_dir, out)


def export_vllm(
    src: str | Path,
    out: str | Path | None = None,
    *,
    form: str = "auto",
    dtype: str = "auto",
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    verify: bool = True,
    verify_in: str = "auto",
) -> VLLMResult:
    """Export SRC (run, stage, HF or LoRA folder) to a vLLM-servable folder, verified unless told not.

    Verification always loads the folder in a clean process without forge-toolkit (`export/verify_hf.py`);
    with `verify_in` "vllm", or "auto" where a vLLM environment exists, vLLM itself serves it too
    (`export/verify_vllm.py`); "clean" skips vLLM. Everything that can refuse (plan, form, dtype,
    modelling-file imports, existing output, a missing vLLM environment that was asked for) refuses before
    anything is written. `export_report.json` in the folder holds the form and the measured parity.
    """
    from export.verify_hf import source_reference, verify_folder
    from export.verify_vllm import require_vllm_python, verify_in_vllm, vllm_python
    from toolkit.models import register_auto_classes

    register_auto_classes()  # the source's config and tokenizer are read through the Auto classes
    if verify_in not in VERIFY_IN:
        raise ExportError(f"verify_in '{verify_in}' is not one of {', '.join(VERIFY_IN)}")
    python = None
    if verify and verify_in != "clean":
        python = require_vllm_python() if verify_in == "vllm" else vllm_python()
    started = time.perf_counter()
    source = resolve_source(src, prompts=_prompts())
    try:
        out_path = Path(out) if out is not None else source.output_folder("vllm")
        if out_path.exists() and not force:
            raise ExportError(f"{out_path} exists; pass --force to replace it")
        config = json.loads((source.folder / "config.json").read_text())
        model_type = config.get("model_type", "?")
        route = choose_route(model_type, form)
        dtype = resolve_dtype(dtype, config)
        if not any((source.folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ExportError(
                f"{source.folder} has no tokenizer files; vLLM needs the tokenizer beside the weights"
            )
        lora = source.lora
        if lora and route.tensor_transforms:
            # A transposed base weight would need the adapter's own layout flag (PEFT's fan_in_fan_out) too.
            raise ExportError(
                f"architecture '{model_type}' changes tensor layouts on its way to "
                f"{route.model_class.__name__}, which LoRA adapters cannot follow; merge the adapter first"
            )
        base = Path(lora["base"]) if lora else None
        if base is not None and not (base / "config.json").exists():
            raise ExportError(f"the LoRA base {base} is not a local model folder; export needs its weights")

        final = out_path.resolve()
        with atomic_path(out_path, is_dir=True) as tmp:
            model_dir = tmp / "merged" if lora else tmp
            model_dir.mkdir(exist_ok=True)
            eos = write_model_folder(source.folder, model_dir, route, dtype, max_shard_size)
            report: dict[str, Any] = {
                "target": "vllm",
                "source": lora["adapter"] if lora else str(source.folder),
                "run_dir": str(source.run_dir) if source.run_dir else None,
                "source_model_type": model_type,
                "form": route.form,
                "model_type": json.loads((model_dir / "config.json").read_text())["model_type"],
                "architecture": route.model_class.__name__,
                "dtype": dtype,
                "eos_token_id": eos,
                "max_shard_size": max_shard_size,
                "lora": lora,
            }
            # An adapter vLLM's LoRA loader refuses (whole embedding rows, DoRA, LoRA biases: the merge's
            # verdict) is served merged only; base/ + adapter/ would be a folder vLLM cannot load.
            servable = bool(lora) and lora["vllm"].startswith("yes")
            if lora and not servable:
                report["layout"] = {"merged": "merged"}
                report["adapter"] = f"not written: {lora['vllm'].removeprefix('no: ')}"
            elif lora:
                write_model_folder(base, tmp / "base", route, dtype, max_shard_size, tokenizer_from=base)
                write_adapter(Path(lora["adapter"]), tmp / "adapter", route, final / "base")
                report["layout"] = {"merged": "merged", "base": "base", "adapter": "adapter"}
            remote = route.form == "remote-code"
            if verify:
                in_vllm = python is not None
                model_source = source_reference(source.folder, dtype, vllm_rows=in_vllm)
                checks = {
                    "model": verify_folder(
                        model_dir,
                        source.folder,
                        dtype=dtype,
                        remote_code=remote,
                        expected_class=route.expected_class,
                        source=model_source,
                    )
                }
                if in_vllm:
                    checks["vllm"] = verify_in_vllm(model_dir, model_source, form=route.form, python=python)
                if servable:
                    adapter_source = source_reference(base, dtype, Path(lora["adapter"]), vllm_rows=in_vllm)
                    checks["adapter"] = verify_folder(
                        tmp / "base",
                        base,
                        dtype=dtype,
                        remote_code=remote,
                        expected_class=route.expected_class,
                        adapter=tmp / "adapter",
                        source=adapter_source,
                    )
                    if in_vllm:
                        checks["vllm_adapter"] = verify_in_vllm(
                            tmp / "base",
                            adapter_source,
                            form=route.form,
                            adapter=tmp / "adapter",
                            python=python,
                        )
                report["verification"] = checks
                report["verified_in"] = ["clean"] + (["vllm"] if in_vllm else [])
                report["ok"] = all(section["ok"] for section in checks.values())
            report["seconds"] = time.perf_counter() - started
            write_json(tmp / "export_report.json", report)
        return VLLMResult(
            path=out_path,
            form=route.form,
            dtype=dtype,
            seconds=report["seconds"],
            report=report,
            model_dir=out_path / "merged" if lora else out_path,
            adapter_dir=out_path / "adapter" if servable else None,
            base_dir=out_path / "base" if servable else None,
        )
    finally:
        source.cleanup()


def _prompts() -> list[str]:
    from export.verify import PROMPTS

    return PROMPTS
