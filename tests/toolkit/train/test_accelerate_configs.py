"""The shipped Accelerate configs (recipes/accelerate/) run a recipe unchanged, launched the way the README
says: `accelerate launch --config_file CONFIG -m toolkit.train RECIPE`. On a CPU without native bf16 each
config's bf16 is switched off with one warning (emulated bf16 only slows a CPU down), so its losses equal, step
for step, one process at the same global batch; on a CPU with it (AVX512-BF16, AMX) bf16 stays, and the losses
stay within bf16's rounding of that reference. Under FSDP the final weights are whole, not shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import TINY, head, pretrain_stage, tokenizer_stage, write_recipe
from toolkit.train.trainer_stage import cpu_has_native_bf16

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
WARNING = "warning: the launcher's mixed_precision bf16 is switched off"


def recipe(tmp: Path, name: str, per_device: int) -> Path:
    corpus = tmp / "corpus.jsonl"
    if not corpus.exists():
        head("data/corpus/train.jsonl", 120, corpus)
    stages = [
        tokenizer_stage(str(corpus)),
        pretrain_stage(str(corpus), TINY, per_device_train_batch_size=per_device, learning_rate=1e-3),
    ]
    return write_recipe(tmp / f"{name}.yaml", name, tmp / name, stages)


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, the whole global batch (2 ranks x 2 rows) on it."""
    tmp = tmp_path_factory.mktemp("accelerate")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "train", str(recipe(tmp, "single", 4))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


# DeepSpeed (ZeRO) needs GPUs to run; its configs go through DeepSpeed's own check (test_deepspeed_configs.py).
ON_CPU = [c for c in CONFIGS if "distributed_type: DEEPSPEED" not in c.read_text()]


@pytest.mark.parametrize("config", ON_CPU, ids=lambda c: c.stem)
def test_shipped_config_runs_on_cpu_in_full_precision_as_one_process_does(one_process, config):
    name = config.stem
    result = launch("--config_file", str(config), "-m", "toolkit.train", str(recipe(one_process, name, 2)))
    assert result.returncode == 0, result.stderr[-4000:]
    native = cpu_has_native_bf16()
    assert result.stdout.count(WARNING) == (0 if native else 1), result.stdout[-3000:]
    run = one_process / name
    assert json.loads((run / "env.json").read_text())["num_processes"] == 2
    reference = losses(one_process / "single")
    assert len(reference) == 4
    # Full precision: the reference's own losses; bf16 autocast moves them by up to ~1e-2.
    assert losses(run) == pytest.approx(reference, abs=5e-2 if native else 2e-4)
    # Whole weights in final/ (under FSDP, gathered from the shards): the shapes of the model itself.
    from safetensors.torch import load_file

    final = load_file(run / "pretrain" / "final" / "model.safetensors")
    single = load_file(one_process / "single" / "pretrain" / "final" / "model.safetensors")
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in single.items()}
    drift = max((final[k].float() - single[k].float()).abs().max().item() for k in single)
    assert drift < (2e-2 if native else 1e-3), drift


@pytest.mark.parametrize(
    ("launched", "train", "native", "after"),
    [
        ("bf16", {}, False, "no"),  # emulated bf16: off, with the warning
        ("fp16", {}, True, "no"),  # no CPU computes fp16 natively in torch's autocast
        ("bf16", {}, True, "bf16"),  # AVX512-BF16 / AMX: kept
        ("bf16", {"bf16": True}, False, "bf16"),  # the recipe asked for it
        ("no", {}, False, "no"),
    ],
)
def test_launcher_precision_is_overridden_only_where_it_slows_the_cpu(
    monkeypatch, launched, train, native, after
):
    from toolkit.train import trainer_stage

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    monkeypatch.setattr(trainer_stage, "cpu_only", lambda: True)
    monkeypatch.setattr(trainer_stage, "cpu_has_native_bf16", lambda: native)
    warning = trainer_stage.launcher_precision_override(train)
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == after
    assert (warning is not None) == (launched != after)
    if warning:
        assert warning.startswith(f"warning: the launcher's mixed_precision {launched} is switched off")


def test_fsdp_refuses_a_model_without_blocks_to_wrap(monkeypatch):
    import torch

    from toolkit.train.trainer_stage import fsdp_wrap_problem

    class Plain(torch.nn.Module):
        _no_split_modules = None

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    assert "Plain declares no `_no_split_modules`" in fsdp_wrap_problem(Plain())
    Plain._no_split_modules = ["Block"]
    assert fsdp_wrap_problem(Plain()) is None
    Plain._no_split_modules = None
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block")
    assert fsdp_wrap_problem(Plain()) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP")
    assert fsdp_wrap_problem(Plain()) is None
