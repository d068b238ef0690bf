"""The toolkit's own methods in the stage registry: tokenizer training, and the training methods as entries of
the one generic trainer stage (`toolkit/train/trainer_stage.py`). A new TRL method is one more entry here.

Defaults that differ from TRL's are few and said where they are: TRL assumes a GPU (bf16, activation
checkpointing), which `trainer_stage.device_defaults` switches off on a CPU.
"""

from __future__ import annotations

import importlib
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


def teacher_model(ctx: StageContext, model: Any, tokenizer: Any, peft_config: Any) -> dict[str, Any]:
    """The `teacher:` section's model, loaded here (TRL would resolve a path through a top-level transformers
    class, which cannot load a custom architecture). Distillation compares next-token distributions, so the
    teacher must share the student's vocabulary: a mismatch is an error naming both sizes."""
    from toolkit.errors import ToolkitError
    from toolkit.train.trainer_stage import load_pretrained, resolve_model_path

    teacher = ctx.stage.options or {}
    source = resolve_model_path(ctx.stage, ctx.run_folder.path, teacher)
    loaded = load_pretrained(source, teacher, f"stages.{ctx.stage.name}.teacher")
    student_rows = model.get_input_embeddings().num_embeddings
    teacher_rows = loaded.get_input_embeddings().num_embeddings
    if student_rows != teacher_rows:  # the student was sized to its tokenizer
        raise ToolkitError(
            f"stages.{ctx.stage.name}.teacher: {source} has {teacher_rows} embedding rows, the student "
            f"{student_rows} (tokenizer: {len(tokenizer)} tokens); distillation needs one vocabulary"
        )
    return {"teacher_model": loaded.eval()}


@dataclass
class TeacherOptions:
    """A distill stage's `teacher:` section: the model whose next-token distributions the student learns."""

    path: str | None = None  # a local folder or a Hub id
    stage: str | None = None  # or an earlier stage of this recipe (its final/)
    dtype: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False


def teacher_preflight(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """The teacher names exactly one of `path` and `stage`, and a named stage comes earlier and makes a model."""
    from toolkit.stages import find_earlier, get_stage

    teacher = stage.options or {}
    if bool(teacher.get("path")) == bool(teacher.get("stage")):
        problems.add(f"{at}.teacher: give one of 'path' (a folder or Hub id) or 'stage' (an earlier stage)")
        return
    name = teacher.get("stage")
    if teacher.get("path"):
        from toolkit.data.loading import local_path_problem

        if problem := local_path_problem(str(teacher["path"]), folder=True):
            problems.add(f"{at}.teacher.path: {teacher['path']}: {problem}")
    if name and recipe is not None:
        ref = find_earlier(recipe, stage, name)
        if ref.stage is None:
            problems.add(
                f"{at}.teacher.stage: '{name}' is no earlier stage (earlier: {', '.join(ref.earlier) or 'none'})"
            )
        elif not get_stage(ref.stage.method).produces_model:
            problems.add(f"{at}.teacher.stage: stage '{name}' makes no model")


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
register_stage(
    _training(
        "kto",
        "Kahneman-Tversky optimisation on unpaired answers, each labelled good or bad",
        "unpaired",
        TrainerSpec(
            "trl:KTOConfig",
            "trl:KTOTrainer",
            ("prompt", "completion", "label"),
            extras="toolkit.train.methods:reference_model",
            plots=(("rewards/margins",), ("rewards/chosen", "rewards/rejected"), ("kl",)),
        ),
    )
)
# ORPO and CPO need no reference model; TRL keeps them under trl.experimental (importing them warns).
for _method, _module, _name, _about in (
    (
        "orpo",
        "trl.experimental.orpo",
        "ORPO",
        "odds-ratio preference optimisation: SFT and preference in one loss",
    ),
    ("cpo", "trl.experimental.cpo", "CPO", "contrastive preference optimisation (no reference model)"),
):
    register_stage(
        _training(
            _method,
            _about,
            "preference",
            TrainerSpec(
                f"{_module}:{_name}Config",
                f"{_module}:{_name}Trainer",
                ("prompt", "chosen", "rejected"),
                plots=(("rewards/margins",), ("rewards/accuracies",), ("rewards/chosen", "rewards/rejected")),
            ),
        )
    )
register_stage(
    _training(
        "reward",
        "a reward model: a score head trained to rank chosen above rejected (a GRPO reward: {model: PATH})",
        "preference",
        TrainerSpec(
            "trl:RewardConfig",
            "trl:RewardTrainer",
            ("prompt", "chosen", "rejected"),
            model_class="sequence_classification",
            plots=(("accuracy",), ("margin",), ("min_reward", "mean_reward", "max_reward")),
        ),
    )
)
register_stage(
    _training(
        "distill",
        "on-policy distillation: the student matches a teacher's next-token distributions on its own answers",
        "prompt",
        TrainerSpec(
            "trl:DistillationConfig",
            "trl:DistillationTrainer",
            ("prompt",),
            extras="toolkit.train.methods:teacher_model",
            plots=(("completions/mean_length",),),
        ),
        section="teacher",
        schema=TeacherOptions,
        preflight=teacher_preflight,
    )
)

# Distilling a teacher's embeddings into a student that is not a language model (the lattice): its own module.
importlib.import_module("toolkit.train.distill")
# Thought tokens: baking the format in, RL on thoughts with the anti-theater checks.
importlib.import_module("toolkit.train.thought_stages")
# The run's phases in one markdown file (the Agent Forge pipeline ends with it).
importlib.import_module("toolkit.train.phases")
