"""`toolkit push SRC --repo USER/NAME`: a servable model folder, its GGUF files and a model card, to the Hub.

SRC is a folder written by `toolkit export vllm` (a LoRA export pushes its `merged/` model), a run folder
holding one in `vllm/`, or a native transformers folder. A folder that would not load without forge-toolkit
(a `decoder` model_type without `auto_map`) is refused: export it first. GGUF files and the Modelfile found
under the run's `gguf/` go to the repository root, where llama.cpp (`-hf USER/NAME:QUANT`) and Ollama
(`ollama run hf.co/USER/NAME:QUANT`) look for them.

The README.md model card is generated with `huggingface_hub.ModelCard`: YAML metadata (base_model,
library_name, license, datasets, tags, pipeline_tag, and model-index from the stage's `eval.json`), how the
model was trained (the run's recipe.yaml, env.json and metrics.jsonl), and how to run it with transformers,
vLLM, llama.cpp and Ollama.

Upload is one `create_repo` and one `create_commit` holding exactly the files `--dry-run` lists. The token is
the standard one (`HF_TOKEN`, or `hf auth login`'s stored token), read by huggingface_hub and never printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError
from toolkit.run_folder import RunFolder, StageFolder, read_metrics

PIPELINE_TAG = "text-generation"


@dataclass
class UploadItem:
    """One file of the push: where it goes in the repository and where its bytes come from."""

    path_in_repo: str
    local: Path | None  # None for generated content
    content: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.local.stat().st_size


def find_model_folder(src: str | Path) -> Path:
    """The HF folder to push for SRC: an export folder (its merged/ model for LoRA), or a run's vllm/."""
    src = Path(src)
    for folder in (src, src / "merged", src / "hf", src / "vllm", src / "vllm" / "merged"):
        if (folder / "config.json").exists():
            return folder
    raise ExportError(f"{src} holds no model folder (config.json); run `toolkit export hf {src}` first")


def check_self_contained(folder: Path) -> dict[str, Any]:
    """The folder's config, after checking that transformers can load it without forge-toolkit."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    auto_map = config.get("auto_map") or {}
    if model_type not in CONFIG_MAPPING_NAMES and not auto_map:
        raise ExportError(
            f"{folder}: model_type '{model_type}' is not a transformers architecture and config.json has no "
            f"auto_map, so the pushed model would not load without forge-toolkit; "
            f"run `toolkit export hf {folder}` and push its output"
        )
    for reference in auto_map.values():
        module = reference.split("--")[-1].rsplit(".", 1)[0]
        if not (folder / f"{module}.py").exists():
            raise ExportError(f"{folder}: auto_map names {reference} but {module}.py is not in the folder")
    return config


def _export_report(folder: Path) -> dict[str, Any]:
    for candidate in (folder / "export_report.json", folder.parent / "export_report.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return {}


def find_run(folder: Path, report: dict[str, Any]) -> tuple[RunFolder | None, StageFolder | None]:
    """(run, stage) the model came from, when they can be found."""
    source = Path(report["source"]) if report.get("source") else folder
    run = RunFolder(Path(report["run_dir"])) if report.get("run_dir") else RunFolder.containing(source)
    if run is None or source.name != "final":
        return run, None
    stages = [s for s in run.stages() if s.final == source]
    return run, stages[0] if stages else None


def _is_hub_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value.count("/") == 1
        and not Path(value).exists()
        and not value.startswith(".")
    )


def _sources(stage: dict[str, Any]) -> list[str]:
    sources = (stage.get("data") or {}).get("sources") or []
    return [s if isinstance(s, str) else s.get("path", "") for s in sources]


def training_summary(run: RunFolder | None) -> dict[str, Any]:
    """Stages, data, hardware and time of a run, from its recipe.yaml, env.json and metrics.jsonl."""
    if run is None or not run.recipe_path.exists():
        return {}
    recipe = run.recipe()
    stages = []
    for stage, folder in zip(recipe.get("stages", []), run.stages(), strict=True):
        rows = read_metrics(folder.metrics)
        losses = [r["loss"] for r in rows if "loss" in r]
        runtime = sum(r.get("train_runtime", 0.0) for r in rows)
        train = stage.get("train") or {}
        stages.append(
            {
                "name": stage.get("name"),
                "method": stage.get("method"),
                "model": stage.get("model"),
                "data": _sources(stage),
                "peft": stage.get("peft"),
                "max_steps": train.get("max_steps"),
                "learning_rate": train.get("learning_rate"),
                "final_loss": losses[-1] if losses else None,
                "seconds": runtime or None,
            }
        )
    return {"name": recipe.get("name"), "stages": stages, "env": run.env() or {}}


def eval_results(stage: StageFolder | None, model_name: str) -> list[Any]:
    """`EvalResult`s (model-index) from the stage's eval.json: task accuracy and perplexity."""
    from huggingface_hub import EvalResult

    evaluation = (stage.eval() if stage else None) or {}
    results = []
    if "tasks" in evaluation:
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                dataset_type="heldout-tasks",
                dataset_name=f"{model_name} held-out checkable tasks",
                metric_type="accuracy",
                metric_value=evaluation["tasks"]["accuracy"],
            )
        )
    if "perplexity" in evaluation:
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                dataset_type="validation-corpus",
                dataset_name=f"{model_name} validation corpus",
                metric_type="perplexity",
                metric_value=evaluation["perplexity"]["perplexity"],
            )
        )
    return results


LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def saved_lm_eval(folder: Path, run: RunFolder | None) -> list[dict[str, Any]]:
    """lm-eval results `toolkit eval` saved for the pushed folder (its own `eval/`, or the export's around a
    LoRA run's `merged/`) and those of the run's evaluate stages that name it as their artifact; oldest
    first."""
    folder = folder.resolve()
    mine = {str(folder), str(folder.parent)} if folder.name == "merged" else {str(folder)}
    found: list[tuple[str, dict[str, Any]]] = []
    for root in {folder, folder.parent} if folder.name == "merged" else {folder}:
        for path in (root / "eval").glob("*/results.json"):
            found.append((path.parent.name, json.loads(path.read_text())))
    for stage in run.stages() if run is not None else []:
        saved = stage.path / "results.json"
        table = json.loads(saved.read_text()) if saved.exists() else {}
        if not isinstance(table, dict):
            continue
        for result in table.values():
            if isinstance(result, dict) and result.get("artifact") in mine and result.get("results"):
                found.append((Path(result.get("saved", saved)).parent.name, result))
    return [result for _, result in sorted(found, key=lambda item: item[0])]


def lm_eval_results(folder: Path, run: RunFolder | None) -> list[Any]:
    """`EvalResult`s (model-index) of every task/metric lm-eval computed on the folder, the latest of each;
    the metric's name says how (chat template, limit, harness version)."""
    from huggingface_hub import EvalResult

    latest: dict[tuple[str, str], Any] = {}
    for result in saved_lm_eval(folder, run):
        how = f"chat template {'on' if result.get('chat_template') else 'off'}"
        how += f", limit {result['limit']}" if result.get("limit") else ""
        harness = result.get("harness") or "lm-eval"
        for task, metrics in result["results"].items():
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric = key.split(",")[0]
                latest[(task, metric)] = EvalResult(
                    task_type=PIPELINE_TAG,
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_value=value,
                    metric_name=f"{metric} ({how}; {harness})",
                    source_name=harness,
                    source_url=LM_EVAL_URL,
                )
    return list(latest.values())


def build_model_card(folder: Path, repo_id: str, gguf_files: list[str], license: str | None = None) -> Any:
    """The `huggingface_hub.ModelCard` for `folder` pushed as `repo_id` with `gguf_files` beside it."""
    from huggingface_hub import ModelCard, ModelCardData

    config = json.loads((folder / "config.json").read_text())
    report = _export_report(folder)
    run, stage = find_run(folder, report)
    summary = training_summary(run)
    stages = summary.get("stages", [])
    base = next((s["model"]["path"] for s in stages if _is_hub_id((s.get("model") or {}).get("path"))), None)
    if base is None and report.get("lora") and _is_hub_id(report["lora"].get("base")):
        base = report["lora"]["base"]
    datasets = sorted({d for s in stages for d in s["data"] if _is_hub_id(d)})
    name = repo_id.split("/")[-1]
    results = eval_results(stage, name) + lm_eval_results(folder, run)
    remote = "auto_map" in config
    tags = ["forge-toolkit", config.get("model_type", ""), report.get("source_model_type") or ""]
    tags += [s["method"] for s in stages if s.get("method")] + (["gguf"] if gguf_files else [])
    tags += ["lora"] if report.get("lora") else []
    tags += ["custom_code"] if remote else []
    data = ModelCardData(
        base_model=base,
        library_name="transformers",
        license=license or "other",
        datasets=datasets or None,
        tags=list(dict.fromkeys(t for t in tags if t)),
        pipeline_tag=PIPELINE_TAG,
        model_name=name if results else None,
        eval_results=results or None,
    )
    body = _card_body(repo_id, config, report, summary, results, gguf_files, remote, license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _card_body(
    repo_id: str,
    config: dict[str, Any],
    report: dict[str, Any],
    summary: dict[str, Any],
    results: list[Any],
    gguf_files: list[str],
    remote: bool,
    license: str | None,
) -> str:
    name = repo_id.split("/")[-1]
    trust = ", trust_remote_code=True" if remote else ""
    lines = [f"# {name}", ""]
    arch = config.get("architectures", ["?"])[0]
    lines.append(
        f"A {config.get('num_hidden_layers')}-layer `{arch}` language model (hidden size {config.get('hidden_size')}, "
        f"vocabulary {config.get('vocab_size')}, context {config.get('max_position_embeddings')}), trained with "
        "forge-toolkit on the Hugging Face stack."
    )
    if report.get("form"):
        lines.append(
            f"Exported for serving as `{report['form']}` ({report.get('dtype')}); a fresh process without "
            "forge-toolkit reproduced the source model's logits and greedy output (`export_report.json`)."
        )
    if not license:
        lines.append("\nThe license was not set when this card was written (`license: other`).")
    if summary:
        lines += ["", "## Training", "", f"Recipe `{summary.get('name')}`, stage by stage:", ""]
        lines += [
            "| stage | method | data | steps | learning rate | final loss | time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in summary["stages"]:
            data = ", ".join(f"`{d}`" for d in s["data"]) or "-"
            seconds = f"{s['seconds']:.0f}" if s["seconds"] else "-"
            loss = f"{s['final_loss']:.3f}" if s["final_loss"] is not None else "-"
            lines.append(
                f"| {s['name']} | {s['method']}{' + LoRA' if s.get('peft') else ''} | {data} | "
                f"{s['max_steps'] or '-'} | {s['learning_rate'] or '-'} | {loss} | {seconds} |"
            )
        env = summary.get("env") or {}
        packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
        lines += [
            "",
            f"Hardware: {env.get('device', '?')} ({env.get('cpu_count', '?')} CPU cores, "
            f"{env.get('num_processes', 1)} process(es)); {packages}.",
        ]
    if results:
        lines += ["", "## Evaluation", "", "| dataset | metric | value |", "|---|---|---|"]
        lines += [f"| {r.dataset_name} | {r.metric_type} | {r.metric_value:.4g} |" for r in results]
    lines += [
        "",
        "## Use",
        "",
        "transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{trust})',
        'messages = [{"role": "user", "content": "Hello!"}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        "```",
        "",
        "vLLM (an OpenAI-compatible server):",
        "",
        "```bash",
        f"vllm serve {repo_id}{' --trust-remote-code' if remote else ''}",
        "```",
    ]
    if gguf_files:
        quant = gguf_files[0].rsplit("-", 1)[-1].removesuffix(".gguf").upper()
        lines += [
            "",
            f"llama.cpp ({', '.join(f'`{g}`' for g in gguf_files)}):",
            "",
            "```bash",
            f"llama-cli -hf {repo_id}:{quant}",
            "```",
            "",
            "Ollama:",
            "",
            "```bash",
            f"ollama run hf.co/{repo_id}:{quant}",
            "```",
        ]
    else:
        lines += [
            "",
            "llama.cpp and Ollama: this repository has no GGUF file; `toolkit export gguf` (or `toolkit export "
            "ollama`) writes one, verified in llama.cpp.",
        ]
    return "\n".join(lines) + "\n"


def plan_upload(src: str | Path, repo_id: str, license: str | None = None) -> list[UploadItem]:
    """Every file the push uploads, the generated README.md included; refuses what would not load alone."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--repo must be USER/NAME (or ORG/NAME), got '{repo_id}'")
    folder = find_model_folder(src)
    check_self_contained(folder)
    items = [UploadItem(p.name, p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "README.md"]
    run, _ = find_run(folder, _export_report(folder))
    extras = []
    if run is not None:
        extras = [*run.gguf_files(), *[p for p in [run.gguf_dir / "Modelfile"] if p.exists()]]
    taken = {item.path_in_repo for item in items}
    for path in extras:
        if path.name in taken:
            raise ExportError(f"two files would be uploaded as {path.name} (one is {path}); keep one of them")
        taken.add(path.name)
        items.append(UploadItem(path.name, path))
    license = license or _folder_license(folder)
    card = build_model_card(folder, repo_id, [p.name for p in extras if p.suffix == ".gguf"], license)
    items.append(UploadItem("README.md", None, str(card).encode("utf-8")))
    return items


def _folder_license(folder: Path) -> str | None:
    from export.source import _license

    return _license(folder)


def format_listing(items: list[UploadItem]) -> str:
    """The dry-run listing: one line per file with its size, then the total."""
    width = max(len(item.path_in_repo) for item in items)
    lines = [f"{item.path_in_repo:<{width}}  {item.size:>14,} B" for item in items]
    lines.append(f"{len(items)} files, {sum(item.size for item in items):,} bytes")
    return "\n".join(lines)


def push(
    src: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False, license: str | None = None
) -> tuple[list[UploadItem], str | None]:
    """Upload SRC's model folder, GGUF files and model card to `repo_id`; returns the items and the commit
    URL (None for a dry run)."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    items = plan_upload(src, repo_id, license)
    if dry_run:
        return items, None
    if get_token() is None:
        raise ExportError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    api = HfApi()  # reads the token itself; it is never passed through our code or printed
    operations = [
        CommitOperationAdd(item.path_in_repo, item.content if item.content is not None else str(item.local))
        for item in items
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id, operations, commit_message="Upload model exported with forge-toolkit", repo_type="model"
        )
    except (HfHubHTTPError, OSError, ValueError) as error:
        # Messages name the URL and the server's answer, never request headers.
        raise ExportError(f"push of {repo_id} to {constants.ENDPOINT} failed: {error}") from error
    return items, info.commit_url
