"""The end-of-run report: each stage's evaluation side by side, sample answers per stage, and where things are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.run_folder import RunFolder, StageFolder, read_metrics
from toolkit.train.runner import StageResult


def format_summary(run_dir: Path, results: list[StageResult]) -> str:
    """A plain-text report of a finished run (what `toolkit train` prints last)."""
    lines = [f"Run {run_dir}", ""]
    legend = (
        "accuracy: exact answers to held-out questions (greedy); sampled: the mean score of answers drawn "
        "from the model (an RL stage's expected exact-answer reward); answer nll: nats per token of the right "
        "answer (lower is better); perplexity: on held-out text"
    )
    # A side-by-side report (an `evaluate` stage) is printed whole, last.
    evaluated = [r for r in results if r.eval and ("tasks" in r.eval or "perplexity" in r.eval)]
    reports = [r for r in results if r.eval and "report" in r.eval]
    if evaluated:
        tasks = sorted({t for r in evaluated for t in r.eval.get("tasks", {}).get("per_task", {})})
        # Models with thought tokens are also scored with the thought ablated (an empty thought).
        thinking = any("accuracy_without_thoughts" in m.get("tasks", {}) for _, m in _evaluations(evaluated))
        drawn = any("sampled_accuracy" in m.get("tasks", {}) for _, m in _evaluations(evaluated))
        header = [
            "stage",
            "accuracy",
            *(["sampled"] if drawn else []),
            *(["no thoughts"] if thinking else []),
            "answer nll",
            "perplexity",
            *tasks,
        ]
        rows = []
        for name, measured in _evaluations(evaluated):
            acc = measured.get("tasks", {})
            ppl = measured.get("perplexity", {}).get("perplexity")
            ablated = acc.get("accuracy_without_thoughts")
            sampled = acc.get("sampled_accuracy")
            rows.append(
                [
                    name,
                    f"{acc['accuracy']:.3f}" if acc else "-",
                    *([f"{sampled:.3f}" if sampled is not None else "-"] if drawn else []),
                    *([f"{ablated:.3f}" if ablated is not None else "-"] if thinking else []),
                    f"{acc['answer_nll']:.3f}" if "answer_nll" in acc else "-",
                    f"{ppl:.2f}" if ppl else "-",
                    *(f"{acc.get('per_task', {}).get(t, float('nan')):.2f}" for t in tasks),
                ]
            )
        lines += _table(header, rows) + [legend, ""]
        samples = [(n, m) for n, m in _evaluations(evaluated) if m.get("tasks", {}).get("samples")]
        if samples:
            width = max(len(n) for n, _ in samples)
            lines.append("Held-out prompts, answered by each stage:")
            for i, first in enumerate(samples[0][1]["tasks"]["samples"]):
                lines.append(f"  Q: {first['prompt']}   (expected: {first['answer']})")
                for name, measured in samples:
                    answers = measured["tasks"]["samples"]
                    if i < len(answers):
                        lines.append(f"     {name:>{width}}: {answers[i]['prediction'][:70]!r}")
            lines.append("")
    lines += _rewards(RunFolder(run_dir), results)
    lines += _thoughts(results)
    for r in results:
        if r.eval and r.eval.get("vllm"):
            lines += [
                f"{r.name}: {r.eval['vllm']} ({r.eval.get('form')}) verified in "
                f"{', '.join(r.eval.get('verified_in') or ['nothing'])}; serve it: toolkit serve {r.eval['vllm']}",
                "",
            ]
        if r.eval and r.eval.get("hf"):
            how = (
                "with its modelling files (trust_remote_code=True)" if r.eval.get("remote_code") else "as is"
            )
            lines += [
                f"{r.name}: {r.eval['hf']} loads with from_pretrained {how}, checked in a clean process; "
                f"push it: toolkit push {r.eval['hf']} --repo USER/NAME",
                "",
            ]
        measures = (r.eval or {}).get("verification")
        if measures:
            lines.append(
                f"{r.name}: {r.eval['gguf']} verified in llama.cpp against transformers: mean KL "
                f"{measures['mean_kl']:.2e}, top-1 agreement {measures['top1_agreement']:.3f}, max |dlogit| "
                f"{measures['max_abs_logit_delta']:.3g}, chat template and tokenization identical: "
                f"{bool(measures['chat_template_identical'] and measures['tokenization_identical'])}"
            )
            lines.append(f"  run it: ollama create {run_dir.name} -f {r.final / 'Modelfile'}")
            lines.append("")
    lines.append("Artifacts:")
    for r in results:
        lines.append(f"  {r.name:>10}: {r.final}")
        plot = r.final.parent / "plots" / "loss.png"
        if plot.exists():
            lines.append(f"  {'':>10}  {plot}")
    for r in reports:
        lines += ["", f"Side by side ({r.name}, {r.final / 'report.md'}):", "", r.eval["report"]]
    return "\n".join(lines)


def _evaluations(results: list[StageResult]) -> list[tuple[str, dict[str, Any]]]:
    """(row name, measures) per evaluated stage; a stage evaluated before it trained gets a row for that first."""
    rows = []
    for r in results:
        if "before" in r.eval:
            rows.append((f"{r.name} (before)", r.eval["before"]))
        rows.append((r.name, r.eval))
    return rows


def _rewards(run: RunFolder, results: list[StageResult], window: int = 10) -> list[str]:
    """For RL stages: the mean reward and the share of prompt groups without reward variance, over the first
    and the last `window` logged steps."""
    lines = []
    for r in results:
        logged = [m for m in read_metrics(StageFolder(run, r.name, r.method).metrics) if "reward" in m]
        if not logged:
            continue
        first, last = logged[:window], logged[-window:]

        def mean(rows: list[dict[str, Any]], key: str) -> float:
            values = [m[key] for m in rows if isinstance(m.get(key), (int, float))]
            return sum(values) / len(values) if values else float("nan")

        lines.append(
            f"{r.name}: reward {mean(first, 'reward'):.3f} (first {len(first)} logged steps) -> "
            f"{mean(last, 'reward'):.3f} (last {len(last)}); groups with zero reward variance "
            f"{mean(first, 'frac_reward_zero_std'):.0%} -> {mean(last, 'frac_reward_zero_std'):.0%}"
        )
    return [*lines, ""] if lines else []


def _thoughts(results: list[StageResult]) -> list[str]:
    """Thought stages: whether baking reached the format bound, and the anti-theater verdict."""
    from toolkit.train.phases import thought_lines

    lines = [
        line if line.startswith("  ") else f"{r.name}: {line}"
        for r in results
        for line in thought_lines(r.eval or {})
    ]
    return [*lines, ""] if lines else []


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)]
