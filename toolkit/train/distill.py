"""The `embedding-distill` stage: a student that is not a language model (the lattice) learns to map a
teacher's embedding of a question to the teacher's embedding of its answer.

The pairs come from the stage's `data:` sources and the held-out ones from `distill.heldout`
(toolkit/data/embeddings.py: embedded once by the teacher, cached with `datasets`). The student trains through
transformers' `Trainer` on the loss its forward pass returns (for the lattice: reconstruction, consistency
and dialogue similarity, each logged). Every `eval_every` steps, and before and after training, it is measured
on the held-out pairs: the mean cosine similarity of its predicted answer embedding to the teacher's, and
retrieval accuracy (how often the prediction is nearer to its own answer than to every other held-out answer;
chance is one in the number of pairs). Beside them, the cosine the mean training answer reaches: a student
that predicts one vector for every question scores that much, so only a cosine above it, or a retrieval
accuracy above chance, shows that the answer depends on the question. The measures are logged, plotted and written to `eval.json`.

    - name: lattice
      method: embedding-distill
      model: {preset: lattice-tiny}
      data: {sources: [data/sft/train.jsonl]}
      distill: {teacher: {from: teacher}, pooling: hierarchical}
      train: {max_steps: 300, learning_rate: 1.0e-3, per_device_train_batch_size: 8}
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import RecipeError
from toolkit.io import write_json
from toolkit.stages import StageContext, StageKind, StageOutcome, TrainerSpec, register_stage


@dataclass
class DistillOptions:
    """An embedding-distill stage's `distill:` section."""

    teacher: dict[str, str] = field(default_factory=dict)  # {path: folder or Hub id} or {from: earlier stage}
    pooling: str = "hierarchical"  # mean, last or hierarchical (toolkit/data/embeddings.py)
    max_length: int = 128  # teacher tokens per text
    batch_size: int = 16  # texts per teacher forward pass
    heldout: str = field(
        default="data/eval/heldout.jsonl", metadata={"input": "file"}
    )  # pairs never trained on
    heldout_limit: int = 200
    limit: int | None = None  # at most this many training pairs
    eval_every: int = 50  # steps between held-out measurements
    cache_dir: str | None = None  # where the embedded pairs are kept; default runs/<name>/<stage>/embeddings

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, dict) or len(set(self.teacher) & {"path", "from"}) != 1:
            raise ValueError("teacher: give {path: FOLDER_OR_HUB_ID} or {from: EARLIER_STAGE}")
        from toolkit.data.embeddings import POOLING

        if self.pooling not in POOLING:
            raise ValueError(f"pooling: one of {', '.join(POOLING)}, not {self.pooling!r}")


def heldout_measures(model: Any, questions: Any, answers: Any) -> dict[str, float]:
    """Mean cosine of the predicted answer embeddings to the teacher's, and retrieval accuracy among them."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(question_embeddings=questions.to(model.device)).predicted_embedding.float().cpu()
    model.train(was_training)
    predicted, answers = F.normalize(predicted, dim=-1), F.normalize(answers, dim=-1)
    similarity = predicted @ answers.T
    return {
        "heldout_cosine": round(float(similarity.diagonal().mean()), 6),
        "heldout_retrieval": round(
            float((similarity.argmax(-1) == torch.arange(len(answers))).float().mean()), 6
        ),
    }


def heldout_callback(questions: Any, answers: Any, every: int) -> Any:
    """A Trainer callback that adds the held-out measures to the training log every `every` steps and at the
    last step (placed before MetricsCallback, which writes them). Built here rather than at import: this module
    registers its stage whenever the stage registry loads, and transformers' trainer module takes seconds to
    import."""
    from transformers import TrainerCallback

    class HeldoutCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, model=None, **kwargs) -> None:
            last = state.global_step >= state.max_steps
            if logs is not None and "loss" in logs and (state.global_step % max(1, every) == 0 or last):
                logs.update(heldout_measures(model, questions, answers))

    return HeldoutCallback()


def teacher_source(ctx: StageContext) -> str:
    from toolkit.train.trainer_stage import resolve_model_path

    return resolve_model_path(ctx.stage, ctx.run_folder.path, ctx.stage.options["teacher"])


def run(ctx: StageContext) -> StageOutcome:
    """Embed the pairs (or read them from the cache), train the student, measure it before and after."""
    import torch
    from transformers import AutoModel, Trainer

    from toolkit.data.embeddings import embedded_pairs, load_teacher, read_pairs
    from toolkit.models import build_config, register_auto_classes
    from toolkit.train.callbacks import MetricsCallback, ModelLogCallback, plot_stage
    from toolkit.train.trainer_stage import save_final, train, trainer_args

    stage, options = ctx.stage, ctx.stage.options
    source = teacher_source(ctx)
    cache = Path(options["cache_dir"]) if options.get("cache_dir") else ctx.folder.path / "embeddings"
    started = time.perf_counter()
    teacher = functools.cache(lambda: load_teacher(source))  # loaded once, and only for what is not cached
    datasets, cached = {}, []
    for split, pairs in (
        ("train", read_pairs([source["path"] for source in stage.data["sources"]], options["limit"])),
        ("heldout", read_pairs([options["heldout"]], options["heldout_limit"])),
    ):
        dataset, hit = embedded_pairs(
            source,
            pairs,
            pooling=options["pooling"],
            max_length=options["max_length"],
            batch_size=options["batch_size"],
            cache_dir=cache,
            teacher=teacher,
        )
        datasets[split] = dataset.with_format("torch", columns=["question_embeddings", "answer_embeddings"])
        cached.append(hit)
    print(
        f"[{stage.name}] teacher embeddings: {'read from the cache' if all(cached) else 'computed'} "
        f"({len(datasets['train'])} training and {len(datasets['heldout'])} held-out pairs, "
        f"{time.perf_counter() - started:.1f} s, {cache})",
        flush=True,
    )
    dim = int(datasets["train"][0]["question_embeddings"].shape[-1])

    register_auto_classes()
    spec = stage.model
    if "preset" in spec:
        config = build_config(spec["preset"], teacher_dim=dim, **spec.get("config", {}))
        model = AutoModel.from_config(config)
    else:
        from toolkit.train.trainer_stage import resolve_model_path

        model = AutoModel.from_pretrained(
            resolve_model_path(stage, ctx.run_folder.path), use_safetensors=True
        )
    if getattr(model.config, "teacher_dim", dim) != dim:
        raise RecipeError(
            f"stages.{stage.name}.model: the student reads {model.config.teacher_dim}-d embeddings, the teacher "
            f"({source}) gives {dim}-d ones"
        )
    # The folder says which embeddings it expects.
    model.config.teacher = source
    model.config.pooling = options["pooling"]

    heldout = datasets["heldout"][:]  # every row, the columns as stacked tensors
    questions, answers = heldout["question_embeddings"], heldout["answer_embeddings"]
    before = heldout_measures(model, questions, answers)
    args = trainer_args(ctx, None)
    args.remove_unused_columns = False
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        callbacks=[
            ModelLogCallback(),
            heldout_callback(questions, answers, options["eval_every"]),
            MetricsCallback(ctx.folder.metrics),
        ],
    )
    train(ctx, trainer)
    after = heldout_measures(model, questions, answers)
    save_final(trainer, model, None, ctx.folder.final)
    # What predicting the same vector for every question scores: the mean training answer, as a floor.
    mean_answer = datasets["train"][:]["answer_embeddings"].mean(0, keepdim=True)
    floor = torch.nn.functional.cosine_similarity(mean_answer, answers, dim=-1).mean()
    evaluation = {
        "before": before,
        "after": after,
        "mean_answer_cosine": round(float(floor), 6),
        "chance_retrieval": round(1 / len(answers), 6),
        "heldout_pairs": len(answers),
        "teacher": source,
        "pooling": options["pooling"],
        "embeddings_cached": all(cached),
    }
    write_json(ctx.folder.eval_path, evaluation)
    if trainer.is_world_process_zero():
        plot_stage(
            ctx.folder.metrics,
            ctx.folder.plots,
            f"{ctx.recipe.name}: {stage.name}",
            (tuple(getattr(model, "LOSS_PARTS", ())), ("heldout_cosine",), ("heldout_retrieval",)),
        )
    print(
        f"[{stage.name}] held-out cosine {before['heldout_cosine']:.3f} -> {after['heldout_cosine']:.3f}, "
        f"retrieval {before['heldout_retrieval']:.3f} -> {after['heldout_retrieval']:.3f} "
        f"(the mean answer's cosine {evaluation['mean_answer_cosine']:.3f}, chance retrieval "
        f"{evaluation['chance_retrieval']:.3f})",
        flush=True,
    )
    return StageOutcome(final=ctx.folder.final, model=model, eval=evaluation)


def preflight(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """A teacher named `from` an earlier stage must be one that makes a model."""
    from toolkit.stages import find_earlier, get_stage

    name = ((stage.options or {}).get("teacher") or {}).get("from")
    if name is None:
        return
    ref = find_earlier(recipe, stage, name)
    if ref.stage is None:
        problems.add(f"{at}.distill.teacher.from: '{name}' is not a stage before this one")
    elif not get_stage(ref.stage.method).produces_model:
        problems.add(f"{at}.distill.teacher.from: stage '{name}' ({ref.stage.method}) makes no model")


register_stage(
    StageKind(
        "embedding-distill",
        run=run,
        description="a student (the lattice) learns a teacher's question -> answer embeddings, through Trainer",
        keys=("model", "data", "train"),
        section="distill",
        schema=DistillOptions,
        produces_model=True,
        trainer=TrainerSpec("transformers:TrainingArguments", "transformers:Trainer", ("question", "answer")),
        preflight=preflight,
    )
)

__all__ = ["DistillOptions", "heldout_callback", "heldout_measures", "run"]
