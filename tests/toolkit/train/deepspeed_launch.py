"""Run in the DeepSpeed environment by test_deepspeed_configs.py (DeepSpeed lives beside the main environment):

    python -m tests.toolkit.train.deepspeed_launch LAUNCH_CONFIG OUTPUT_DIR

sets the environment `accelerate launch --config_file LAUNCH_CONFIG` gives its DeepSpeed processes (computed by
Accelerate's own launcher functions), then runs the stage preflight `toolkit.train.fit.preflight_deepspeed`
for SFT trainer arguments (micro-batch 2, accumulation 4, clipping 0.5), and prints one JSON line:
{"config": the checked DeepSpeed config} or {"error": the stage's error message}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def launch_env(config: Path) -> dict[str, str]:
    """What `accelerate launch --config_file CONFIG -m toolkit.train R` sets for its DeepSpeed processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "toolkit.train", "r.yaml"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    # As accelerate's launch_command does before it starts DeepSpeed processes.
    fields = list(defaults.deepspeed_config) if defaults else []
    if mixed_precision_from_config:
        fields.append("mixed_precision")
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def main() -> None:
    from trl import SFTConfig

    from toolkit.errors import ToolkitError
    from toolkit.train.fit import preflight_deepspeed

    config, output_dir = Path(sys.argv[1]), sys.argv[2]
    os.environ.update(launch_env(config))
    args = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        learning_rate=3e-4,
        max_grad_norm=0.5,
        report_to="none",
        use_cpu=True,
    )
    try:
        print(json.dumps({"config": preflight_deepspeed("sft", args)}))
    except ToolkitError as error:
        print(json.dumps({"error": str(error)}))


if __name__ == "__main__":
    main()
