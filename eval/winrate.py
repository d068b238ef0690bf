"""Win-rate of a model against a base model on the same prompts (the Aletheia project's headline metric).

Both models answer every prompt greedily through their chat template. A prompt with a checkable `answer` is
scored exactly (`toolkit.data.tasks.score`, the rule that built the data): the model wins when only its answer
is right, loses when only the base's is, ties otherwise. An open prompt (no `answer`) goes to a pairwise
judge, asked twice with the answers in both orders so that a judge that favours a position cancels out:
the model wins when the judge picks it in both orders, loses when it picks the base in both, and the prompt
is a tie when the two verdicts disagree (or the judge cannot tell). The judge is any HF model (its next-token
log-probabilities of "A" and "B") or an OpenAI-compatible chat endpoint (its top log-probabilities, e.g. a
model this toolkit serves with llama.cpp or vLLM).

The win-rate is the mean score per prompt (win 1, tie 0.5, loss 0) with its standard error and a normal 95%
confidence interval, as AlpacaEval reports it; every verdict is saved next to the result.

No library does pairwise judging of two local models with both-order debiasing and exact scoring side by side
(lm-eval scores one model at a time; AlpacaEval and MT-Bench's judge code assume hosted APIs), so this is ours.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.data.tasks import score
from toolkit.errors import ToolkitError

JUDGE_PROMPT = """Two assistants answered the same user message. Judge which answer is more helpful, correct \
and relevant; ignore their order and their length.

[User message]
{prompt}

[Answer A]
{a}
[End of answer A]

[Answer B]
{b}
[End of answer B]

Which answer is better? Reply with one letter: A or B."""

OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


@dataclass
class Verdict:
    """One question to the judge: which of A and B it picks ("A", "B" or "tie") and by how much (the
    log-probability of "A" minus that of "B")."""

    choice: str
    margin: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "margin": self.margin}


def choose(logprob_a: float | None, logprob_b: float | None) -> Verdict:
    """The verdict from the judge's log-probabilities of the two letters (None: not among its candidates)."""
    a = -math.inf if logprob_a is None else logprob_a
    b = -math.inf if logprob_b is None else logprob_b
    if a == b:
        return Verdict("tie", None if math.isinf(a) else 0.0)
    margin = a - b
    return Verdict("A" if margin > 0 else "B", margin if math.isfinite(margin) else None)


class HFJudge:
    """A transformers causal LM as the judge: the judge prompt as one user turn of its chat template, then its
    next-token log-probabilities of "A" and "B" (no sampling, nothing to parse)."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.letters = [self._letter_id(letter) for letter in "AB"]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ToolkitError(f"judge {self.name}: its tokenizer splits {letter!r} into {len(ids)} tokens")
        return ids[0]

    def __call__(self, text: str) -> Verdict:
        import torch

        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.model.device)).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return choose(*(float(logprobs[i]) for i in self.letters))


class EndpointJudge:
    """An OpenAI-compatible `/v1/chat/completions` endpoint as the judge: one token at temperature 0 with its
    top log-probabilities; the letters' log-probabilities decide, else the letter it wrote."""

    def __init__(self, base_url: str, model: str | None = None, top_logprobs: int = 20) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model or self._first_model()
        self.name = f"{self.base_url} ({self.model})"
        self.top_logprobs = top_logprobs

    def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise ToolkitError(f"judge endpoint {self.base_url}{path}: {error}: {detail}") from error
        except OSError as error:
            raise ToolkitError(f"judge endpoint {self.base_url}{path}: {error}") from error

    def _first_model(self) -> str:
        models = self._post("/v1/models").get("data") or []
        if not models:
            raise ToolkitError(f"judge endpoint {self.base_url} serves no model (GET /v1/models)")
        return models[0]["id"]

    def __call__(self, text: str) -> Verdict:
        reply = self._post(
            "/v1/chat/completions",
            {
                "model": self.model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
            },
        )
        choice = reply["choices"][0]
        found: dict[str, float] = {}
        for entry in ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []:
            letter = entry["token"].strip()
            if letter in ("A", "B") and letter not in found:
                found[letter] = entry["logprob"]
        if found:
            return choose(found.get("A"), found.get("B"))
        written = (choice["message"].get("content") or "").strip()[:1]
        return Verdict(written, None) if written in ("A", "B") else Verdict("tie", None)


def make_judge(spec: str, model_name: str | None = None) -> HFJudge | EndpointJudge:
    """`--judge`: an http(s) URL is an OpenAI-compatible endpoint; anything else a model `toolkit eval` takes
    (run, stage or HF folder, Hub id)."""
    if spec.startswith(("http://", "https://")):
        return EndpointJudge(spec, model_name)
    from eval.artifacts import resolve

    artifact = resolve(spec)
    if artifact.kind == "gguf":
        raise ToolkitError(
            f"judge {spec}: serve the GGUF (`python -m llama_cpp.server --model {spec}`) and pass its URL"
        )
    return HFJudge(*artifact.load(), name=spec)


def judge_pair(judge: Callable[[str], Verdict], prompt: str, model: str, base: str) -> dict[str, Any]:
    """Both orders: first the model's answer as A, then as B. Consistent picks decide; others tie."""
    first = judge(JUDGE_PROMPT.format(prompt=prompt, a=model, b=base))
    second = judge(JUDGE_PROMPT.format(prompt=prompt, a=base, b=model))
    if first.choice == "A" and second.choice == "B":
        outcome = "win"
    elif first.choice == "B" and second.choice == "A":
        outcome = "loss"
    else:
        outcome = "tie"
    return {"outcome": outcome, "model_first": first.as_dict(), "base_first": second.as_dict()}


def exact_outcome(model: str, base: str, answer: str) -> str:
    right, base_right = score(model, answer), score(base, answer)
    return "win" if right and not base_right else "loss" if base_right and not right else "tie"


def summarize(outcomes: list[str]) -> dict[str, Any]:
    """Win/tie/loss counts, the win-rate (ties count half), its standard error and 95% interval."""
    n = len(outcomes)
    scores = [OUTCOME_SCORE[o] for o in outcomes]
    mean = sum(scores) / n if n else math.nan
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    stderr = math.sqrt(variance / n) if n else math.nan
    return {
        "n": n,
        "win": outcomes.count("win"),
        "tie": outcomes.count("tie"),
        "loss": outcomes.count("loss"),
        "win_rate": mean,
        "stderr": stderr,
        "ci95": [max(0.0, mean - 1.96 * stderr), min(1.0, mean + 1.96 * stderr)],
    }


def win_rate(
    rows: list[dict[str, Any]],
    model_answers: list[str],
    base_answers: list[str],
    judge: Callable[[str], Verdict] | None = None,
    where: str = "prompts",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, verdicts) for prompt rows and the two models' answers to them; `judge` is needed only when
    some row has no `answer` (the error names the first such line of `where`)."""
    if judge is None:
        for line, row in enumerate(rows, 1):
            if row.get("answer") is None:
                raise ToolkitError(
                    f"{where}:{line}: an open prompt (no `answer`) needs a judge (--judge MODEL or URL)"
                )
    verdicts = []
    for row, model, base in zip(rows, model_answers, base_answers, strict=True):
        record: dict[str, Any] = {"prompt": row["prompt"], "model": model, "base": base}
        if row.get("answer") is not None:
            record |= {
                "answer": row["answer"],
                "scoring": "exact",
                "outcome": exact_outcome(model, base, row["answer"]),
            }
        else:
            record |= {"scoring": "judge", **judge_pair(judge, row["prompt"], model, base)}  # type: ignore[arg-type]
        if row.get("task"):
            record["task"] = row["task"]
        verdicts.append(record)
    summary = summarize([v["outcome"] for v in verdicts])
    by_scoring = {}
    for scoring in ("exact", "judge"):
        subset = [v["outcome"] for v in verdicts if v["scoring"] == scoring]
        if subset:
            by_scoring[scoring] = summarize(subset)
    summary["by_scoring"] = by_scoring
    return summary, verdicts


def answers_of(artifact: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of an artifact through its chat template: a GGUF in llama.cpp (the template in the file),
    anything else in transformers."""
    if artifact.kind == "gguf":
        from export.llama_cpp import chat_answers

        return chat_answers(Path(artifact.path), prompts, max_tokens=max_new_tokens)
    from eval.accuracy import generate_answers

    model, tokenizer = artifact.load()
    return generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens)


def prompt_text(row: dict[str, Any], where: str, line: int) -> str:
    """A row's prompt: a string, or a conversation whose last turn is the user's (the RL data's shape)."""
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    if not isinstance(prompt, str) or not prompt:
        raise ToolkitError(f"{where}:{line}: no `prompt` (a string, or a conversation ending in a user turn)")
    return prompt


def markdown(summary: dict[str, Any], model: str, base: str, judge: str | None) -> str:
    lines = [
        f"win-rate of {model} against {base}" + (f", judge {judge} (both orders)" if judge else ""),
        "",
        "| scoring | n | win | tie | loss | win-rate | 95% CI |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    parts = [*summary["by_scoring"].items(), ("all", summary)]
    for name, part in parts:
        low, high = part["ci95"]
        lines.append(
            f"| {name} | {part['n']} | {part['win']} | {part['tie']} | {part['loss']} | "
            f"{part['win_rate']:.3f} ± {part['stderr']:.3f} | [{low:.3f}, {high:.3f}] |"
        )
    if "prompts" in summary:  # a saved result: say what it was computed on
        lines += [
            "",
            f"prompts {summary['prompts']} (limit {summary['limit']}); greedy, chat template on, at most "
            f"{summary['max_new_tokens']} new tokens; {summary['model']['src']} {summary['model']['dtype']}, "
            f"{summary['base']['src']} {summary['base']['dtype']}",
        ]
    return "\n".join(lines)


def evaluate_win_rate(
    model: Any,
    base: Any,
    prompts_file: str,
    *,
    limit: int | None = None,
    judge: str | None = None,
    judge_model: str | None = None,
    max_new_tokens: int = 64,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(result, verdicts) of artifact `model` against artifact `base` (eval.artifacts) on a prompts file: the
    summary and everything it was computed on."""
    from toolkit import __version__
    from toolkit.io import read_jsonl

    rows = read_jsonl(prompts_file)[:limit]
    prompts = [prompt_text(row, prompts_file, line) for line, row in enumerate(rows, 1)]
    chosen = make_judge(judge, judge_model) if judge else None
    summary, verdicts = win_rate(
        [{**row, "prompt": prompt} for row, prompt in zip(rows, prompts, strict=True)],
        answers_of(model, prompts, max_new_tokens),
        answers_of(base, prompts, max_new_tokens),
        chosen,
        where=prompts_file,
    )
    result = {
        **summary,
        "model": {"src": model.src, "path": model.path, "kind": model.kind, "dtype": model.dtype},
        "base": {"src": base.src, "path": base.path, "kind": base.kind, "dtype": base.dtype},
        "judge": getattr(chosen, "name", None),
        "prompts": prompts_file,
        "limit": limit,
        "chat_template": True,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "interval": "normal 95% (mean ± 1.96 stderr), win 1 / tie 0.5 / loss 0",
        "toolkit": __version__,
    }
    return result, verdicts


def save_win_rate(folder: Path, result: dict[str, Any], verdicts: list[dict[str, Any]]) -> str:
    """winrate.json, verdicts.jsonl and report.md in `folder`; returns the report's table."""
    from toolkit.io import write_json, write_text

    table = markdown(result, result["model"]["src"], result["base"]["src"], result["judge"])
    write_json(folder / "winrate.json", result)
    write_text(folder / "verdicts.jsonl", "".join(json.dumps(v) + "\n" for v in verdicts))
    write_text(folder / "report.md", table + "\n")
    return table
