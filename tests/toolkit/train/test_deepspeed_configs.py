"""The shipped DeepSpeed ZeRO configs (recipes/accelerate/zero2.yaml, zero3.yaml) pass DeepSpeed's own config
check as a stage hands them over: the environment Accelerate's launcher gives its processes for the file, read
by Accelerate's DeepSpeed plugin, the "auto" values filled from the stage's trainer arguments by transformers
(as Trainer does), checked by `deepspeed.runtime.config.DeepSpeedConfig`. A config DeepSpeed refuses fails the
stage before training, with DeepSpeed's words. Running ZeRO needs GPUs; the check does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.errors import ToolkitError
from toolkit.train.fit import preflight_deepspeed

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = [
    c for c in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")) if "DEEPSPEED" in c.read_text()
]

pytest.importorskip(
    "deepspeed", reason="DeepSpeed is installed by make test (pip install --no-build-isolation)"
)


def launch_env(config: Path) -> dict[str, str]:
    """What `accelerate launch --config_file CONFIG -m toolkit.train R` sets for its DeepSpeed processes,
    computed by Accelerate's own launcher functions."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "toolkit.train", "r.yaml"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) if defaults else []
    if mixed_precision_from_config:
        fields.append("mixed_precision")
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def trainer_args(tmp_path: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        learning_rate=3e-4,
        max_grad_norm=0.5,
        report_to="none",
        use_cpu=True,
    )


def test_the_zero_2_and_3_configs_are_shipped():
    assert [c.stem for c in SHIPPED] == ["zero2", "zero3"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda c: c.stem)
def test_each_shipped_zero_config_passes_deepspeeds_own_check(path, tmp_path, monkeypatch):
    import yaml

    for key, value in launch_env(path).items():
        monkeypatch.setenv(key, value)
    config = preflight_deepspeed("sft", trainer_args(tmp_path))
    stage = yaml.safe_load(path.read_text())["deepspeed_config"]["zero_stage"]
    assert config["zero_optimization"]["stage"] == stage
    # The trainer's own values, where the launcher's config left "auto".
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 4)
    assert config["gradient_clipping"] == 0.5
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_deepspeed_file_with_a_misspelt_key_fails_the_stage_before_training(tmp_path, monkeypatch):
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
    for key, value in launch_env(tmp_path / "launch.yaml").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(
        ToolkitError, match=r"stages\.sft: DeepSpeed refuses .*overlap_com.*did you mean .overlap_comm.\?"
    ):
        preflight_deepspeed("sft", trainer_args(tmp_path))


def test_without_a_deepspeed_launch_nothing_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert preflight_deepspeed("sft", trainer_args(tmp_path)) is None


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
