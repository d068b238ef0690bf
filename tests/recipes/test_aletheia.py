"""The Aletheia pipeline: `recipes/aletheia-tiny.yaml` end to end (cut to a few steps), as a user runs it. A
LoRA SFT adapter, merged into its base for a LoRA DPO stage whose adapter names that merge as its base, the
DPO adapter merged into a vLLM folder, then lm-eval of the base and the export side by side and the export's
win-rate against the base. Each merge is checked against peft's unmerged adapter on the same tokens. The 7B
recipe is checked as a recipe (its keys and inputs): it needs a GPU and the Hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.recipe import load

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_7b_recipe_is_a_valid_recipe():
    recipe = load(ROOT / "recipes" / "aletheia-7b.yaml")
    sft, dpo, vllm, evaluate = recipe.stages
    assert sft.peft["r"] == 16 and sft.peft["lora_alpha"] == 32 and sft.train["learning_rate"] == 2.0e-4
    assert sft.train["per_device_train_batch_size"] * sft.train["gradient_accumulation_steps"] == 32
    assert sft.model["quantization"]["load_in_4bit"] and dpo.model["from"] == "sft"
    assert (dpo.train["learning_rate"], dpo.train["beta"], dpo.train["num_train_epochs"]) == (1.0e-5, 0.1, 1)
    assert vllm.options["target"] == "vllm" and evaluate.options["win_rate"]["model"] == "export"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def run_twin(tmp_path: Path, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`toolkit train recipes/aletheia-tiny.yaml`, cut to a few steps, into tmp_path/run."""
    from tests.tiny import head

    corpus = head("data/corpus/train.jsonl", 200, tmp_path / "corpus.jsonl")
    valid = head("data/corpus/valid.jsonl", 4, tmp_path / "valid.jsonl")
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        f"stages.tokenizer.data.sources=[{corpus}]",
        "stages.tokenizer.tokenizer.vocab_size=400",
        "stages.base.train.max_steps=8",
        "stages.base.train.warmup_steps=1",
        "stages.sft.train.max_steps=4",
        "stages.sft.train.warmup_steps=1",
        "stages.sft.eval.limit=4",
        "stages.dpo.train.max_steps=2",
        "stages.dpo.eval.limit=4",
        "stages.evaluate.evaluate.limit=6",
        f"stages.evaluate.evaluate.perplexity={valid}",
        "stages.evaluate.evaluate.win_rate.limit=6",
        "stages.evaluate.evaluate.win_rate.max_new_tokens=8",
    ]
    done = subprocess.run(
        [str(BIN / "toolkit"), "train", "recipes/aletheia-tiny.yaml", *overrides, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return run, done


def test_the_tiny_twin_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toolkit.models import register_auto_classes

    register_auto_classes()
    run, done = run_twin(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    # LoRA SFT -> merged -> LoRA DPO whose base is that merge -> merged again into the vLLM folder.
    sft_adapter = json.loads((run / "sft" / "final" / "adapter_config.json").read_text())
    dpo_adapter = json.loads((run / "dpo" / "final" / "adapter_config.json").read_text())
    assert sft_adapter["base_model_name_or_path"] == str(run / "base" / "final")
    assert dpo_adapter["base_model_name_or_path"] == str((run / "sft" / "merged").resolve())
    ids = [5, 17, 42, 99, 3, 250, 7]
    base = AutoModelForCausalLM.from_pretrained(run / "base" / "final")
    sft = PeftModel.from_pretrained(base, run / "sft" / "final").eval()
    merged_sft = AutoModelForCausalLM.from_pretrained(run / "sft" / "merged").eval()
    assert (logits(merged_sft, ids) - logits(sft, ids)).abs().max() < 1e-4
    with sft.disable_adapter():
        assert (logits(merged_sft, ids) - logits(sft, ids)).abs().max() > 1e-4  # the adapter did something
    dpo = PeftModel.from_pretrained(merged_sft, run / "dpo" / "final").eval()
    export = AutoModelForCausalLM.from_pretrained(run / "vllm" / "merged").eval()
    assert (logits(export, ids) - logits(dpo, ids)).abs().max() < 1e-4
    assert not (run / "vllm" / "stage.json").exists()  # the stage keeps its files out of what is served
    report = json.loads((run / "vllm" / "export_report.json").read_text())
    assert report["ok"] and "clean" in report["verified_in"]

    results = json.loads((run / "evaluate" / "results.json").read_text())
    assert set(results) == {"base", "export"}
    assert results["export"]["artifact"] == str((run / "vllm" / "merged").resolve())
    assert results["export"]["n"] == {"forge_heldout": 6, "forge_heldout_choice": 6}
    assert results["base"]["chat_template"] is True and results["export"]["perplexity"]["tokens"] > 0
    winrate = json.loads((run / "evaluate" / "win-rate" / "winrate.json").read_text())
    assert winrate["n"] == 6 and winrate["base"]["src"] == "base" and winrate["model"]["src"] == "export"
    assert "Side by side (evaluate" in done.stdout and "win-rate of export against base" in done.stdout

    log = subprocess.run([str(BIN / "toolkit"), "runs", str(tmp_path)], capture_output=True, text=True)
    assert (
        "| aletheia-tiny | aletheia-tiny.yaml | tokenizer → pretrain → sft → dpo → export → evaluate |"
        in (log.stdout)
    )


QLORA = "{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}"


@pytest.mark.gpu
def test_the_twin_with_qlora_merges_into_full_precision(tmp_path):
    """As the 7B recipe runs: SFT and DPO adapters trained on a 4-bit base (bitsandbytes), each merge made
    into the full-precision weights (sft/merged, vllm/merged carry no quantization_config)."""
    run, done = run_twin(
        tmp_path,
        f"stages.sft.model.quantization={QLORA}",
        f"stages.dpo.model.quantization={QLORA}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for merged in (run / "sft" / "merged", run / "vllm" / "merged"):
        config = json.loads((merged / "config.json").read_text())
        assert "quantization_config" not in config and config.get("dtype", "float32") == "float32"
    report = json.loads((run / "vllm" / "export_report.json").read_text())
    assert report["ok"] and report["lora"]["merge_drift_max_abs"] < 1e-3
