"""The shipped DeepSpeed ZeRO configs (recipes/accelerate/zero2.yaml, zero3.yaml) pass DeepSpeed's own config
check as a stage hands them over: the environment Accelerate's launcher gives its processes for the file, read
by Accelerate's DeepSpeed plugin, the "auto" values filled from the stage's trainer arguments by transformers
(as Trainer does), checked by `deepspeed.runtime.config.DeepSpeedConfig`. A config DeepSpeed refuses fails the
stage before training, with DeepSpeed's words. The check runs in the DeepSpeed environment (`make
deepspeed-env`, which `make test` sets up: DeepSpeed stays out of the main one), through
tests/toolkit/train/deepspeed_launch.py. Running ZeRO needs GPUs; the check does not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = [
    c for c in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")) if "DEEPSPEED" in c.read_text()
]


def deepspeed_python() -> str | None:
    """The DeepSpeed environment's Python (FORGE_DEEPSPEED_PYTHON, else `.venv-deepspeed`), or this one where
    DeepSpeed is installed (a GPU environment)."""
    if named := os.environ.get("FORGE_DEEPSPEED_PYTHON"):
        return named
    beside = ROOT / ".venv-deepspeed" / "bin" / "python"
    if beside.exists():
        return str(beside)
    return sys.executable if importlib.util.find_spec("deepspeed") else None


def checked(launch_config: Path, tmp_path: Path) -> dict:
    python = deepspeed_python()
    if python is None:
        pytest.skip("needs DeepSpeed: `make deepspeed-env` sets up its environment")
    done = subprocess.run(
        [python, "-m", "tests.toolkit.train.deepspeed_launch", str(launch_config), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_zero_2_and_3_configs_are_shipped():
    assert [c.stem for c in SHIPPED] == ["zero2", "zero3"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda c: c.stem)
def test_each_shipped_zero_config_passes_deepspeeds_own_check(path, tmp_path):
    config = checked(path, tmp_path)["config"]
    stage = yaml.safe_load(path.read_text())["deepspeed_config"]["zero_stage"]
    assert config["zero_optimization"]["stage"] == stage
    # The trainer's own values, where the launcher's config left "auto".
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 4)
    assert config["gradient_clipping"] == 0.5
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_deepspeed_file_with_a_misspelt_key_fails_the_stage_before_training(tmp_path):
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 2, "overlap_com": True},  # DeepSpeed's key is overlap_comm
    }
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "launch.yaml").write_text(
        "distributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n  zero3_init_flag: false\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: false\n"
    )
    error = checked(tmp_path / "launch.yaml", tmp_path)["error"]
    assert error.startswith("stages.sft: DeepSpeed refuses the launch's DeepSpeed config")
    assert "overlap_com" in error and "(did you mean 'overlap_comm'?)" in error


def test_without_a_deepspeed_launch_nothing_is_checked(tmp_path, monkeypatch):
    from trl import SFTConfig

    from toolkit.train.fit import preflight_deepspeed

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    assert preflight_deepspeed("sft", args) is None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.integration_test
@pytest.mark.parametrize("path", SHIPPED, ids=lambda c: c.stem)
def test_a_zero_run_on_the_gpus_saves_whole_weights_and_learns_as_one_process(path, tmp_path):
    """ZeRO-2/3 as the README launches it, on every GPU of the machine: the run's `final/` holds whole
    (gathered) weights of the model's own shapes, and its losses follow one plain process at the same global
    batch within bf16's rounding."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.toolkit.train.test_accelerate_configs import losses, recipe

    gpus = torch.cuda.device_count()
    single = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "train", str(recipe(tmp_path, "single", 2 * gpus))],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    zero = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
        + ["--num_processes", str(gpus), "-m", "toolkit.train", str(recipe(tmp_path, path.stem, 2))],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=dict(os.environ),
    )
    assert zero.returncode == 0, zero.stderr[-4000:]
    assert losses(tmp_path / path.stem) == pytest.approx(losses(tmp_path / "single"), abs=5e-2)
    final = load_file(tmp_path / path.stem / "pretrain" / "final" / "model.safetensors")
    reference = load_file(tmp_path / "single" / "pretrain" / "final" / "model.safetensors")
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in reference.items()}
