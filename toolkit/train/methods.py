"""The toolkit's own methods in the stage registry: tokenizer training, and the training methods as entries of
the one generic trainer stage (`toolkit/train/trainer_stage.py`). A new TRL method is one more entry here.

Defaults that differ from TRL's are few and said where they are: TRL assumes a GPU (bf16, activation
checkpointing), which `trainer_stage.device_defaults` switches off on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from toolkit.stages import StageContext, StageKind, StageOutcome, TrainerSpec, register_stage

TRAINER_STAGE = "toolkit.train.trainer_stage:run"
TRAINING_KEYS = ("model", "tokenizer", "data", "train", "peft", "eval")
# TRL logs these for the RL trainers: reward mean and spread, the share of prompts whose completions all
# scored the same (no learning signal: the usual reason a GRPO run learns nothing), and KL when beta > 0.
RL_PLOTS = (("reward", "reward_std"), ("frac_reward_zero_std",), ("kl",), ("completions/mean_length",))


@dataclass
class TokenizerOptions:
    """A tokenizer stage's `tokenizer:` section."""

    vocab_size: int = 4096
    min_frequency: int = 2
    model_max_length: int = 2048
    extra_special_tokens: list[str] = field(default_factory=list)


def run_tokenizer(ctx: StageContext) -> StageOutcome:
    """Train a byte-level BPE tokenizer on the stage's data into `final/` (main process first; the others
    find it there)."""
    from pathlib import Path

    from toolkit.data.tokenizer import train_tokenizer
    from toolkit.errors import ToolkitError
    from toolkit.train.runner import distributed_state

    final = ctx.folder.final
    with distributed_state().main_process_first():
        if not final.exists():
            files = [s["path"] for s in ctx.stage.data["sources"]]
            for path in files:
                if not Path(path).exists():
                    raise ToolkitError(f"stages.{ctx.stage.name}.data.sources: file not found: {path}")
            train_tokenizer(files, out_dir=final, **(ctx.stage.options or {}))
    return StageOutcome(final=final)


def sft_values(ctx: StageContext, tokenizer: Any) -> dict[str, Any]:
    """Learn the answers, not the prompts, when the template marks assistant turns. TRL's own test of the
    markers: a substring test for `{% generation %}` misses the whitespace-trimming `{%- generation %}` the
    toolkit's template uses, and the demo once trained on the prompts too without saying so."""
    from trl.chat_template_utils import has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    return {"assistant_only_loss": bool(template) and has_generation_markers(template)}


def reference_model(ctx: StageContext, model: Any, tokenizer: Any, peft_config: Any) -> dict[str, Any]:
    """A frozen copy of the starting model as DPO's reference. TRL would rebuild it from `_name_or_path`
    through a top-level transformers class, which cannot resolve a custom architecture; with a LoRA adapter
    the base itself (adapter off) is the reference."""
    if peft_config is not None:
        return {}
    from toolkit.train.trainer_stage import load_model

    return {"ref_model": load_model(ctx.stage, ctx.run_folder.path, tokenizer)}


def _training(method: str, description: str, data_kind: str, trainer: TrainerSpec, **kind: Any) -> StageKind:
    return StageKind(
        method,
        run=TRAINER_STAGE,
        description=description,
        keys=TRAINING_KEYS,
        produces_model=True,
        data_kind=data_kind,
        trainer=trainer,
        **kind,
    )


register_stage(
    StageKind(
        "tokenizer",
        run=run_tokenizer,
        description="byte-level BPE tokenizer trained on the stage's text",
        keys=("data",),
        section="tokenizer",
        schema=TokenizerOptions,
        produces_tokenizer=True,
        data_kind="text",
    )
)
register_stage(
    _training(
        "pretrain",
        "causal-LM training on text, packed into full windows",
        "text",
        # Concatenate documents and cut into full windows: no padding waste, as in classic LM pretraining.
        TrainerSpec(
            "trl:SFTConfig", "trl:SFTTrainer", ("text",), {"packing": True, "packing_strategy": "wrapped"}
        ),
    )
)
register_stage(
    _training(
        "sft",
        "supervised fine-tuning on conversations (loss on the answers when the template marks them)",
        "messages",
        TrainerSpec(
            "trl:SFTConfig", "trl:SFTTrainer", ("messages",), config_values="toolkit.train.methods:sft_values"
        ),
    )
)
register_stage(
    _training(
        "dpo",
        "direct preference optimisation on chosen/rejected pairs",
        "preference",
        TrainerSpec(
            "trl:DPOConfig",
            "trl:DPOTrainer",
            ("prompt", "chosen", "rejected"),
            extras="toolkit.train.methods:reference_model",
            plots=(("rewards/margins",), ("rewards/accuracies",), ("rewards/chosen", "rewards/rejected")),
        ),
    )
)
for _method, _config, _trainer, _about in (
    ("grpo", "trl:GRPOConfig", "trl:GRPOTrainer", "group relative policy optimisation with reward functions"),
    ("rloo", "trl:RLOOConfig", "trl:RLOOTrainer", "REINFORCE leave-one-out with reward functions"),
):
    register_stage(
        _training(
            _method,
            _about,
            "prompt",
            TrainerSpec(
                _config,
                _trainer,
                ("prompt",),
                keep_columns=True,  # reward functions read the other columns (answer, task)
                config_values="toolkit.train.rewards:config_values",
                extras="toolkit.train.rewards:trainer_rewards",
                plots=RL_PLOTS,
            ),
            section="rewards",
            schema="toolkit.train.rewards:parse_rewards",
            preflight="toolkit.train.rewards:preflight",
        )
    )
