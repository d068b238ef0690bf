"""The shipped recipes of `prometheus` and `codette`, CPU-sized: pretraining (codette's with its mixture,
added tokens, periodic evaluation and best-checkpoint loading), then SFT, DPO and a verified GGUF through the
same runner as `decoder`."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import head
from toolkit import recipe as recipes
from toolkit.run_folder import read_metrics
from toolkit.train import run

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

SMALL = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}


def pretrain_overrides(arch: str, tmp: Path) -> list[str]:
    corpus = head("data/corpus/train.jsonl", 200, tmp / "corpus.jsonl")
    overrides = [
        f"output_dir={tmp / 'pretrain-run'}",
        f"stages.tokenizer.data.sources=[{corpus}]",
        "stages.tokenizer.tokenizer.vocab_size=400",
        f"stages.pretrain.model.preset={arch}-tiny",
        f"stages.pretrain.model.config={json.dumps(SMALL)}",
        "stages.pretrain.train.max_steps=12",
        "stages.pretrain.train.warmup_steps=2",
        "stages.pretrain.train.max_length=64",
        "stages.pretrain.train.per_device_train_batch_size=8",
        "stages.pretrain.train.gradient_accumulation_steps=1",
        "stages.pretrain.train.learning_rate=2.0e-3",
        "stages.pretrain.train.logging_steps=1",
        "stages.pretrain.eval.perplexity=" + head("data/corpus/valid.jsonl", 8, tmp / "valid.jsonl"),
    ]
    if arch == "codette":
        overrides += [
            "stages.pretrain.train.eval_steps=4",
            "stages.pretrain.train.save_steps=4",
            "stages.pretrain.train.save_total_limit=1",
            f"stages.pretrain.data.eval_sources=[{tmp / 'valid.jsonl'}]",
        ]
    return overrides


def chat_overrides(tmp: Path, pretrained: Path) -> list[str]:
    steps = {"sft": 8, "dpo": 4}
    return [
        f"output_dir={tmp / 'chat-run'}",
        f"stages.sft.model.path={pretrained}",
        f"stages.sft.data.sources=[{head('data/sft/train.jsonl', 64, tmp / 'sft.jsonl')}]",
        f"stages.dpo.data.sources=[{head('data/preference/train.jsonl', 32, tmp / 'pref.jsonl')}]",
        *(f"stages.{s}.train.max_steps={n}" for s, n in steps.items()),
        *(f"stages.{s}.train.per_device_train_batch_size=4" for s in steps),
        *(f"stages.{s}.train.max_length=64" for s in steps),
        *(f"stages.{s}.eval.tasks={head('data/eval/heldout.jsonl', 6, tmp / 'eval.jsonl')}" for s in steps),
        f"stages.gguf.eval.tasks={tmp / 'eval.jsonl'}",
    ]


@pytest.fixture(scope="module", params=["prometheus", "codette"])
def runs(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    pretrain = recipes.load(f"recipes/{arch}-pretrain.yaml", overrides=pretrain_overrides(arch, tmp))
    run(pretrain)
    pretrained = pretrain.output_dir / "pretrain" / "final"
    chat = recipes.load(f"recipes/{arch}-chat.yaml", overrides=chat_overrides(tmp, pretrained))
    results = run(chat)
    return arch, pretrain.output_dir, chat.output_dir, results


def test_every_stage_finishes_with_a_verified_gguf(runs):
    arch, _, chat_dir, results = runs
    assert [r.name for r in results] == ["sft", "dpo", "gguf"]
    for stage in ("sft", "dpo"):
        model = AutoModelForCausalLM.from_pretrained(chat_dir / stage / "final")
        assert model.config.model_type == arch
        assert read_metrics(chat_dir / stage / "metrics.jsonl")
    report = json.loads(next((chat_dir / "gguf").glob("*.report.json")).read_text())
    assert report["ok"], report["checks"]
    assert report["measures"]["tokenization_identical"] == 1.0
    evaluation = json.loads((chat_dir / "gguf" / "eval.json").read_text())
    assert evaluation["tasks"]["runtime"] == "llama.cpp"


def test_codette_pretraining_keeps_the_best_checkpoint_and_added_tokens(runs):
    arch, pretrain_dir, chat_dir, _ = runs
    if arch != "codette":
        pytest.skip("codette's recipe is the one with periodic evaluation and added tokens")
    stage = pretrain_dir / "pretrain"
    evals = [m for m in read_metrics(stage / "metrics.jsonl") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8, 12]
    state = json.loads(
        sorted((stage / "checkpoints").glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text()
    )
    best = min(evals, key=lambda m: m["eval_loss"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    # save_total_limit=1 with load_best_model_at_end: the best checkpoint survives besides the last one.
    kept = {p.name for p in (stage / "checkpoints").glob("checkpoint-*")}
    assert kept == {f"checkpoint-{best['step']}", "checkpoint-12"}
    tokenizer = AutoTokenizer.from_pretrained(chat_dir / "dpo" / "final")
    added = ["<tool>", "</tool>", "<perspective>", "</perspective>"]
    assert all(tokenizer.convert_tokens_to_ids(t) >= 400 for t in added)
    assert len(tokenizer("<tool>x</tool>", add_special_tokens=False)["input_ids"]) == 3
    model = AutoModelForCausalLM.from_pretrained(chat_dir / "dpo" / "final")
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
