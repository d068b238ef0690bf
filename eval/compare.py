"""Several artifacts side by side on the same measures: lm-eval tasks (each artifact through its consumer,
`eval.artifacts`), perplexity on one text file (transformers or llama.cpp), in one table. What `toolkit eval A
B ...` prints and what an `evaluate` recipe stage writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from toolkit.io import read_jsonl, write_json, write_text


def artifact_perplexity(artifact: Any, texts: list[str], stride: int | None = None) -> dict[str, Any]:
    """Perplexity of one artifact: a GGUF in llama.cpp (its tokenizer and logits), anything else in
    transformers."""
    from eval.perplexity import gguf_perplexity, perplexity

    if artifact.kind == "gguf":
        return gguf_perplexity(artifact.path, texts, stride=stride)
    return perplexity(*artifact.load(), texts, stride=stride)


def side_by_side(
    artifacts: list[Any],
    *,
    tasks: list[str] | None = None,
    include_path: list[str] | None = None,
    limit: int | None = None,
    chat_template: bool = False,
    perplexity: str | None = None,
    stride: int | None = None,
    stamp: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Each artifact's lm-eval result (saved to its eval folder, as `toolkit eval` does) and perplexity."""
    from eval.harness import check_tasks, markdown_table, run_tasks

    manager = check_tasks(tasks, include_path) if tasks else None
    texts = [row["text"] for row in read_jsonl(perplexity)] if perplexity else None
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    rows: dict[str, dict[str, Any]] = {}
    for artifact in artifacts:
        result: dict[str, Any] = {"results": {}, "n": {}, "artifact": artifact.path, "kind": artifact.kind}
        if tasks:
            with artifact.lm(chat_template=chat_template) as lm:
                result |= run_tasks(
                    lm,
                    tasks,
                    manager=manager,
                    limit=limit,
                    chat_template=chat_template,
                    artifact=artifact.path,
                    dtype=artifact.dtype,
                )
        if texts is not None:
            measured = artifact_perplexity(artifact, texts, stride)
            result["perplexity"] = measured | {"text": perplexity, "stride": stride}
        result["dtype"] = result.get("dtype") or artifact.dtype
        result.setdefault("chat_template", chat_template)
        result.setdefault("limit", limit)
        out = artifact.eval_dir / stamp
        write_json(out / "results.json", result)
        write_text(out / "report.md", markdown_table({artifact.src: result}) + "\n")
        rows[artifact.src] = result | {"saved": str(out / "results.json")}
    return rows


def save_table(rows: dict[str, dict[str, Any]], folder: Path, extra: str = "") -> str:
    """The side-by-side table (and `extra` below it) as `folder/report.md`, every result as
    `folder/results.json`; returns the report."""
    from eval.harness import markdown_table

    report = markdown_table(rows) + (f"\n\n{extra}" if extra else "")
    write_json(folder / "results.json", rows)
    write_text(folder / "report.md", report + "\n")
    return report
