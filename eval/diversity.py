"""The `diversity` stage: how differently several recursive models behave, the report Agent Forge's Cognate phase
ends with before its models are merged (a merge of near-identical models gains nothing).

For each model (an earlier stage's final/), on the same held-out prompts through its chat template:

- `halting_steps`: mean refinement steps the model runs before its halting head stops it (adaptive halting,
  at the prompt's last position); a model without a halting head has none;
- `memory_use`: mean of (1 - gate) over the blocks' MAG gates on the prompts, the share of each block's
  token mixing that comes from the long-term memory;
- `tokens_per_second`: greedy decoding of `max_new_tokens` tokens per prompt, one prompt at a time, with the
  cache, as a user's generate runs (adaptive halting: a model that stops early decodes faster);
- `accuracy`: exact-match answers on the prompts' tasks.

Diversity of a pair is the relative difference of each measure, |a - b| / max(|a|, |b|); the pair's
distance is the mean of the three; the models are diverse when every pair's distance exceeds `threshold`
(0.3, the seed's figure). Written to `diversity.json` and `report.md` in the stage folder.

    - name: diversity
      method: diversity
      diversity: {models: [reasoning, memory, speed], prompts: data/eval/heldout.jsonl, limit: 50}
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from toolkit.io import read_jsonl, write_json, write_text
from toolkit.stages import StageContext, StageOutcome

MEASURES = ("halting_steps", "memory_use", "tokens_per_second")


@dataclass
class DiversityOptions:
    """A diversity stage's `diversity:` section."""

    models: list[str] = field(default_factory=list)  # earlier stages whose models are compared
    prompts: str = field(
        default="data/eval/heldout.jsonl", metadata={"input": "file"}
    )  # task, prompt, answer
    limit: int = 50  # the first N prompts
    max_new_tokens: int = 16
    threshold: float = 0.3  # the least mean relative difference every pair must show

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError("name at least two stages under models, whose models are compared")


def chat_ids(tokenizer: Any, prompt: str) -> Any:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def profile(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """The measures of one model (see the module docstring) on `rows`."""
    import torch

    from eval.accuracy import generate_answers
    from toolkit.data.tasks import score_answers

    model.eval()
    if hasattr(model.config, "halting"):
        model.config.halting = "adaptive"
    steps, memory = [], []
    blocks = [
        m for m in model.modules() if hasattr(m, "memory_use") and getattr(m, "memory", None) is not None
    ]
    generated, seconds = 0, 0.0
    with torch.no_grad():
        for row in rows:
            ids = chat_ids(tokenizer, row["prompt"])
            out = model(input_ids=ids)
            if getattr(out, "halting_steps", None) is not None:
                steps.append(float(out.halting_steps.float().mean()))
            if blocks:
                memory.append(sum(b.memory_use for b in blocks) / len(blocks))
            started = time.perf_counter()
            new = model.generate(
                input_ids=ids,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # the same count for every model: a rate, not an answer
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            seconds += time.perf_counter() - started
            generated += new.shape[1] - ids.shape[1]
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    return {
        "halting_steps": sum(steps) / len(steps) if steps else None,
        "memory_use": sum(memory) / len(memory) if memory else None,
        "tokens_per_second": generated / seconds if seconds else None,
        "accuracy": score_answers(rows, answers)["accuracy"],
        "prompts": len(rows),
    }


def relative_difference(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def compare(profiles: dict[str, dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Pairwise relative differences of each measure, each pair's distance, and the verdict."""
    pairs = []
    for a, b in itertools.combinations(profiles, 2):
        differences = {m: relative_difference(profiles[a][m], profiles[b][m]) for m in MEASURES}
        known = [d for d in differences.values() if d is not None]
        distance = sum(known) / len(known) if known else None
        pairs.append({"pair": [a, b], **differences, "distance": distance})
    diverse = all(p["distance"] is not None and p["distance"] > threshold for p in pairs)
    return {"pairs": pairs, "threshold": threshold, "diverse": diverse}


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_markdown(profiles: dict[str, dict[str, Any]], verdict: dict[str, Any]) -> str:
    lines = [
        "| model | halting steps | memory use | tokens/s | accuracy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, p in profiles.items():
        lines.append(
            f"| {name} | {_number(p['halting_steps'], 2)} | {_number(p['memory_use'])} | "
            f"{_number(p['tokens_per_second'], 1)} | {_number(p['accuracy'])} |"
        )
    lines += [
        "",
        "| pair | halting steps | memory use | tokens/s | distance |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p in verdict["pairs"]:
        lines.append(
            f"| {' / '.join(p['pair'])} | {_number(p['halting_steps'])} | {_number(p['memory_use'])} | "
            f"{_number(p['tokens_per_second'])} | {_number(p['distance'])} |"
        )
    word = "diverse" if verdict["diverse"] else "NOT diverse"
    lines += [
        "",
        f"Relative differences |a - b| / max(|a|, |b|); distance = their mean. {word}: every pair's distance "
        f"{'exceeds' if verdict['diverse'] else 'must exceed'} {verdict['threshold']}.",
    ]
    return "\n".join(lines)


def run_diversity(ctx: StageContext) -> StageOutcome:
    """Profile each named stage's model, compare them pairwise, write diversity.json and report.md."""
    from eval.stages import load_model_folder

    spec = ctx.stage.options
    rows = read_jsonl(spec["prompts"])[: spec["limit"]]
    profiles = {}
    for name in spec["models"]:
        folder = ctx.run_folder.stage(name).final
        model, tokenizer = load_model_folder(folder)
        profiles[name] = profile(model, tokenizer, rows, spec["max_new_tokens"])
        print(f"[{ctx.stage.name}] {name}: {json.dumps(profiles[name])}")
    verdict = compare(profiles, spec["threshold"])
    report = report_markdown(profiles, verdict)
    write_json(ctx.folder.path / "diversity.json", {"models": profiles, **verdict})
    write_text(ctx.folder.path / "report.md", report + "\n")
    print(report)
    evaluation = {"models": profiles, **verdict, "report": report}
    return StageOutcome(
        final=ctx.folder.path, eval=evaluation, details={"report": str(ctx.folder.path / "report.md")}
    )


def preflight_diversity(stage: Any, at: str, problems: Any, recipe: Any = None) -> None:
    """Every named model is an earlier stage that produces one."""
    from toolkit.stages import find_earlier, get_stage

    for name in (stage.options or {}).get("models") or []:
        ref = find_earlier(recipe, stage, name)
        if ref.stage is None:
            problems.add(f"{at}.diversity.models: '{name}' is not a stage before this one")
        elif not get_stage(ref.stage.method).produces_model:
            problems.add(f"{at}.diversity.models: stage '{name}' ({ref.stage.method}) makes no model")


def register() -> None:
    from toolkit.stages import StageKind, register_stage

    register_stage(
        StageKind(
            "diversity",
            run=run_diversity,
            description="how differently recursive models behave: halting steps, memory use, speed, pairwise",
            section="diversity",
            schema=DiversityOptions,
            preflight=preflight_diversity,
        )
    )


__all__ = ["DiversityOptions", "compare", "profile", "register", "relative_difference", "run_diversity"]
