"""Fitting a stage to the hardware before it trains: the micro-batch that fits (`auto_batch_size`), and a
preflight of disk (and, on a GPU, memory) against what the stage will need, failing early with the figures.

- `auto_batch_size: true` probes one forward and backward pass of the stage's model at its longest sequence
  (`max_length`), starting at `per_device_train_batch_size` and halving on an out-of-memory error (through
  Accelerate's `find_executable_batch_size`, which knows CUDA's, XPU's and the CPU allocator's). The global
  batch is kept: the accumulation steps grow by the factor the micro-batch shrank. The probe trains the
  whole model without gradient checkpointing, so for an adapter or a checkpointed run it errs on the safe
  side. Trainer's own
  `auto_find_batch_size` halves the batch and leaves the global batch smaller, which changes the run.
- The disk preflight adds up what the stage writes: `save_total_limit` checkpoints (plus the one being
  written before the oldest is deleted), each the saved weights (the adapter only, for a LoRA stage) and the
  optimizer's moments of the trained parameters, and `final/`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import RecipeError, ToolkitError
from toolkit.io import human_bytes
from toolkit.models.registry import TRAINING_BYTES_PER_PARAM

# Sequences per example the trainer runs forward together: a preference pair is chosen and rejected.
ROWS_PER_EXAMPLE = {"text": 1, "messages": 1, "preference": 2, "unpaired": 2}  # KTO adds its KL batch
OPTIMIZER_BYTES_PER_PARAM = 8  # AdamW's two float32 moments (Muon's one momentum is less)


def fit_batch_size(
    stage_name: str, model: torch.nn.Module, args: Any, data_kind: str, vocab_size: int
) -> tuple[Any, str | None]:
    """`args` with the largest micro-batch ≤ `per_device_train_batch_size` whose forward and backward at
    `max_length` fit, and the accumulation steps that keep the global batch; plus a line saying what changed
    (None when the asked micro-batch fits)."""
    from accelerate.utils import find_executable_batch_size

    if data_kind not in ROWS_PER_EXAMPLE:
        raise RecipeError(
            f"stages.{stage_name}.train.auto_batch_size: a {data_kind}-data stage generates its batches "
            "(rollouts); set per_device_train_batch_size and num_generations instead"
        )
    start = int(args.per_device_train_batch_size)
    length = int(getattr(args, "max_length", None) or 512)
    rows = ROWS_PER_EXAMPLE[data_kind]
    device = next(model.parameters()).device
    was_training = model.training

    @find_executable_batch_size(starting_batch_size=start)
    def probe(batch_size: int) -> int:
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, vocab_size, (batch_size * rows, length), device=device)
        model.train()
        # The logits' mean as the loss: the same activations and gradients as the method's loss, for a
        # causal LM and a score head alike.
        model(input_ids=ids).logits.float().mean().backward()
        model.zero_grad(set_to_none=True)
        return batch_size

    try:
        fits = probe()
    except RuntimeError as error:  # not one sequence fits: the error says so
        raise ToolkitError(
            f"stages.{stage_name}.train.auto_batch_size: not even one sequence of {length} tokens fits: {error}"
        ) from None
    finally:
        model.train(was_training)
    if fits == start:
        return args, None
    steps = int(args.gradient_accumulation_steps) * -(-start // fits)
    note = (
        f"stages.{stage_name}: auto_batch_size: a micro-batch of {start} does not fit; {fits} × {steps} "
        f"accumulation steps keeps the global batch of {start * int(args.gradient_accumulation_steps)} per device"
    )
    if start % fits:
        note += f" (as near as {fits} divides it: {fits * steps})"
    return dataclasses.replace(
        args, per_device_train_batch_size=fits, gradient_accumulation_steps=steps
    ), note


def saved_bytes(model: torch.nn.Module, adapter_only: bool) -> tuple[int, int]:
    """Bytes of the weights a checkpoint saves (the trainable ones, for an adapter) and the number of
    trained parameters (what the optimizer keeps moments of); tied tensors counted once."""
    seen: set[int] = set()
    weights = trained = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trained += p.numel()
        if p.requires_grad or not adapter_only:
            weights += p.numel() * p.element_size()
    return weights, trained


def disk_needed(model: torch.nn.Module, args: Any, adapter_only: bool) -> dict[str, int]:
    """What the stage writes, in bytes: one checkpoint, how many stay at once, `final/`, the total."""
    weights, trained = saved_bytes(model, adapter_only)
    checkpoint = weights + OPTIMIZER_BYTES_PER_PARAM * trained
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "no":
        kept = 0
    else:
        saves = args.max_steps // args.save_steps if strategy == "steps" and args.max_steps > 0 else None
        # One more than the limit: the new checkpoint is written before the oldest is deleted.
        limit = args.save_total_limit + 1 if args.save_total_limit else None
        known = [n for n in (saves, limit) if n is not None]
        kept = min(known) if known else 1  # neither bounded: at least one
    return {
        "checkpoint": checkpoint,
        "checkpoints": kept,
        "final": weights,
        "total": kept * checkpoint + weights,
    }


def preflight_disk(stage_name: str, folder: Path, need: dict[str, int], free: int | None = None) -> None:
    """Fail before training when the disk under `folder` has less free space than the stage will write."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free if free is None else free
    if need["total"] <= free:
        return
    raise ToolkitError(
        f"stages.{stage_name}: the stage writes about {human_bytes(need['total'])} ({need['checkpoints']} "
        f"checkpoints of {human_bytes(need['checkpoint'])} and final/ of {human_bytes(need['final'])}) under {folder}, "
        f"which has {human_bytes(free)} free; lower save_total_limit, raise save_steps, train an adapter (peft:), "
        "or free some space"
    )


def preflight_memory(stage_name: str, model: torch.nn.Module, bf16: bool, free: int | None = None) -> None:
    """On a CUDA GPU: fail before training when full training of `model` (weights, gradients and AdamW
    moments, at `toolkit.models.memory_estimate`'s bytes per parameter) exceeds the device's free memory."""
    if free is None:
        if not torch.cuda.is_available():
            return
        free = torch.cuda.mem_get_info()[0]
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    regime = "bf16-mixed" if bf16 else "fp32"
    parts = TRAINING_BYTES_PER_PARAM[regime]
    total = n * sum(parts.values())
    if total <= free:
        return
    raise ToolkitError(
        f"stages.{stage_name}: full training ({regime}) of {n:,} parameters needs about {human_bytes(total)} before "
        f"activations (weights {human_bytes(n * parts['weights'])}, gradients {human_bytes(n * parts['gradients'])}, "
        f"optimizer {human_bytes(n * parts['optimizer'])}), and the GPU has {human_bytes(free)} free; train an adapter "
        "(peft:, or QLoRA with model.quantization), shard it (FSDP/ZeRO-3), or use a smaller preset"
    )


def deepspeed_launched() -> bool:
    """Whether `accelerate launch` started this process under DeepSpeed (a ZeRO config)."""
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def preflight_deepspeed(stage_name: str, args: Any) -> dict[str, Any] | None:
    """Under a DeepSpeed launch, the DeepSpeed config the stage's trainer will hand to DeepSpeed, checked by
    DeepSpeed's own config check (`deepspeed.runtime.config.DeepSpeedConfig`) before the model moves or a step
    runs: Accelerate's plugin reads the launcher's settings (or the user's `deepspeed_config_file`) from the
    environment, transformers fills its "auto" values from the stage's trainer arguments (as Trainer does), and
    DeepSpeed validates the result. A misspelt key or a value DeepSpeed refuses is an error naming the stage and
    DeepSpeed's words. Returns the checked config (None when not launched under DeepSpeed)."""
    if not deepspeed_launched():
        return None
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError as error:
        raise ToolkitError(
            f"stages.{stage_name}: launched with a DeepSpeed config, but DeepSpeed does not import ({error}); "
            "pip install deepspeed (its build needs torch: --no-build-isolation)"
        ) from None
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    try:
        config = HfTrainerDeepSpeedConfig(DeepSpeedPlugin().deepspeed_config)
        config.trainer_config_process(args)
        DeepSpeedConfig(config.config)
    except Exception as error:  # pydantic's ValidationError, DeepSpeed's asserts, a file that does not parse
        raise ToolkitError(
            f"stages.{stage_name}: DeepSpeed refuses the launch's DeepSpeed config: {_deepspeed_words(error)}"
        ) from None
    return config.config


def _deepspeed_words(error: Exception) -> str:
    """DeepSpeed's error on one line; for a key its pydantic schema does not have, the nearest one it has."""
    from toolkit.errors import nearest

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    words = "; ".join(line for line in lines if not line.startswith("For further information"))
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return words
    import importlib

    schema = None
    for module in (
        "deepspeed.runtime.zero.config",
        "deepspeed.runtime.config",
        "deepspeed.runtime.config_utils",
    ):
        schema = schema or getattr(importlib.import_module(module), getattr(error, "title", ""), None)
    for item in errors():
        if item.get("type") == "extra_forbidden" and schema is not None:
            keys = [f.alias or name for name, f in schema.model_fields.items()]
            if guess := nearest(str(item["loc"][-1]), keys):
                words += f" (did you mean '{guess}'?)"
    return words
