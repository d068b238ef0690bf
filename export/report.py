"""Export reports: `<out>.report.json` for machines and a short markdown table for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.io import write_json


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".report.json")


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write `report` beside the exported file `out`; returns the report's path."""
    path = report_path(out)
    write_json(path, report)
    return path


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) and value not in (0.0, 1.0) else f"{value:g}"


def markdown_table(report: dict[str, Any]) -> str:
    """The checks as a markdown table, with top-1 agreement always shown, then fallbacks and merge drift."""
    lines = [
        f"`{report['gguf']}` ({report['quant']}, arch `{report['arch']}`, pre `{report['tokenizer_pre']}`)",
        "",
        "| measure | value | bound | ok |",
        "|---|---|---|---|",
    ]
    for check in report["checks"]:
        lines.append(
            f"| {check['measure']} | {_fmt(check['value'])} | {check['bound']} | {'yes' if check['ok'] else 'NO'} |"
        )
    bounded = {c["measure"] for c in report["checks"]}
    for name, value in report["measures"].items():
        if name not in bounded:
            lines.append(f"| {name} | {_fmt(value)} | - | - |")
    for name, why in (report.get("fallbacks") or {}).items():
        lines.append(f"\nfallback: `{name}`: {why}")
    if report.get("lora"):
        lines.append(
            f"\nLoRA merged into {report['lora']['base']}: max |delta| vs base+adapter "
            f"{report['lora']['merge_drift_max_abs']:.3g}"
        )
    if bitnet := report.get("bitnet"):
        targets = bitnet["targets"]
        lines.append(
            f"\nBitNet: {bitnet['ternary_share']:.0%} of {bitnet['parameters']:,} parameters ternary; "
            f"{bitnet['compression_vs_f32']}x smaller than float32 (target {targets['compression_vs_f32']}x: "
            f"{'met' if targets['compression_met'] else 'not met'}); zero weights {bitnet['zero_fraction']:.1%} "
            f"(target {targets['zero_fraction']:.0%}: {'met' if targets['zero_fraction_met'] else 'not met'})"
        )
        if accuracy := bitnet.get("accuracy"):
            lines.append(
                f"accuracy (stage {accuracy['stage']}): {accuracy['measure']} {accuracy['full_precision']:.4g} in "
                "full precision, "
                f"{accuracy['ternary']:.4g} ternary: drop {accuracy['drop']:+.1%} (bound {accuracy['max_drop']:.0%}: "
                f"{'met' if accuracy['met'] else 'not met'}); groups: {', '.join(accuracy['groups'])}"
            )
        if decode := bitnet.get("decode"):
            speeds = decode["tokens_per_second"]
            lines.append(
                f"decode in llama.cpp ({decode['threads']} threads): {speeds['ternary']} tokens/s, "
                f"{decode['vs_f16']}x f16 ({speeds['f16']}), {decode['vs_q8_0']}x q8_0 ({speeds['q8_0']})"
            )
    for problem in report.get("file_problems", []) + report.get("tokenization_mismatches", []):
        lines.append(f"\nproblem: {problem!r}")
    return "\n".join(lines)
