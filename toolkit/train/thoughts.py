"""Thought tokens in training: baking the format in, RL on thoughts, and the anti-theater checks.

Two stage kinds, both entries of the generic trainer stage:

- `thought-bake`: SFT on answers written with thoughts (`data/thoughts/`), the twelve thought tokens added to
  the tokenizer. Every `check_every` steps the model answers held-out prompts greedily and the share of
  well-formed answers (`toolkit.data.thoughts.thought_problems`) is logged; training stops once it reaches
  `format_bound` (0.85), and the stage reports whether it did.
- `thought-rl`: TRL's GRPOTrainer with rewards that read the thought (`thought_answer`, `thought_format`) and
  the Quiet-STaR objective as a reward (`thought_gain`: how much more likely the right answer is after the
  model's thought than after an empty one). GRPO samples `num_generations` thoughts per prompt and weighs each
  by its reward minus the group's mean: REINFORCE with a group baseline, as Quiet-STaR's parallel thoughts
  are weighed against their mean; `beta` is the KL penalty against the baked model (TRL's reference model).

Why our own code: Quiet-STaR's reference implementation patches Mistral on transformers 4.37 and nothing in
TRL implements it; TRL's GRPO does the sampling, the group baseline and the KL, so what is ours is the reward
(a forward pass of the policy on the answer) and the checks below.

The anti-theater checks (`theater:` section) run every `check_every` steps and at the end: on held-out
prompts, the model samples `samples` thoughts per prompt; each thought is then followed by a greedy answer,
and so is an empty thought (the ablation) and another prompt's thought (the swap). Measured:
- `ablation_gain`: accuracy after the model's own thoughts minus accuracy after an empty thought;
- `divergence`: mean pairwise distance (1 - Jaccard of token sets) of the thoughts sampled for one prompt;
- `dependence`: the share of answers that change when the thought is swapped for another prompt's.
A run is flagged as theater, in its summary and eval.json, when any falls under its floor (0.02, 0.3, 0.5):
thoughts that do not change the answer, or that are one memorised string, are decoration.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from toolkit.data.tasks import normalise, score
from toolkit.data.thoughts import (
    THOUGHT_END,
    THOUGHT_START,
    THOUGHT_TOKENS,
    decode_with_thoughts,
    split_thought,
    thought_problems,
)
from toolkit.data.tokenizer import answer_budget, end_of_turn_ids
from toolkit.io import read_jsonl, write_json
from toolkit.stages import StageContext, StageOutcome
from toolkit.train.thought_stages import BAKE_REPORT, THEATER_REPORT, BakeOptions, TheaterOptions

# --- generation with the thought tokens kept ------------------------------------------------------------


def prompt_text(tokenizer: Any, prompt: Any) -> str:
    """A user prompt (a string or a conversation) rendered by the chat template, ready for the answer."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_ids(
    model: Any,
    tokenizer: Any,
    inputs: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[list[int]]:
    """New token ids after each input (left-padded batches), cut after the first stop id."""
    import torch

    pad = tokenizer.pad_token_id
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start : start + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=model.device)
                mask = torch.tensor(
                    [[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=model.device
                )
                options = (
                    {"do_sample": True, "temperature": temperature, "top_k": 0}
                    if sample
                    else {"do_sample": False}
                )
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad,
                    **options,
                )
                for row in generated[:, width:].tolist():
                    cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
                    out.append(row[:cut])
    finally:
        model.train(was_training)
    return out


def answers_after(model: Any, tokenizer: Any, prefixes: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers continuing each prefix (a prompt and a closed thought)."""
    stops = end_of_turn_ids(tokenizer)
    return [
        decode_with_thoughts(tokenizer, ids).strip()
        for ids in generate_ids(model, tokenizer, prefixes, max_new_tokens, stops)
    ]


# --- rewards --------------------------------------------------------------------------------------------


def format_reward(model: Any, tokenizer: Any) -> Any:
    """`thought_format`: 1.0 for a completion in the thought format (one thought, each strategy closed, no
    unknown tag, an answer after it), else 0.0."""

    def thought_format(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [float(not thought_problems(decode_with_thoughts(tokenizer, ids))) for ids in completion_ids]

    return thought_format


def answer_reward(model: Any, tokenizer: Any) -> Any:
    """`thought_answer`: 1.0 when the answer after the thought gives the row's `answer`."""

    def thought_answer(completion_ids: list[list[int]], answer: list[str], **_: Any) -> list[float]:
        return [
            float(score(split_thought(decode_with_thoughts(tokenizer, ids)).answer, right))
            for ids, right in zip(completion_ids, answer, strict=True)
        ]

    return thought_answer


def gain_reward(model: Any, tokenizer: Any, limit: float = 5.0) -> Any:
    """`thought_gain`, Quiet-STaR's reward: the mean log-likelihood per token of the right answer after the
    completion's thought, minus the same after an empty thought (teacher-forced, the policy itself, no
    gradient). A thought that makes the right answer more likely scores above 0. Clipped to +-`limit` nats."""
    import torch

    start = tokenizer.convert_tokens_to_ids(THOUGHT_START)
    end = tokenizer.convert_tokens_to_ids(THOUGHT_END)
    eot = end_of_turn_ids(tokenizer)[:1]

    def answer_logprob(prefixes: list[list[int]], answers: list[list[int]]) -> list[float]:
        sequences = [p + a for p, a in zip(prefixes, answers, strict=True)]
        width = max(map(len, sequences))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
        finally:
            model.train(was_training)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        values = []
        for row, (p, a) in enumerate(zip(prefixes, answers, strict=True)):
            values.append(logprobs[row, len(p) - 1 : len(p) - 1 + len(a)].mean().item())
        return values

    def thought_gain(
        prompts: list[Any], completion_ids: list[list[int]], answer: list[str], **_: Any
    ) -> list[float]:
        prefixes = [encode(tokenizer, prompt_text(tokenizer, p)) for p in prompts]
        right = [encode(tokenizer, a) + eot for a in answer]
        thoughts = []
        for ids in completion_ids:
            ids = list(ids)
            inner = ids[ids.index(start) + 1 :] if start in ids else ids
            thoughts.append(inner[: inner.index(end)] if end in inner else None)
        with_thought = [
            p + [start] + t + [end] if t is not None else p + [start, end]
            for p, t in zip(prefixes, thoughts, strict=True)
        ]
        baseline = answer_logprob([p + [start, end] for p in prefixes], right)
        after = answer_logprob(with_thought, right)
        return [
            max(-limit, min(limit, a - b)) if t is not None else 0.0
            for a, b, t in zip(after, baseline, thoughts, strict=True)
        ]

    return thought_gain


# --- baking: format accuracy until the bound ------------------------------------------------------------


def _rows(path: str, limit: int) -> list[dict[str, Any]]:
    return read_jsonl(Path(path))[:limit]


def format_check(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int
) -> dict[str, Any]:
    """Greedy answers to `rows`: the share in the thought format, and the share whose answer is right."""
    prefixes = [encode(tokenizer, prompt_text(tokenizer, r["prompt"])) for r in rows]
    texts = [
        decode_with_thoughts(tokenizer, ids)
        for ids in generate_ids(model, tokenizer, prefixes, max_new_tokens, end_of_turn_ids(tokenizer))
    ]
    well_formed = [not thought_problems(t) for t in texts]
    right = [score(split_thought(t).answer, r["answer"]) for t, r in zip(texts, rows, strict=True)]
    return {
        "format_accuracy": sum(well_formed) / len(rows),
        "accuracy": sum(right) / len(rows),
        "samples": [
            {"prompt": r["prompt"], "completion": t} for r, t in zip(rows[:3], texts[:3], strict=True)
        ],
    }


class PeriodicCheck(TrainerCallback):
    """A measure of the model every `check_every` steps and once at the end: its numbers logged to the stage's
    metrics.jsonl under `prefix/` (plotted with the stage), the whole result written to the stage's report."""

    prefix = ""
    options_class: type = object

    def __init__(self, options: dict[str, Any], tokenizer: Any, metrics: Path, report: Path) -> None:
        self.options = self.options_class(**options)
        self.tokenizer = tokenizer
        self.metrics, self.report = metrics, report
        self.rows = _rows(self.options.tasks, self.options.limit)
        self.history: list[dict[str, Any]] = []

    def measure(self, model: Any) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, measured: dict[str, Any]) -> dict[str, Any]:
        """What the report holds beside the measures."""
        return {}

    def after(self, measured: dict[str, Any], state: Any, control: Any) -> None:
        """What a check decides for the training (nothing by default)."""

    def check(self, state: Any, model: Any) -> dict[str, Any]:
        measured = self.measure(model)
        numbers = {k: float(v) for k, v in measured.items() if isinstance(v, (int, float))}
        self.history.append(
            {"step": state.global_step, **{f"{self.prefix}/{k}": v for k, v in numbers.items()}}
        )
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(self.history[-1]) + "\n")
        report = {**measured, **self.summary(measured), "step": state.global_step, "history": self.history}
        write_json(self.report, report)
        return measured

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A resumed stage keeps the checks made up to the step it resumes from."""
        if self.report.exists() and state.global_step > 0:
            earlier = json.loads(self.report.read_text()).get("history", [])
            self.history = [h for h in earlier if h["step"] <= state.global_step]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and state.global_step % self.options.check_every == 0:
            self.after(self.check(state, model), state, control)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and (
            not self.history or self.history[-1]["step"] != state.global_step
        ):
            self.check(state, model)


class FormatCallback(PeriodicCheck):
    """Baking: the format accuracy; training stops once it reaches the bound (when `stop_at_bound`, after
    `min_steps`)."""

    prefix = "thoughts"
    options_class = BakeOptions

    def measure(self, model: Any) -> dict[str, Any]:
        return format_check(model, self.tokenizer, self.rows, self.options.max_new_tokens)

    def summary(self, measured: dict[str, Any]) -> dict[str, Any]:
        bound = self.options.format_bound
        first = next((r["step"] for r in self.history if r["thoughts/format_accuracy"] >= bound), None)
        return {"bound": bound, "passed": measured["format_accuracy"] >= bound, "first_passed_at": first}

    def after(self, measured: dict[str, Any], state: Any, control: Any) -> None:
        reached = measured["format_accuracy"] >= self.options.format_bound
        if self.options.stop_at_bound and reached and state.global_step >= self.options.min_steps:
            control.should_training_stop = True


# --- anti-theater ---------------------------------------------------------------------------------------


def _jaccard_distance(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return 1.0 - len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def theater_measures(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], options: TheaterOptions
) -> dict[str, Any]:
    """Accuracy after the model's own thoughts, after an empty thought and after another prompt's thought;
    the thoughts' divergence across samples; the verdict against the floors."""
    import torch

    torch.manual_seed(options.seed)  # the same draw at every check: changes come from the model
    start = tokenizer.convert_tokens_to_ids(THOUGHT_START)
    end = tokenizer.convert_tokens_to_ids(THOUGHT_END)
    prefixes = [encode(tokenizer, prompt_text(tokenizer, r["prompt"])) + [start] for r in rows]
    stops = [end, *end_of_turn_ids(tokenizer)]
    drawn = generate_ids(
        model,
        tokenizer,
        [p for p in prefixes for _ in range(options.samples)],
        options.max_new_tokens,
        stops,
        sample=True,
        temperature=options.temperature,
    )
    # thought ids per (prompt, sample), without the closing token
    thoughts = [[t for t in ids if t not in stops] for ids in drawn]
    closed = [bool(ids) and ids[-1] == end for ids in drawn]
    n, k = len(rows), options.samples
    budget = answer_budget(tokenizer, [r["answer"] for r in rows])
    own = answers_after(
        model, tokenizer, [prefixes[i // k] + t + [end] for i, t in enumerate(thoughts)], budget
    )
    ablated = answers_after(model, tokenizer, [p + [end] for p in prefixes], budget)
    # the thought of the next prompt (same sample index): a derangement whenever there are two prompts or more
    swapped = answers_after(
        model,
        tokenizer,
        [prefixes[i // k] + thoughts[((i // k + 1) % n) * k + i % k] + [end] for i in range(n * k)],
        budget,
    )
    answers = [r["answer"] for r in rows for _ in range(k)]
    accuracy = sum(score(a, r) for a, r in zip(own, answers, strict=True)) / (n * k)
    accuracy_ablated = sum(score(a, r["answer"]) for a, r in zip(ablated, rows, strict=True)) / n
    pairs = [
        _jaccard_distance(thoughts[i * k + x], thoughts[i * k + y])
        for i in range(n)
        for x, y in itertools.combinations(range(k), 2)
    ]
    divergence = sum(pairs) / len(pairs) if pairs else 0.0
    dependence = (
        sum(normalise(a) != normalise(b) for a, b in zip(own, swapped, strict=True)) / (n * k)
        if n > 1
        else 0.0
    )
    measures = {
        "accuracy": accuracy,
        "accuracy_ablated": accuracy_ablated,
        "ablation_gain": accuracy - accuracy_ablated,
        "divergence": divergence,
        "dependence": dependence,
        "closed": sum(closed) / len(closed),
    }
    reasons = []
    if divergence < options.min_divergence:
        reasons.append(
            f"divergence {divergence:.2f} < {options.min_divergence} (the thoughts are one string)"
        )
    if measures["ablation_gain"] < options.min_ablation_gain:
        reasons.append(
            f"ablation gain {measures['ablation_gain']:+.3f} < {options.min_ablation_gain} (answers are as good without the thought)"
        )
    if dependence < options.min_dependence:
        reasons.append(
            f"dependence {dependence:.2f} < {options.min_dependence} (another prompt's thought changes few answers)"
        )
    sample = [
        {
            "prompt": rows[i // k]["prompt"],
            "thought": decode_with_thoughts(tokenizer, thoughts[i]),
            "answer": own[i],
        }
        for i in range(0, min(n * k, 3 * k), k)
    ]
    return {**measures, "theater": bool(reasons), "reasons": reasons, "samples": sample}


class TheaterCallback(PeriodicCheck):
    """Thought RL: the anti-theater checks (theater.json, `theater/` measures plotted)."""

    prefix = "theater"
    options_class = TheaterOptions

    def measure(self, model: Any) -> dict[str, Any]:
        return theater_measures(model, self.tokenizer, self.rows, self.options)

    def summary(self, measured: dict[str, Any]) -> dict[str, Any]:
        return {"floors": asdict(self.options)}


# --- the two stage kinds (registered in toolkit.train.thought_stages) -----------------------------------


def bake_callbacks(ctx: StageContext, model: Any, tokenizer: Any) -> list[Any]:
    return [
        FormatCallback(ctx.stage.options or {}, tokenizer, ctx.folder.metrics, ctx.folder.path / BAKE_REPORT)
    ]


def theater_callbacks(ctx: StageContext, model: Any, tokenizer: Any) -> list[Any]:
    options = ctx.stage.sections.get("theater") or {}
    return [TheaterCallback(options, tokenizer, ctx.folder.metrics, ctx.folder.path / THEATER_REPORT)]


def _with_thought_tokens(ctx: StageContext) -> None:
    """The stage's tokenizer gets the twelve tokens (those it already has keep their ids)."""
    added = list(ctx.stage.model.get("add_special_tokens") or [])
    ctx.stage.model["add_special_tokens"] = added + [t for t in THOUGHT_TOKENS if t not in added]


def _report(ctx: StageContext, outcome: StageOutcome, name: str, key: str) -> StageOutcome:
    path = ctx.folder.path / name
    if path.exists():
        outcome.eval = {**(outcome.eval or {}), key: json.loads(path.read_text())}
    return outcome


def run_bake(ctx: StageContext) -> StageOutcome:
    from toolkit.train import trainer_stage

    _with_thought_tokens(ctx)
    return _report(ctx, trainer_stage.run(ctx), BAKE_REPORT, "thoughts")


def run_rl(ctx: StageContext) -> StageOutcome:
    from toolkit.train import trainer_stage

    _with_thought_tokens(ctx)
    return _report(ctx, trainer_stage.run(ctx), THEATER_REPORT, "theater")
