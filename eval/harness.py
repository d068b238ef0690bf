"""lm-eval-harness tasks on a model: the toolkit's own tasks (`eval/tasks/`), a user's task folder, or any task
name lm-eval knows, through lm-eval's own HF model class on the loaded model object (so the toolkit's
registered architectures run exactly as transformers' own classes do).

The result keeps lm-eval's `results` mapping (task -> metric -> value, e.g. `exact_match,none`, with
`..._stderr,none`) and says what it was computed on: the artifact, its dtype, the chat template on or off,
`limit`, the number of documents of each task, and lm-eval's version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).with_name("tasks")
LOCAL_TASKS = ("forge_heldout", "forge_heldout_choice", "forge_corpus")


def task_manager(include_path: list[str | Path] | None = None) -> Any:
    """lm-eval's TaskManager with the toolkit's tasks and the user's folders (lm-eval's `--include_path`)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path or [])])


def check_tasks(tasks: list[str], include_path: list[str | Path] | None = None) -> Any:
    """lm-eval's task manager, once every name in `tasks` is known to it (else an error with the nearest)."""
    manager = task_manager(include_path)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        from toolkit.errors import ToolkitError, nearest

        guesses = {name: nearest(name, manager.all_tasks) for name in unknown}
        hints = [
            f"'{name}'" + (f" (did you mean '{guess}'?)" if guess else "") for name, guess in guesses.items()
        ]
        raise ToolkitError(
            f"lm-eval knows no task {', '.join(hints)}; the toolkit's own: {', '.join(LOCAL_TASKS)}"
        )
    return manager


def hf_lm(model: Any, tokenizer: Any, batch_size: int = 1) -> Any:
    """lm-eval's HF model class on a model object in memory (any registered architecture)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(
    lm: Any,
    tasks: list[str],
    *,
    include_path: list[str | Path] | None = None,
    limit: int | None = None,
    chat_template: bool = False,
    artifact: str | None = None,
    dtype: str | None = None,
    manager: Any = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of the lm-eval model `lm` (`hf_lm`, `eval.gguf_lm.GGUFLM`, ...) on
    `tasks`; see the module docstring for what is returned."""
    import lm_eval

    manager = manager or check_tasks(tasks, include_path)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        apply_chat_template=chat_template,
        log_samples=False,
    )
    if dtype is None:
        model = getattr(lm, "model", None)
        dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    return {
        "results": output["results"],
        "n": {name: sample["effective"] for name, sample in output.get("n-samples", {}).items()},
        "split": {
            name: config.get("test_split") or config.get("validation_split")
            for name, config in output.get("configs", {}).items()
        },
        "artifact": artifact,
        "dtype": dtype,
        "chat_template": chat_template,
        "limit": limit,
        "harness": f"lm-eval {lm_eval.__version__}",
    }


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """One table for one or more artifacts (rows) by task/metric (columns), value ± stderr; a perplexity
    column (tokens counted) where a row has one (`eval.compare`)."""
    columns: list[tuple[str, str]] = []
    for result in rows.values():
        for task, metrics in result.get("results", {}).items():
            for key in metrics:
                if "," in key and "_stderr" not in key and (task, key) not in columns:
                    columns.append((task, key))
    with_perplexity = any("perplexity" in result for result in rows.values())
    names = [f"{task} {key.split(',')[0]}" for task, key in columns]
    names += ["perplexity", "tokens"] if with_perplexity else []
    lines = ["| artifact | dtype | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for name, result in rows.items():
        cells = []
        for task, key in columns:
            metrics = result["results"].get(task, {})
            value = metrics.get(key)
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            if not isinstance(value, (int, float)):
                cells.append("")
            elif isinstance(stderr, (int, float)):
                cells.append(f"{value:.4g} ± {stderr:.2g}")
            else:
                cells.append(f"{value:.4g}")
        if with_perplexity:
            measured = result.get("perplexity")
            cells += [f"{measured['perplexity']:.4f}", str(measured["tokens"])] if measured else ["", ""]
        lines.append(f"| {name} | {result['dtype']} | " + " | ".join(cells) + " |")
    first = next(iter(rows.values()))
    notes = []
    if columns:
        notes.append(
            f"chat template {'on' if first['chat_template'] else 'off'}; limit {first['limit']}; "
            "n "
            + ", ".join(
                f"{task} {n} ({first.get('split', {}).get(task) or '?'} split)"
                for task, n in first["n"].items()
            )
            + f"; {first.get('harness', '')}"
        )
    if with_perplexity:
        text = next(r["perplexity"]["text"] for r in rows.values() if "perplexity" in r)
        stride = next(r["perplexity"].get("stride") for r in rows.values() if "perplexity" in r)
        notes.append(
            f"perplexity on {text}, "
            + (
                f"sliding 256-token window, stride {stride}"
                if stride
                else "non-overlapping 256-token windows"
            )
        )
    return "\n".join([*lines, "", *notes])
