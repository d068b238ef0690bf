"""Fitting the hardware before training (toolkit/train/fit.py), run as users run it: `auto_batch_size` on a
machine where a micro-batch of 8 does not fit trains 2 × 4 accumulation steps, to the very weights of a run
asked for 2 × 4; a disk with too little free space fails before the first step, with the figures; the
estimate of a checkpoint is near what the Trainer writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from tests.tiny import ROOT, TINY, head, pretrain_stage, tokenizer_stage, write_recipe
from tests.toolkit.train.test_resume import assert_identical, weights
from toolkit.errors import RecipeError, ToolkitError
from toolkit.models import build_config, register_auto_classes
from toolkit.train.fit import disk_needed, fit_batch_size, preflight_disk, preflight_memory

# `toolkit train` on a machine that cannot hold more than 2 sequences at once (the CPU allocator's own
# error, as Accelerate recognises it), or whose disk has 1 MiB free.
HARNESS = """
import shutil, sys
from toolkit.models.decoder.modeling_decoder import DecoderForCausalLM

mode, argv = sys.argv[1], sys.argv[2:]
if mode == "memory":
    forward = DecoderForCausalLM.forward
    def limited(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return forward(self, input_ids=input_ids, **kwargs)
    DecoderForCausalLM.forward = limited
else:
    usage = shutil.disk_usage
    shutil.disk_usage = lambda path: usage(path)._replace(free=2**20)
from toolkit.cli import main
sys.exit(main(argv))
"""

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]


def recipe(tmp: Path, **train) -> Path:
    corpus = head("data/corpus/train.jsonl", 120, tmp / "corpus.jsonl")
    pretrain = pretrain_stage(corpus, TINY, max_steps=4, save_steps=2, learning_rate=3e-3, **train)
    return write_recipe(
        tmp / f"fit-{len(list(tmp.glob('*.yaml')))}.yaml", "fit", tmp, [tokenizer_stage(corpus), pretrain]
    )


def toolkit(mode: str | None, path: Path, out: Path) -> subprocess.CompletedProcess:
    argv = ["train", str(path), "--output-dir", str(out)]
    command = (
        [sys.executable, "-c", HARNESS, mode, *argv]
        if mode
        else [str(Path(sys.executable).parent / "toolkit"), *argv]
    )
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_auto_batch_size_keeps_the_global_batch(tmp_path):
    auto = toolkit(
        "memory", recipe(tmp_path, per_device_train_batch_size=8, auto_batch_size=True), tmp_path / "auto"
    )
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert (
        "stages.pretrain: auto_batch_size: a micro-batch of 8 does not fit; 2 × 4 accumulation steps keeps the "
        "global batch of 8 per device" in auto.stdout
    )
    asked = toolkit(
        "memory",
        recipe(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4),
        tmp_path / "asked",
    )
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert_identical(weights(tmp_path / "auto", "pretrain"), weights(tmp_path / "asked", "pretrain"))

    # The estimate of one checkpoint against what the Trainer wrote (weights, optimizer, scheduler, RNG).
    checkpoint = tmp_path / "auto" / "pretrain" / "checkpoints" / "checkpoint-4"
    written = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "auto" / "pretrain" / "final")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, save_total_limit=2)
    need = disk_needed(model, args, adapter_only=False)
    assert need["checkpoints"] == 2  # two saves in 4 steps, fewer than the limit + 1
    assert 0.8 < need["checkpoint"] / written < 1.1, (need, written)


def test_a_full_disk_fails_before_training_with_the_figures(tmp_path):
    done = toolkit("disk", recipe(tmp_path), tmp_path / "run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: stages.pretrain: the stage writes about " in done.stderr
    assert (
        "(2 checkpoints of " in done.stderr
        and "which has 1.0 MiB free; lower save_total_limit" in done.stderr
    )
    assert not (tmp_path / "run" / "pretrain" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "pretrain" / "checkpoints").iterdir()
    )


def tiny() -> torch.nn.Module:
    register_auto_classes()
    return AutoModelForCausalLM.from_config(build_config("decoder-tiny", vocab_size=64, **TINY))


def test_preflights_name_their_figures(tmp_path):
    model = tiny()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ToolkitError) as error:
        preflight_memory("sft", model, bf16=True, free=n)
    assert str(error.value).startswith(
        f"stages.sft: full training (bf16-mixed) of {n:,} parameters needs about "
    )
    preflight_memory("sft", model, bf16=True, free=16 * n)  # fits
    need = {"total": 3 * 2**30, "checkpoints": 3, "checkpoint": 2**30, "final": 0}
    with pytest.raises(ToolkitError, match=r"writes about 3.00 GiB \(3 checkpoints of 1.00 GiB"):
        preflight_disk("sft", tmp_path / "not" / "yet", need, free=2**30)


def test_auto_batch_size_is_refused_where_rollouts_make_the_batch(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4)
    with pytest.raises(RecipeError, match="stages.grpo.train.auto_batch_size: a prompt-data stage generates"):
        fit_batch_size("grpo", tiny(), args, "prompt", 64)
