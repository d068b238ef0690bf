"""Accuracy on checkable tasks: greedy answers to held-out prompts, scored by exact match.

The prompts go through the model's own chat template, as a user would send them; scoring is
`toolkit.data.tasks.score`, the same rule that built the data. A model baked with thought tokens
(`toolkit.data.thoughts`) is scored on the answer after its thought, and again with the thought ablated (an
empty thought forced before the answer): accuracy both ways, and the share of answers in the thought format.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toolkit.data.tasks import score_answers
from toolkit.data.thoughts import (
    EMPTY_THOUGHT,
    THOUGHT_BUDGET,
    decode_with_thoughts,
    has_thought_tokens,
    score_completions,
    shown,
)
from toolkit.data.tokenizer import answer_budget, end_of_turn_ids


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    show_thoughts: bool = False,
    answer_prefix: str = "",
    sampled: int = 0,
    temperature: float = 1.0,
) -> list[str]:
    """Greedy answers to single-turn user prompts, decoded without special tokens; with `sampled`, that many
    answers per prompt (prompt by prompt) drawn from the model's whole distribution at `temperature`, as an RL
    stage draws them. A model with thought tokens thinks first (THOUGHT_BUDGET more tokens): its answers are
    what follows the thought, or the whole completion with `show_thoughts`. `answer_prefix` is forced after the
    prompt (e.g. an empty thought)."""
    thinking = has_thought_tokens(tokenizer)
    if thinking:
        max_new_tokens += THOUGHT_BUDGET
    decoding: dict[str, Any] = {"do_sample": False}
    if sampled:  # pure sampling, as TRL's RL trainers draw by default
        decoding = {
            "do_sample": True,
            "temperature": temperature,
            "top_k": 0,
            "top_p": 1.0,
            "num_return_sequences": sampled,
        }
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                + answer_prefix
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                **decoding,
                eos_token_id=end_of_turn_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            if thinking:
                texts = [answer_prefix + decode_with_thoughts(tokenizer, ids) for ids in new_tokens.tolist()]
                answers += [shown(t, show_thoughts) for t in texts]
            else:
                answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


@torch.no_grad()
def answer_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    batch_size: int = 32,
) -> float:
    """Mean negative log-likelihood per token of the right answer (and its end-of-turn), teacher-forced.

    Exact match is all or nothing; this moves as soon as a model puts more probability on the right answers,
    so it shows progress on held-out tasks before accuracy does.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            sequences, masks = answer_spans(tokenizer, rows[start : start + batch_size])
            width = max(map(len, sequences))
            pad = tokenizer.pad_token_id
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
            attention = torch.tensor(
                [[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device
            )
            target = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=model.device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            weight = target[:, 1:].float()
            total += (nll * weight).sum().item()
            count += int(weight.sum().item())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def answer_spans(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> tuple[list, list]:
    """Token ids of each rendered conversation up to the end of the answer, and a 0/1 mask of the answer tokens
    (the answer and the token that closes the turn; not the template's trailing newline)."""
    sequences, masks = [], []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        full = prompt + [{"role": "assistant", "content": row["answer"]}]
        prefix = _ids(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
        whole = _ids(tokenizer.apply_chat_template(full, tokenize=True))
        end = len(prefix) + len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + 1
        sequences.append(whole[:end])
        masks.append([0] * len(prefix) + [1] * (end - len(prefix)))
    return sequences, masks


def _ids(encoded: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)` gives a list or a BatchEncoding depending on the version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    samples: int = 5,
    show_thoughts: bool = False,
    sampled: int = 0,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Overall and per-task accuracy on rows `{"task", "prompt", "answer"}`, with the first `samples` answers.
    Answers get `max_new_tokens` (default: enough for the longest right answer, `answer_budget`), recorded.
    With `sampled`, also `sampled_accuracy` (and per task): the mean score of that many answers per prompt drawn
    at `temperature`, the expected exact-answer reward that an RL stage raises (a fixed draw: seed 0, without
    touching the caller's random state).
    A model with thought tokens is also scored with its thoughts ablated (`accuracy_without_thoughts`), and
    `thought_format` is the share of its completions in the format; its samples carry the thought with
    `show_thoughts`."""
    prompts = [r["prompt"] for r in rows]
    if max_new_tokens is None:
        max_new_tokens = answer_budget(tokenizer, [r["answer"] for r in rows])
    drawn: dict[str, Any] = {}
    if sampled:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            answers = generate_answers(
                model,
                tokenizer,
                prompts,
                max_new_tokens,
                batch_size,
                sampled=sampled,
                temperature=temperature,
            )
        scored = score_answers([r for r in rows for _ in range(sampled)], answers, 0)
        drawn = {
            "sampled_accuracy": scored["accuracy"],
            "per_task_sampled": scored["per_task"],
            "sampled": {"per_prompt": sampled, "temperature": temperature},
        }
    if not has_thought_tokens(tokenizer):
        predictions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
        return {
            **score_answers(rows, predictions, samples),
            "answer_nll": answer_nll(model, tokenizer, rows, batch_size),
            "max_new_tokens": max_new_tokens,
            **drawn,
        }
    completions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, show_thoughts=True)
    ablated = generate_answers(
        model, tokenizer, prompts, max_new_tokens, batch_size, answer_prefix=EMPTY_THOUGHT
    )
    without = score_answers(rows, [shown(a, False) for a in ablated], 0)
    return {
        **score_completions(rows, completions, samples, show_thoughts),
        "accuracy_without_thoughts": without["accuracy"],
        "per_task_without_thoughts": without["per_task"],
        "answer_nll": answer_nll(model, tokenizer, rows, batch_size),
        "max_new_tokens": max_new_tokens,
        **drawn,
    }
