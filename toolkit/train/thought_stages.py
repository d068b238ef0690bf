"""The thought stages in the registry (`thought-bake`, `thought-rl`) and their sections' schemas.

Kept apart from `toolkit.train.thoughts`, which implements them, so that loading the registry imports
neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.stages import StageKind, TrainerSpec, register_stage

BAKE_REPORT = "thoughts.json"
THEATER_REPORT = "theater.json"


@dataclass
class BakeOptions:
    """A thought-bake stage's `thoughts:` section."""

    tasks: str = field(default="data/eval/heldout.jsonl", metadata={"input": "file"})  # held-out prompts
    limit: int = 32  # prompts per check
    check_every: int = 25  # steps
    format_bound: float = 0.85  # share of well-formed answers that ends the baking
    stop_at_bound: bool = True
    min_steps: int = (
        0  # train at least this long before the bound may stop it (the format comes before the answers)
    )
    max_new_tokens: int = 64


@dataclass
class TheaterOptions:
    """A thought-rl stage's `theater:` section: the anti-theater checks and their floors."""

    tasks: str = field(default="data/eval/heldout.jsonl", metadata={"input": "file"})
    limit: int = 16  # prompts
    samples: int = 4  # thoughts sampled per prompt
    check_every: int = 10  # steps; and once at the end
    temperature: float = 1.0
    max_new_tokens: int = 64  # for the thought; the answer after it gets answer_budget
    min_divergence: float = 0.3
    min_ablation_gain: float = 0.02
    min_dependence: float = 0.5
    seed: int = 0


_TRAINING_KEYS = ("model", "tokenizer", "data", "train", "peft", "eval")
_RL_PLOTS = (
    ("reward", "reward_std"),
    ("frac_reward_zero_std",),
    ("kl",),
    ("completions/mean_length",),
    ("theater/accuracy", "theater/accuracy_ablated"),
    ("theater/divergence", "theater/dependence"),
)
register_stage(
    StageKind(
        "thought-bake",
        run="toolkit.train.thoughts:run_bake",
        description="SFT on answers with thoughts (the 12 thought tokens added) until the format accuracy bound",
        keys=_TRAINING_KEYS,
        section="thoughts",
        schema=BakeOptions,
        produces_model=True,
        data_kind="messages",
        trainer=TrainerSpec(
            "trl:SFTConfig",
            "trl:SFTTrainer",
            ("messages",),
            config_values="toolkit.train.methods:sft_values",
            callbacks="toolkit.train.thoughts:bake_callbacks",
            plots=(("thoughts/format_accuracy", "thoughts/accuracy"),),
        ),
    )
)
register_stage(
    StageKind(
        "thought-rl",
        run="toolkit.train.thoughts:run_rl",
        description="GRPO on thoughts (thought_answer, thought_format, thought_gain rewards) with anti-theater checks",
        keys=_TRAINING_KEYS,
        section="rewards",
        schema="toolkit.train.rewards:parse_rewards",
        sections=(("theater", TheaterOptions),),
        produces_model=True,
        data_kind="prompt",
        trainer=TrainerSpec(
            "trl:GRPOConfig",
            "trl:GRPOTrainer",
            ("prompt",),
            keep_columns=True,
            config_values="toolkit.train.rewards:config_values",
            extras="toolkit.train.rewards:trainer_rewards",
            callbacks="toolkit.train.thoughts:theater_callbacks",
            plots=_RL_PLOTS,
        ),
        preflight="toolkit.train.rewards:preflight",
    )
)
