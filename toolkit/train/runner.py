"""The recipe runner: turns each validated stage into a TRL/Trainer run and writes the run folder.

    runs/<name>/recipe.yaml   the resolved recipe          runs/<name>/env.json   package versions, device
    runs/<name>/<stage>/      metrics.jsonl, plots/loss.png, checkpoints/, final/ (HF folder), eval.json

The same code runs on one CPU (`toolkit train`) and under `accelerate launch -m toolkit.train` on several
devices: the trainers do the distribution, the runner only keeps file writes on the main process. A stage
whose `final/` exists is complete (it appears by an atomic rename), so `--resume` skips it and resumes the
first incomplete stage from its last checkpoint. Nothing here knows about a particular architecture.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from toolkit.errors import RecipeError, ToolkitError
from toolkit.io import write_json, write_text
from toolkit.recipe import METHODS, Recipe, Stage, import_object, trainer_fields
from toolkit.train.callbacks import MetricsCallback, plot_metrics

# Which trainer runs a method, and whether it needs a frozen reference copy of the model.
TRAINERS: dict[str, tuple[str, bool]] = {
    "pretrain": ("trl:SFTTrainer", False),
    "sft": ("trl:SFTTrainer", False),
    "dpo": ("trl:DPOTrainer", True),
}
# Columns each trainer reads; sources may carry more (e.g. `task`), which the collators would trip on.
COLUMNS = {"text": ["text"], "messages": ["messages"], "preference": ["prompt", "chosen", "rejected"]}
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "gguf",
)


@dataclass
class StageResult:
    """What a stage left behind."""

    name: str
    method: str
    final: Path
    eval: dict[str, Any] | None
    skipped: bool = False


def cpu_only() -> bool:
    """True on a machine with no accelerator that torch can train on."""
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu and xpu.is_available())
    )


def distributed_state() -> PartialState:
    """Accelerate's process state. Its first creation fixes the backend for the whole process: on a CPU-only
    machine it must be told so, or processes started by `accelerate launch`/`torchrun` each run alone
    instead of joining one gloo group."""
    return PartialState(cpu=cpu_only())


# Activation checkpointing's trainer argument: transformers 5.2x renamed `gradient_checkpointing` (kept as a
# deprecated alias that yields to the new name), earlier 5.x releases have only the old name.
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")


def device_defaults(fields: set[str], train: dict[str, Any]) -> dict[str, Any]:
    """Trainer settings that depend on the hardware, applied under the recipe's own `train:` keys; `fields`
    are the trainer config's field names.

    TRL defaults to bf16 and activation checkpointing, which only slow a CPU down; on a GPU both stay. A recipe
    that names checkpointing under either name decides it: a default under the other name would override it.
    """
    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported()}
    defaults = {"bf16": False, "fp16": False, "dataloader_pin_memory": False, "use_cpu": cpu_only()}
    if not any(key in train for key in CHECKPOINTING_KEYS):
        defaults[next(key for key in CHECKPOINTING_KEYS if key in fields)] = False
    return defaults


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with every run so a result can be reproduced."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    state = distributed_state()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
    }


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> list[StageResult]:
    """Run every stage of `recipe` in order; returns what each stage produced."""
    state = distributed_state()
    run_dir = recipe.output_dir
    earlier_run = (run_dir / "recipe.yaml").exists()
    state.wait_for_everyone()  # every rank looks before the main process writes
    if earlier_run and not (resume or overwrite):
        raise RecipeError(
            f"{run_dir} holds an earlier run; pass --resume to continue it or --overwrite to start over"
        )
    if state.is_main_process:
        if overwrite and run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_json(run_dir / "env.json", environment())
    state.wait_for_everyone()

    results: list[StageResult] = []
    for stage in recipe.stages:
        set_seed(recipe.seed)
        stage_dir = run_dir / stage.name
        final = stage_dir / "final"
        if final.exists():
            print(f"[{stage.name}] already complete: {final}")
            results.append(StageResult(stage.name, stage.method, final, _read_eval(stage_dir), skipped=True))
            continue
        print(f"[{stage.name}] {stage.method} -> {stage_dir}")
        if stage.method == "tokenizer":
            with state.main_process_first():
                if not final.exists():
                    _train_tokenizer(stage, final)
            results.append(StageResult(stage.name, stage.method, final, None))
            continue
        if stage.method == "export":
            evaluation = _export(stage, run_dir, final) if state.is_main_process else None
            state.wait_for_everyone()
            results.append(StageResult(stage.name, stage.method, final, evaluation))
            continue
        model, tokenizer = _train(stage, recipe, stage_dir, resume)
        evaluation = None
        if stage.eval and state.is_main_process:
            evaluation = evaluate_stage(model, tokenizer, stage.eval)
            write_json(stage_dir / "eval.json", evaluation)
        state.wait_for_everyone()
        results.append(StageResult(stage.name, stage.method, final, evaluation))
        del model
    return results


def _read_eval(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def _train_tokenizer(stage: Stage, final: Path) -> None:
    from toolkit.data.tokenizer import train_tokenizer

    files = [s["path"] for s in stage.data["sources"]]
    for path in files:
        if not Path(path).exists():
            raise ToolkitError(f"stages.{stage.name}.data.sources: file not found: {path}")
    train_tokenizer(files, out_dir=final, **stage.tokenizer)


def _export(stage: Stage, run_dir: Path, final: Path) -> dict[str, Any]:
    """GGUF + Modelfile of an earlier stage into `final/` (atomically), verified; then `eval.tasks` through
    llama.cpp. A missed verification bound stops the run: an unverified file is not a result."""
    from eval.accuracy import score_answers
    from export.llama_cpp import chat_answers
    from export.ollama import export_ollama

    spec = stage.export
    source = run_dir / stage.model["from"] / "final"
    tmp = final.parent / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result = export_ollama(
        source, tmp, spec["quant"], system=spec.get("system"), force=True, verify=spec["verify"]
    )
    if not result.ok:
        raise ToolkitError(f"stages.{stage.name}: the GGUF missed a verification bound; see {tmp}")
    os.replace(tmp, final)
    gguf = final / result.gguf.path.name
    evaluation: dict[str, Any] = {
        "gguf": str(gguf),
        "verification": (result.gguf.report or {}).get("measures"),
    }
    if stage.eval and stage.eval.get("tasks"):
        rows = _read_jsonl(stage.eval["tasks"])[: stage.eval.get("limit")]
        answers = chat_answers(gguf, [r["prompt"] for r in rows], stage.eval.get("max_new_tokens", 24))
        evaluation["tasks"] = {
            **score_answers(rows, answers, stage.eval.get("samples", 5)),
            "runtime": "llama.cpp",
        }
    write_json(final.parent / "eval.json", evaluation)
    return evaluation


def resolve_model_path(stage: Stage, run_dir: Path) -> str:
    """Where a stage's starting weights come from: an earlier stage's `final/`, a local folder or a Hub id."""
    if "from" in stage.model:
        return str(run_dir / stage.model["from"] / "final")
    return str(stage.model["path"])


def load_tokenizer(stage: Stage, run_dir: Path) -> PreTrainedTokenizerBase:
    """The stage's tokenizer: a tokenizer stage's output, an explicit path/Hub id, or the model's own."""
    ref = stage.tokenizer
    if ref is None:
        source = resolve_model_path(stage, run_dir)
    elif (run_dir / ref / "final").exists():
        source = str(run_dir / ref / "final")
    else:
        source = ref
    trust = bool(stage.model.get("trust_remote_code", False))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError) as error:
        raise ToolkitError(f"stages.{stage.name}: cannot load a tokenizer from '{source}': {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; masks keep it out of the loss
    added = stage.model.get("add_special_tokens") or []
    # Special: never split, never merged with neighbours, kept whole by llama.cpp (exported as control tokens).
    # A token the vocabulary already has keeps its id and becomes special; a new one is appended.
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": list(added)})
    return tokenizer


def vocab_rows(stage: Stage, tokenizer: PreTrainedTokenizerBase) -> int:
    """Embedding rows for `tokenizer`: its length, rounded up to `model.pad_vocab_to_multiple_of` when set
    (tensor cores and K-quant blocks prefer multiples of 64; the GGUF export names the spare rows)."""
    multiple = stage.model.get("pad_vocab_to_multiple_of") or 1
    return -(-len(tokenizer) // multiple) * multiple


def load_model(stage: Stage, run_dir: Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh model from a preset (sized to the tokenizer), or pretrained weights (safetensors only)."""
    from toolkit.models import build_config, register_auto_classes

    register_auto_classes()
    spec = stage.model
    if "preset" in spec:
        config = build_config(
            spec["preset"],
            vocab_size=vocab_rows(stage, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **spec.get("config", {}),
        )
        if spec.get("attn_implementation"):
            config._attn_implementation = spec["attn_implementation"]
        return AutoModelForCausalLM.from_config(config)
    source = resolve_model_path(stage, run_dir)
    kwargs: dict[str, Any] = {
        "trust_remote_code": bool(spec.get("trust_remote_code", False)),  # never run remote code unasked
        "use_safetensors": True,  # no pickle: weights load from safetensors only
    }
    for key in ("dtype", "attn_implementation", "revision"):
        if spec.get(key):
            kwargs[key] = spec[key]
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ToolkitError(f"stages.{stage.name}.model: cannot load '{source}': {error}") from None
    if spec.get("config"):
        raise RecipeError(f"stages.{stage.name}.model.config: config overrides apply only to a preset")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Tokens added to the tokenizer need embedding rows; transformers starts them at the mean of the
        # existing rows (and the tied or separate LM head with them), so they begin as an average token.
        model.resize_token_embeddings(
            len(tokenizer), pad_to_multiple_of=stage.model.get("pad_vocab_to_multiple_of")
        )
    return model


def _load_data(stage: Stage, seed: int) -> tuple[Any, Any]:
    from toolkit.data.loading import DataSource, load_mixture

    kind = METHODS[stage.method].data_kind

    def mixture(key: str) -> Any:
        sources = [
            DataSource.from_dict(dict(s), where=f"stages.{stage.name}.data.{key}[{i}]")
            for i, s in enumerate(stage.data.get(key) or [])
        ]
        if not sources:
            return None
        dataset = load_mixture(sources, kind, seed=seed)
        return dataset.select_columns([c for c in COLUMNS[kind] if c in dataset.column_names])

    train, held_out = mixture("sources"), mixture("eval_sources")
    fraction = stage.data.get("eval_fraction")
    if fraction and held_out is None:
        split = train.train_test_split(test_size=fraction, seed=seed)
        train, held_out = split["train"], split["test"]
    return train, held_out


def _trainer_args(stage: Stage, recipe: Recipe, stage_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Any:
    method = METHODS[stage.method]
    values: dict[str, Any] = {
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "report_to": "none",
        **device_defaults(trainer_fields(stage.method), stage.train),
        **method.defaults,
    }
    if stage.method == "sft":
        # Learn the answers, not the prompts, when the template marks assistant turns. TRL's own test of the
        # markers: a plain substring test misses the whitespace-trimming `{%- generation %}` the toolkit's
        # template uses, and silently trained on the prompts too.
        from trl.chat_template_utils import has_generation_markers

        values["assistant_only_loss"] = bool(tokenizer.chat_template) and has_generation_markers(
            tokenizer.chat_template
        )
    values.update(stage.train)
    values["output_dir"] = str(stage_dir / "checkpoints")
    values["seed"] = recipe.seed
    try:
        return import_object(method.config_class)(**values)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"stages.{stage.name}.train: {error}") from None


def _peft_config(stage: Stage) -> Any:
    if not stage.peft:
        return None
    from peft import LoraConfig

    options = {k: v for k, v in stage.peft.items() if k != "method"}
    options.setdefault("task_type", "CAUSAL_LM")
    options.setdefault("target_modules", "all-linear")
    return LoraConfig(**options)


def _train(stage: Stage, recipe: Recipe, stage_dir: Path, resume: bool) -> tuple[PreTrainedModel, Any]:
    run_dir = recipe.output_dir
    tokenizer = load_tokenizer(stage, run_dir)
    model = load_model(stage, run_dir, tokenizer)
    with distributed_state().main_process_first():  # one rank fills the datasets cache, the others read it
        train_data, eval_data = _load_data(stage, recipe.seed)
    args = _trainer_args(stage, recipe, stage_dir, tokenizer)
    trainer_path, needs_reference = TRAINERS[stage.method]
    kwargs: dict[str, Any] = {}
    peft_config = _peft_config(stage)
    if needs_reference and peft_config is None:
        # TRL would rebuild the reference from config._name_or_path through a top-level transformers class,
        # which cannot resolve a custom architecture: hand it an explicit frozen copy instead.
        kwargs["ref_model"] = load_model(stage, run_dir, tokenizer)
    trainer = import_object(trainer_path)(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsCallback(stage_dir / "metrics.jsonl")],
        **kwargs,
    )
    checkpoint = get_last_checkpoint(args.output_dir) if resume and Path(args.output_dir).is_dir() else None
    if checkpoint:
        print(f"[{stage.name}] resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    model = trainer.model
    _save_final(trainer, model, tokenizer, stage_dir / "final")
    if trainer.is_world_process_zero():
        plot_metrics(
            stage_dir / "metrics.jsonl", stage_dir / "plots" / "loss.png", f"{recipe.name}: {stage.name}"
        )
    return model, tokenizer


def _save_final(
    trainer: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, final: Path
) -> None:
    """Write `final/` (weights or adapter, tokenizer, chat template, generation config) atomically."""
    from eval.accuracy import end_of_turn_ids

    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        # Every end-of-turn token stops generation, in transformers and in whatever serves the export.
        generation_config.eos_token_id = end_of_turn_ids(tokenizer)
        generation_config.pad_token_id = tokenizer.pad_token_id
    # Every rank calls save_model (it is a collective under FSDP/ZeRO-3); only the main process writes.
    # The folder is filled under a temporary name and renamed: `final/` exists only when complete.
    tmp = final.parent / ".final.tmp"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if main:
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()


def evaluate_stage(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any]) -> dict:
    """The stage's `eval:` section: task accuracy on a checkable-task file and/or perplexity on a text file."""
    from eval.accuracy import task_accuracy
    from eval.perplexity import perplexity

    result: dict[str, Any] = {}
    if spec.get("tasks"):
        rows = _read_jsonl(spec["tasks"])[: spec.get("limit")]
        result["tasks"] = task_accuracy(
            model,
            tokenizer,
            rows,
            max_new_tokens=spec.get("max_new_tokens", 24),
            batch_size=spec.get("batch_size", 32),
            samples=spec.get("samples", 5),
        )
    if spec.get("perplexity"):
        texts = [r["text"] for r in _read_jsonl(spec["perplexity"])]
        result["perplexity"] = perplexity(model, tokenizer, texts)
    return result


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise ToolkitError(f"eval file not found: {path}")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
