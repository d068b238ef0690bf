"""`toolkit push`: model card metadata as the Hub parses it, dry-run listing, the request flow against a
local stand-in for the Hub, a pushed folder that loads on its own, and a token that never reaches output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from export.hub import plan_upload
from export.verify_hf import verify_folder
from export.vllm import export_vllm
from tests.export.vllm_helpers import EVAL, FakeHub, make_run
from toolkit.cli import main
from toolkit.errors import ExportError

SENTINEL = "hf_SENTINELtoken0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("runs"))
    export_vllm(run, max_shard_size="1MB", verify=False)
    return run


def _card(items) -> ModelCard:
    readme = next(item for item in items if item.path_in_repo == "README.md")
    return ModelCard(readme.content.decode())


def test_model_card_metadata_parses_as_the_hub_expects(exported, tmp_path):
    card_path = tmp_path / "README.md"
    card_path.write_bytes(_card(plan_upload(exported, "me/tiny", license="apache-2.0")).content.encode())
    card = ModelCard.load(card_path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.license == "apache-2.0"
    assert data.pipeline_tag == "text-generation"
    assert data.base_model == "my-org/base-model"
    assert data.datasets == ["my-org/chat-data"]  # local files are named in the body, not as Hub datasets
    assert {"forge-toolkit", "llama", "decoder", "sft", "gguf"} <= set(data.tags)
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"accuracy": EVAL["tasks"]["accuracy"], "perplexity": EVAL["perplexity"]["perplexity"]}
    assert "model-index" in data.to_dict()
    text = card.text
    for needle in ("## Training", "data/sft/train.jsonl", "AutoModelForCausalLM", "vllm serve me/tiny"):
        assert needle in text
    assert "llama-cli -hf me/tiny:Q8_0" in text and "ollama run hf.co/me/tiny:Q8_0" in text
    assert "trust_remote_code" not in text  # native rewrite: transformers' own class


def test_dry_run_lists_every_file_with_its_size(exported, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["push", str(exported), "--repo", "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    folder = exported / "vllm"
    expected = [p.name for p in folder.iterdir()] + ["tiny-q8_0.gguf", "Modelfile", "README.md"]
    assert len([n for n in folder.iterdir() if n.name.startswith("model-")]) > 1  # sharded
    for name in expected:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        path = folder / name if (folder / name).exists() else None
        if path is not None:
            assert f"{path.stat().st_size:,} B" in line
    assert f"{len(expected)} files" in out


def test_push_refuses_a_folder_that_needs_the_toolkit(exported):
    with pytest.raises(ExportError, match="auto_map"):
        plan_upload(exported / "sft" / "final", "me/tiny")


@pytest.mark.slow
def test_push_flow_against_a_local_hub(exported, tmp_path):
    env = {
        **os.environ,
        "HF_TOKEN": SENTINEL,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_VERBOSITY": "debug",  # the token must not show even in debug logs
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        proc = subprocess.run(
            [sys.executable, "-m", "toolkit.cli", "push", str(exported), "--repo", "me/tiny", "--private"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert SENTINEL not in output
    assert "pushed" in proc.stdout
    assert hub.repos["me/tiny"].get("private") is True or hub.repos["me/tiny"].get("visibility") == "private"
    assert all(r["authorization"] == f"Bearer {SENTINEL}" for r in hub.requests if r["method"] == "POST")

    received = hub.files["me/tiny"]
    planned = {item.path_in_repo for item in plan_upload(exported, "me/tiny")}
    assert set(received) == planned
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, content in received.items():
        (pushed / name).write_bytes(content)
    assert json.loads((pushed / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # What the Hub received loads, alone, in a process that cannot import forge-toolkit, and computes
    # what the training run's model computes.
    section = verify_folder(
        pushed,
        exported / "sft" / "final",
        dtype="float32",
        remote_code=False,
        expected_class=r"transformers\.models\.llama\.modeling_llama\.LlamaForCausalLM",
    )
    assert section["ok"], section["checks"]


def test_lm_eval_results_go_into_model_index(exported, tmp_path):
    """What `toolkit eval` saved for the pushed folder, and what an evaluate stage measured on it, reach the
    card's model-index as the Hub parses it: the latest value of each task/metric, saying how it was run."""
    folder = exported / "vllm"
    older, newer = folder / "eval" / "20261201-100000", folder / "eval" / "20261202-100000"
    for saved, value in ((older, 0.25), (newer, 0.375)):
        saved.mkdir(parents=True)
        result = {
            "results": {"forge_heldout": {"exact_match,none": value, "exact_match_stderr,none": 0.1}},
            "chat_template": True,
            "limit": 8,
            "harness": "lm-eval 0.4.13",
        }
        (saved / "results.json").write_text(json.dumps(result))
    stage = exported / "evaluate"
    stage.mkdir()
    table = {
        "sft": {"artifact": str(exported / "sft" / "final"), "results": {"arc_easy": {"acc,none": 0.9}}},
        "export": {
            "artifact": str(folder.resolve()),
            "results": {"forge_heldout_choice": {"acc,none": 0.5}},
            "chat_template": False,
            "harness": "lm-eval 0.4.13",
            "saved": str(stage / "export" / "20261202-110000" / "results.json"),
        },
    }
    (stage / "results.json").write_text(json.dumps(table))
    recipe = (exported / "recipe.yaml").read_text()
    (exported / "recipe.yaml").write_text(recipe + "- {name: evaluate, method: evaluate}\n")
    try:
        card_path = tmp_path / "README.md"
        card_path.write_bytes(_card(plan_upload(exported, "me/tiny")).content.encode())
        results = ModelCard.load(card_path).data.eval_results
        lm_eval = {r.dataset_type: r for r in results if r.source_name == "lm-eval 0.4.13"}
        assert set(lm_eval) == {"forge_heldout", "forge_heldout_choice"}  # sft's arc_easy is another model
        heldout = lm_eval["forge_heldout"]
        assert (heldout.metric_type, heldout.metric_value) == ("exact_match", 0.375)
        assert heldout.metric_name == "exact_match (chat template on, limit 8; lm-eval 0.4.13)"
        assert lm_eval["forge_heldout_choice"].metric_name == "acc (chat template off; lm-eval 0.4.13)"
    finally:
        import shutil

        shutil.rmtree(folder / "eval")
        shutil.rmtree(stage)
        (exported / "recipe.yaml").write_text(recipe)
