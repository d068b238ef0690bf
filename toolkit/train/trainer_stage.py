"""The generic trainer stage: every training method (pretrain, sft, dpo, grpo, rloo, ...) is this one function,
parametrised by its `TrainerSpec` in the stage registry.

It loads the tokenizer and the model (a fresh preset, an earlier stage's `final/`, a folder or a Hub id), the
data as the method's row kind, builds the method's TRL config from the recipe's `train:` keys over the
toolkit's defaults, builds the trainer with whatever the method adds (a reference model, reward functions),
trains (resuming from the newest complete checkpoint when asked), and writes `final/` atomically with the
tokenizer, the chat template and a generation config that stops at every end-of-turn token.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
)

from toolkit.data.tokenizer import end_of_turn_ids
from toolkit.errors import RecipeError, ToolkitError, unknown_key_message
from toolkit.io import write_text
from toolkit.recipe import TOOLKIT_TRAIN_KEYS, Stage
from toolkit.run_folder import read_metrics
from toolkit.stages import StageContext, StageOutcome, TrainerSpec, resolve
from toolkit.train.callbacks import MetricsCallback, ModelLogCallback, plot_stage
from toolkit.train.checkpoints import checkpoint_step, resume_checkpoint

# Activation checkpointing's trainer argument: transformers 5.2x renamed `gradient_checkpointing` (kept as a
# deprecated alias that yields to the new name), earlier 5.x releases have only the old name.
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")


def cpu_only() -> bool:
    """True on a machine with no accelerator that torch can train on."""
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu and xpu.is_available())
    )


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes in bf16 itself (AVX512-BF16 or AMX): only there does bf16 autocast pay."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume none (macOS CPUs train on MPS, where this is not asked)
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def launcher_precision_override(train: dict[str, Any]) -> str | None:
    """Switch off the mixed precision an Accelerate config set (`mixed_precision: bf16` becomes
    ACCELERATE_MIXED_PRECISION, which transformers passes to Accelerate whenever the recipe sets neither bf16
    nor fp16), on a CPU without native bf16: there autocast emulates it, and a 2-process DDP step of the
    quickstart's pretrain took 7-15 s against 0.6-0.7 s without. Returns the warning, None when nothing changed.
    A recipe that asks for bf16 or fp16 itself keeps it."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("bf16", "fp16") or not cpu_only() or train.get("bf16") or train.get("fp16"):
        return None
    if launched == "bf16" and cpu_has_native_bf16():
        return None
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    return (
        f"warning: the launcher's mixed_precision {launched} is switched off: this CPU has no native {launched}, "
        "where autocast only slows training (set train.bf16: true to keep it)"
    )


def fsdp_wrap_problem(model: Any) -> str | None:
    """Why FSDP, as the launcher configured it, cannot wrap `model` (None when it can): transformer-based
    wrapping shards block by block, and names the blocks by the model's `_no_split_modules` unless the config
    lists the classes itself; a model that declares none would fail deep inside Accelerate."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return None
    if os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP":
        return None
    if os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or getattr(model, "_no_split_modules", None):
        return None
    return (
        f"{type(model).__name__} declares no `_no_split_modules`, which FSDP's TRANSFORMER_BASED_WRAP "
        "wraps by; name its block class in the Accelerate config (fsdp_transformer_layer_cls_to_wrap) or use "
        "fsdp_auto_wrap_policy: SIZE_BASED_WRAP"
    )


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


def resolve_model_path(stage: Stage, run_dir: Path, spec: dict[str, Any] | None = None) -> str:
    """Where a stage's starting weights come from (or, given `spec`, another model section's such as a
    teacher's): an earlier stage's `final/` (`from` or `stage`), a local folder or a Hub id (`path`).
    An earlier stage that trained a LoRA adapter hands on its adapter merged into its base (`merged_adapter`),
    so that the stage trains (and names as its own adapter's base) the model that stage ended with."""
    spec = stage.model if spec is None else spec
    earlier = spec.get("from") or spec.get("stage")
    if earlier:
        final = run_dir / earlier / "final"
        if (final / "adapter_config.json").exists():
            return str(merged_adapter(final))
        return str(final)
    return str(spec["path"])


def merged_adapter(adapter: Path) -> Path:
    """`<stage>/merged/`: the LoRA adapter in `adapter` merged into its full-precision base
    (`toolkit.train.adapters.merge_adapter`: float32, never into 4-bit weights, a resized vocabulary
    handled), written once, atomically, by the main process. An absolute path: the next adapter names it as
    its base, and the run folder may be used from anywhere."""
    from toolkit.train.adapters import format_report, merge_adapter
    from toolkit.train.runner import distributed_state

    merged = (adapter.parent / "merged").resolve()
    with distributed_state().main_process_first():
        if (merged / "config.json").exists() or not distributed_state().is_main_process:
            return merged
        print(format_report(merge_adapter(adapter, merged)), flush=True)
    return merged


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


# TrainerSpec.model_class -> the Auto class that builds it, and what it needs besides the config.
MODEL_CLASSES: dict[str, tuple[type, dict[str, Any]]] = {
    "causal_lm": (AutoModelForCausalLM, {}),
    # One score per sequence: what TRL's RewardTrainer and GRPO's model rewards read.
    "sequence_classification": (AutoModelForSequenceClassification, {"num_labels": 1}),
}


def load_pretrained(
    source: str, spec: dict[str, Any], where: str, model_class: str = "causal_lm"
) -> PreTrainedModel:
    """Pretrained weights from a folder or Hub id, safetensors only, remote code only when `spec` asks for it."""
    from toolkit.models import register_auto_classes

    register_auto_classes()
    auto, extra = MODEL_CLASSES[model_class]
    kwargs: dict[str, Any] = {
        "trust_remote_code": bool(spec.get("trust_remote_code", False)),  # never run remote code unasked
        "use_safetensors": True,  # no pickle: weights load from safetensors only
        **extra,
    }
    for key in ("dtype", "attn_implementation", "revision", "quantization_config"):
        if spec.get(key):
            kwargs[key] = spec[key]
    if spec.get("config"):
        kwargs["config"] = overridden_config(source, spec, where)
    try:
        return auto.from_pretrained(source, **kwargs)
    except ImportError as error:  # bitsandbytes missing, or too old for this machine
        raise ToolkitError(f"{where}.quantization: {error}") from None
    except (OSError, ValueError) as error:
        raise ToolkitError(f"{where}: cannot load '{source}': {error}") from None
    except RuntimeError as error:  # transformers refuses weights of other shapes than the config's
        if not spec.get("config") or "mismatched_sizes" not in str(error):
            raise
        raise ToolkitError(
            f"{where}.config: {', '.join(spec['config'])} would change the shapes of the weights in '{source}'; "
            "only keys that change how the model runs may be set over a pretrained model"
        ) from None


def overridden_config(source: str, spec: dict[str, Any], where: str) -> Any:
    """A pretrained model's config with `model.config` set over it: the keys that change how the model runs
    (cognate's recursion depth, halting, attention window), never its weights' shapes, which the weights were
    trained at (a shape change is refused by name when the weights load)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        source, trust_remote_code=bool(spec.get("trust_remote_code", False)), revision=spec.get("revision")
    )
    known = config.to_dict()
    for key, value in spec["config"].items():
        if key not in known:
            raise RecipeError(unknown_key_message(key, known, f"{where}.config ({config.model_type} config)"))
        setattr(config, key, value)
    return config


def load_model(
    stage: Stage, run_dir: Path, tokenizer: PreTrainedTokenizerBase, model_class: str = "causal_lm"
) -> PreTrainedModel:
    """A fresh model from a preset (sized to the tokenizer), or pretrained weights (safetensors only), as
    `model_class` (a causal LM, or a score head for reward models)."""
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
        auto, extra = MODEL_CLASSES[model_class]
        for key, value in extra.items():
            setattr(config, key, value)
        return bitnet(auto.from_config(config), stage)
    if spec.get("quantization") and not is_bitnet(stage):
        spec = {**spec, "quantization_config": quantization_config(stage)}
    model = bitnet(
        load_pretrained(resolve_model_path(stage, run_dir), spec, f"stages.{stage.name}.model", model_class),
        stage,
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Tokens added to the tokenizer need embedding rows; transformers starts them at the mean of the
        # existing rows (and the tied or separate LM head with them), so they begin as an average token.
        model.resize_token_embeddings(
            len(tokenizer), pad_to_multiple_of=stage.model.get("pad_vocab_to_multiple_of")
        )
    return model


def is_bitnet(stage: Stage) -> bool:
    """Whether the stage trains BitNet's ternary layers: `model.quantization: {method: bitnet}`, or a preset of
    the `bitnet` family, which is BitNet by definition."""
    if (stage.model.get("quantization") or {}).get("method") == "bitnet":
        return True
    if "preset" not in stage.model:
        return False
    from toolkit.models import get_preset

    return get_preset(stage.model["preset"]).arch == "bitnet"


def bitnet(model: PreTrainedModel, stage: Stage) -> PreTrainedModel:
    """The model with BitNet's ternary linear layers when `model.quantization` asks for them
    (toolkit.quantization.bitnet); a checkpoint already trained so reloads with them by itself."""
    if not is_bitnet(stage):
        return model
    from toolkit.quantization.bitnet import to_bitnet

    if (getattr(model.config, "quantization_config", None) or {}) and getattr(model, "hf_quantizer", None):
        return model  # a BitNet checkpoint: transformers' quantizer restored its layers
    if staged_options(stage) is not None:
        return model  # staged: its layer groups turn ternary one by one as the stage trains (run_staged)
    converted = to_bitnet(model, (stage.model.get("quantization") or {}).get("exclude"))
    print(
        f"[{stage.name}] BitNet b1.58: {len(converted)} linear layers ternary (absmean), 8-bit activations",
        flush=True,
    )
    return model


def quantization_config(stage: Stage) -> Any:
    """`model.quantization` as transformers' BitsAndBytesConfig (QLoRA: a 4-bit base under a LoRA adapter);
    compute and storage dtypes given by name ("bfloat16") become torch dtypes."""
    from transformers import BitsAndBytesConfig

    options = dict(stage.model["quantization"])
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(options.get(key), str):
            options[key] = getattr(torch, options[key])
    return BitsAndBytesConfig(**options)


def load_data(stage: Stage, kind: str, spec: TrainerSpec, seed: int) -> tuple[Any, Any]:
    """The stage's training (and held-out) rows as `kind`, with the columns the trainer reads."""
    from toolkit.data.loading import DataSource, load_mixture

    def mixture(key: str) -> Any:
        sources = [
            DataSource.from_dict(dict(s), where=f"stages.{stage.name}.data.{key}[{i}]")
            for i, s in enumerate(stage.data.get(key) or [])
        ]
        if not sources:
            return None
        dataset = load_mixture(sources, kind, seed=seed)
        if spec.keep_columns:
            return dataset
        return dataset.select_columns([c for c in spec.columns if c in dataset.column_names])

    train, held_out = mixture("sources"), mixture("eval_sources")
    fraction = stage.data.get("eval_fraction")
    if fraction and held_out is None:
        split = train.train_test_split(test_size=fraction, seed=seed)
        train, held_out = split["train"], split["test"]
    return train, held_out


def trainer_args(
    ctx: StageContext,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: Path | None = None,
    seed_offset: int = 0,
) -> Any:
    """The method's TRL config: runner defaults, then the hardware's, the method's, what the method derives
    from the stage, and last the recipe's own `train:` keys, which win. Checkpoints go to `output_dir` (the
    stage's `checkpoints/`); `seed_offset` moves the seed (a staged quantization's later groups draw other
    batches)."""
    stage, spec = ctx.stage, ctx.kind.trainer
    config_class = resolve(spec.config)
    from toolkit.recipe import trainer_fields

    values: dict[str, Any] = {
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "report_to": "none",
        **device_defaults(trainer_fields(stage.method), stage.train),
        **spec.defaults,
    }
    if spec.config_values:
        values.update(resolve(spec.config_values)(ctx, tokenizer))
    values.update({k: v for k, v in stage.train.items() if k not in TOOLKIT_TRAIN_KEYS})
    if values.get("optim") == "muon":  # built by the stage (toolkit/train/optimizers.py), not by the Trainer
        values.pop("optim")
    if warning := launcher_precision_override(stage.train):
        from toolkit.train.runner import distributed_state

        if distributed_state().is_main_process:
            print(warning, flush=True)
    values["output_dir"] = str(output_dir or ctx.folder.checkpoints)
    values["seed"] = ctx.recipe.seed + seed_offset
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"stages.{stage.name}.train: {error}") from None


def peft_config(stage: Stage, model: PreTrainedModel | None = None) -> Any:
    """The `peft:` section as a LoraConfig (DoRA: `use_dora`, rsLoRA: `use_rslora`; QLoRA: this over a
    `model.quantization` base). Default targets: the linear layers a toolkit architecture declares, else
    PEFT's own table for Hub model types, else every linear layer but the head. Every named target must match
    a module of `model`: PEFT fails only when none does, so a misspelt one would silently train less."""
    if not stage.peft:
        return None
    from peft import LoraConfig

    from toolkit.models import ARCHITECTURES

    options = {k: v for k, v in stage.peft.items() if k != "method"}
    # A score head (reward model) is SEQ_CLS: PEFT then trains and saves the new head beside the adapter.
    scorer = model is not None and type(model).__name__.endswith("ForSequenceClassification")
    options.setdefault("task_type", "SEQ_CLS" if scorer else "CAUSAL_LM")
    if "target_modules" not in options and model is not None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        arch = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
        if arch is not None and arch.adapter_targets:
            options["target_modules"] = list(arch.adapter_targets)
        elif model.config.model_type not in PEFT_DEFAULTS:
            options["target_modules"] = "all-linear"
    if model is not None and isinstance(options.get("target_modules"), list):
        _check_targets(stage, model, options["target_modules"])
    return LoraConfig(**options)


def _check_targets(stage: Stage, model: PreTrainedModel, targets: list[str]) -> None:
    from toolkit.errors import nearest

    names = [name for name, _ in model.named_modules() if name]
    linear = sorted(
        {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            guess = nearest(target, linear)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise RecipeError(
                f"stages.{stage.name}.peft.target_modules: '{target}' matches no module of "
                f"{type(model).__name__}{hint}; its linear layers: {', '.join(linear)}"
            )


def run(ctx: StageContext) -> StageOutcome:
    """Train the stage and write its `final/`."""
    from toolkit.train.runner import distributed_state

    stage, kind, spec = ctx.stage, ctx.kind, ctx.kind.trainer
    run_dir = ctx.run_folder.path
    tokenizer = load_tokenizer(stage, run_dir)
    model = load_model(stage, run_dir, tokenizer, spec.model_class)
    if problem := fsdp_wrap_problem(model):
        raise ToolkitError(f"stages.{stage.name}: {problem}")
    if model.config.pad_token_id is None:  # a score head reads the last token before the padding
        model.config.pad_token_id = tokenizer.pad_token_id
    with distributed_state().main_process_first():  # one rank fills the datasets cache, the others read it
        train_data, eval_data = load_data(stage, kind.data_kind, spec, ctx.recipe.seed)
    if (options := staged_options(stage)) is not None:
        return run_staged(ctx, model, tokenizer, train_data, eval_data, options)
    trainer = build_trainer(ctx, model, tokenizer, train_data, eval_data, ctx.folder.checkpoints)
    train(ctx, trainer)
    save_final(trainer, trainer.model, tokenizer, ctx.folder.final)
    if trainer.is_world_process_zero():
        plot_stage(ctx.folder.metrics, ctx.folder.plots, f"{ctx.recipe.name}: {stage.name}", spec.plots)
    return StageOutcome(final=ctx.folder.final, model=trainer.model, tokenizer=tokenizer)


def build_trainer(
    ctx: StageContext,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Any,
    eval_data: Any,
    output_dir: Path,
    step_offset: int = 0,
    seed_offset: int = 0,
) -> Any:
    """The method's trainer over `model`, checkpointing in `output_dir`, logging to the stage's
    `metrics.jsonl` (steps counted from `step_offset`)."""
    stage, spec = ctx.stage, ctx.kind.trainer
    args = trainer_args(ctx, tokenizer, output_dir, seed_offset)
    args = fit_hardware(ctx, model, tokenizer, args)
    adapter = peft_config(stage, model)
    extras = resolve(spec.extras)(ctx, model, tokenizer, adapter) if spec.extras else {}
    checks = resolve(spec.callbacks)(ctx, model, tokenizer) if spec.callbacks else []
    trainer = with_model_loss(resolve(spec.trainer), model)(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=adapter,
        callbacks=[
            ModelLogCallback(),
            MetricsCallback(ctx.folder.metrics, step_offset),
            *optimizer_callbacks(stage),
            *checks,
        ],
        **extras,
    )
    use_optimizer(stage, trainer)
    if trainer.is_world_process_zero():
        from toolkit.train.fit import disk_needed, preflight_disk

        need = disk_needed(trainer.model, args, adapter_only=adapter is not None)
        preflight_disk(stage.name, ctx.folder.path, need)
    return trainer


def with_model_loss(trainer_class: type, model: PreTrainedModel) -> type:
    """`trainer_class`, or for a model whose loss is more than next-token NLL (it reports its parts through
    `pop_loss_parts`, as cognate's deep supervision, halting and ponder cost do) on TRL's SFTTrainer, the
    subclass TRL's documentation recommends: TRL 1.x computes SFT's loss itself, from a fused LM head over the
    backbone's hidden states, which would skip the model's own loss; this one takes the loss the model returns
    (`Trainer.compute_loss`). Other trainers (DPO, GRPO, ...) train on their own objectives either way."""
    from trl import SFTTrainer

    if not callable(getattr(model, "pop_loss_parts", None)) or not issubclass(trainer_class, SFTTrainer):
        return trainer_class

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return type(f"ModelLoss{trainer_class.__name__}", (trainer_class,), {"compute_loss": compute_loss})


def train(ctx: StageContext, trainer: Any, step_offset: int = 0) -> None:
    """Train, resuming (with `--resume`) from the newest complete checkpoint of the trainer's output folder."""
    output_dir = Path(trainer.args.output_dir)
    checkpoint = resume_checkpoint(output_dir, ctx.stage.name) if ctx.resume else None
    if trainer.is_world_process_zero():
        keep_metrics(ctx.folder.metrics, checkpoint, step_offset)
    trainer.train(resume_from_checkpoint=checkpoint)


def staged_options(stage: Stage) -> Any:
    """`model.quantization` as BitNetOptions when it asks for staged BitNet quantization, else None."""
    section = stage.model.get("quantization") or {}
    if section.get("method") != "bitnet" or section.get("groups") is None:
        return None
    from toolkit.quantization.bitnet import BitNetOptions
    from toolkit.quantization.staged import default_measure

    options = BitNetOptions(**section)
    options.measure = options.measure or default_measure(stage.eval)
    return options


def run_staged(
    ctx: StageContext,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Any,
    eval_data: Any,
    options: Any,
) -> StageOutcome:
    """Staged BitNet quantization (toolkit/quantization/staged.py): one trainer per layer group, in
    `checkpoints/group-K/`, the stage's `eval:` hook after each; `final/` holds the model it ends with."""
    from toolkit.quantization.staged import run_staged as quantize_in_stages
    from toolkit.stages import section_hooks
    from toolkit.train.runner import distributed_state

    stage, spec = ctx.stage, ctx.kind.trainer
    if distributed_state().num_processes > 1:
        raise ToolkitError(
            f"stages.{stage.name}.model.quantization.groups: staged quantization decides group by group on one "
            "process's evaluation; run it without a multi-process launch"
        )
    hook = resolve(section_hooks()["eval"].run)
    trainers: list[Any] = []

    def evaluate(model: PreTrainedModel) -> dict[str, Any]:
        model.eval()
        with torch.no_grad():
            return hook(ctx, StageOutcome(model=model, tokenizer=tokenizer), stage.eval)

    def train_group(model: PreTrainedModel, index: int, offset: int) -> int:
        trainer = build_trainer(
            ctx,
            model,
            tokenizer,
            train_data,
            eval_data,
            ctx.folder.checkpoints / f"group-{index}",
            offset,
            index,
        )
        train(ctx, trainer, offset)
        trainers[:] = [trainer]
        return trainer.state.global_step

    def log(record: dict[str, Any]) -> None:
        with ctx.folder.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    record = quantize_in_stages(
        model, options, ctx.folder.path, evaluate, train_group, log, ctx.resume, stage.name
    )
    if not trainers:  # every group was decided before a resume: a trainer only to save with
        trainers.append(build_trainer(ctx, model, tokenizer, train_data, eval_data, ctx.folder.checkpoints))
    save_final(trainers[0], model, tokenizer, ctx.folder.final)
    plots = (*spec.plots, ("quantization_drop",))
    plot_stage(ctx.folder.metrics, ctx.folder.plots, f"{ctx.recipe.name}: {stage.name}", plots)
    return StageOutcome(
        final=ctx.folder.final, model=model, tokenizer=tokenizer, details={"quantization": record["final"]}
    )


def fit_hardware(
    ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: Any
) -> Any:
    """Before the trainer is built: under a DeepSpeed launch, DeepSpeed's own check of its config; on a GPU,
    full training's memory against the free memory; with `auto_batch_size`, the micro-batch that fits and the
    accumulation that keeps the global batch (toolkit/train/fit.py)."""
    from toolkit.train.fit import fit_batch_size, preflight_deepspeed, preflight_memory
    from toolkit.train.runner import distributed_state

    stage = ctx.stage
    preflight_deepspeed(stage.name, args)
    quantized = getattr(model, "is_quantized", False)
    if not stage.peft and not quantized:
        preflight_memory(stage.name, model, bool(args.bf16))
    if not stage.train.get("auto_batch_size"):
        return args
    if not quantized:  # a quantized model was placed when it loaded
        model.to(args.device)
    args, note = fit_batch_size(stage.name, model, args, ctx.kind.data_kind, len(tokenizer))
    if note and distributed_state().is_main_process:
        print(note, flush=True)
    return args


def optimizer_callbacks(stage: Stage) -> list[Any]:
    """The gradient filters `train:` asks for (`grokfast:`), as Trainer callbacks."""
    from toolkit.train.optimizers import GrokfastCallback

    grokfast = stage.train.get("grokfast")
    return [GrokfastCallback(**grokfast)] if grokfast else []


def use_optimizer(stage: Stage, trainer: Any) -> None:
    """`optim: muon`: the trainer builds Muon + AdamW over its (possibly PEFT-wrapped) model, through
    Trainer's own optimizer factory hook, so the schedule, clipping and checkpoints treat it as any other."""
    if stage.train.get("optim") != "muon":
        return
    from toolkit.train.optimizers import MuonFactory, muon_options

    if trainer.is_fsdp_enabled:
        raise RecipeError(
            f"stages.{stage.name}.train.optim: muon orthogonalizes whole weight matrices, and under FSDP each "
            "process holds a shard of them; launch with DDP (recipes/accelerate/ddp.yaml) or choose adamw_torch"
        )
    options = muon_options(stage.train.get("optim_args"), f"stages.{stage.name}.train")
    trainer.optimizer_cls_and_kwargs = (MuonFactory, {"args": trainer.args, "options": options})


def keep_metrics(path: Path, checkpoint: str | None, step_offset: int = 0) -> None:
    """Before a stage (re)starts: keep the logged records up to the checkpoint it resumes from, drop the rest,
    which the resumed run logs again (so `metrics.jsonl` and the plots hold each step once); a staged
    quantization's group counts its steps from `step_offset`."""
    if not path.exists():
        return
    step = step_offset + ((checkpoint_step(checkpoint) or 0) if checkpoint else 0)
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def save_final(
    trainer: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, final: Path
) -> None:
    """Write `final/` (weights or adapter, tokenizer, chat template, generation config) atomically; a model
    without a tokenizer (the lattice) has weights and config only."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and tokenizer is not None:
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
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if final.exists():  # a resumed stage that had written final/ but not its done marker
            shutil.rmtree(final)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
