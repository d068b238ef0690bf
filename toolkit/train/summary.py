"""The end-of-run report: each stage's evaluation side by side, sample answers per stage, and where things are."""

from __future__ import annotations

from pathlib import Path

from toolkit.train.runner import StageResult


def format_summary(run_dir: Path, results: list[StageResult]) -> str:
    """A plain-text report of a finished run (what `toolkit train` prints last)."""
    lines = [f"Run {run_dir}", ""]
    legend = (
        "accuracy: exact answers to held-out questions; answer nll: nats per token of the right answer "
        "(lower is better); perplexity: on held-out text"
    )
    evaluated = [r for r in results if r.eval]
    if evaluated:
        tasks = sorted({t for r in evaluated for t in r.eval.get("tasks", {}).get("per_task", {})})
        header = ["stage", "accuracy", "answer nll", "perplexity", *tasks]
        rows = []
        for r in evaluated:
            acc = r.eval.get("tasks", {})
            ppl = r.eval.get("perplexity", {}).get("perplexity")
            rows.append(
                [
                    r.name,
                    f"{acc['accuracy']:.3f}" if acc else "-",
                    f"{acc['answer_nll']:.3f}" if "answer_nll" in acc else "-",
                    f"{ppl:.2f}" if ppl else "-",
                    *(f"{acc.get('per_task', {}).get(t, float('nan')):.2f}" for t in tasks),
                ]
            )
        lines += _table(header, rows) + [legend, ""]
        samples = [r for r in evaluated if r.eval.get("tasks", {}).get("samples")]
        if samples:
            lines.append("Held-out prompts, answered by each stage:")
            for i, first in enumerate(samples[0].eval["tasks"]["samples"]):
                lines.append(f"  Q: {first['prompt']}   (expected: {first['answer']})")
                for r in samples:
                    answers = r.eval["tasks"]["samples"]
                    if i < len(answers):
                        lines.append(f"     {r.name:>10}: {answers[i]['prediction'][:70]!r}")
            lines.append("")
    for r in evaluated:
        measures = r.eval.get("verification")
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
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)]
