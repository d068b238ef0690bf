"""`toolkit merge-adapter`, run as users run it: a QLoRA SFT stage (4-bit bitsandbytes base on this CPU,
added tokens, so the vocabulary is resized) merged in float32 into the full-precision base; the merged
folder's logits equal base + adapter as PEFT computes them, and a quantized base is refused with the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from tests.tiny import TINY, head, pretrain_stage, tokenizer_stage, write_recipe
from toolkit.models import register_auto_classes

pytestmark = [pytest.mark.slow, pytest.mark.integration_test]

BIN = Path(sys.executable).parent
PROMPT = "Question: what is 2 + 2? <tool>"


def toolkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "toolkit"), *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("qlora")
    corpus = head("data/corpus/train.jsonl", 200, tmp / "corpus.jsonl")
    sft = {
        "name": "sft",
        "method": "sft",
        "model": {
            "add_special_tokens": ["<tool>", "</tool>"],  # two rows more than the base: a resized vocabulary
            "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        },
        "peft": {"method": "lora", "r": 8, "lora_alpha": 16},
        "data": {"sources": [head("data/sft/train.jsonl", 64, tmp / "sft.jsonl")]},
        "train": {"max_steps": 6, "per_device_train_batch_size": 4, "max_length": 64, "learning_rate": 3e-3},
    }
    stages = [
        tokenizer_stage(corpus),
        pretrain_stage(corpus, TINY, max_steps=6, learning_rate=3e-3),
        sft,
    ]
    recipe = write_recipe(tmp / "qlora.yaml", "qlora", tmp / "run", stages)
    done = toolkit("train", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def test_qlora_trains_on_a_4bit_base_and_names_the_full_precision_one(run_dir):
    adapter = json.loads((run_dir / "sft" / "final" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == run_dir / "pretrain" / "final"
    assert "quantization_config" not in json.loads(
        (run_dir / "pretrain" / "final" / "config.json").read_text()
    )


def test_merge_equals_base_plus_adapter_with_the_resized_vocabulary(run_dir):
    done = toolkit("merge-adapter", str(run_dir), "--json", "--prompt", PROMPT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    merged = run_dir / "sft" / "merged"
    assert report["out"] == str(merged) and report["base"] == str(run_dir / "pretrain" / "final")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert report["vocab_rows"] == {"base": len(tokenizer) - 2, "adapter": len(tokenizer)}
    assert report["drift_max_abs"] < 1e-3
    assert report["consumers"]["vllm"].startswith("no: ")  # the adapter holds whole embedding rows
    assert "resize_token_embeddings" in report["consumers"]["peft"]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert json.loads((merged / "merge_report.json").read_text()) == report

    # The reference: base resized to the adapter's rows, PEFT's own base + adapter, in float32.
    from peft import PeftModel

    register_auto_classes()
    base = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain" / "final", dtype=torch.float32)
    unadapted = base.get_input_embeddings().weight.shape[0]
    base.resize_token_embeddings(len(tokenizer))
    reference = PeftModel.from_pretrained(base, run_dir / "sft" / "final").eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    assert ids["input_ids"][0, -1] >= unadapted  # the prompt reaches an added row
    with torch.no_grad():
        expected = reference(**ids).logits
        with reference.disable_adapter():
            plain = reference(**ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(**ids).logits
    assert (got - expected).abs().max() < 1e-3 < (got - plain).abs().max()


def test_a_quantized_base_is_refused_with_the_command_that_merges_right(run_dir, tmp_path):
    quantized = tmp_path / "base-4bit"
    model = AutoModelForCausalLM.from_pretrained(
        run_dir / "pretrain" / "final",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    )
    model.save_pretrained(quantized)
    assert AutoConfig.from_pretrained(quantized).quantization_config["load_in_4bit"]

    done = toolkit("merge-adapter", str(run_dir), "--base", str(quantized), "--out", str(tmp_path / "m"))
    assert done.returncode == 2 and not (tmp_path / "m").exists()
    adapter = run_dir / "sft" / "final"
    assert done.stderr.strip() == (
        f"error: the base {quantized} of the adapter {adapter} is stored quantized (bitsandbytes): merging "
        "into those weights rounds the adapter's update away and leaves a model no exporter reads. Merge into "
        f"the full-precision base instead: toolkit merge-adapter {adapter} --base FULL_PRECISION_BASE"
    )


def test_the_merge_is_written_in_the_bases_own_dtype(run_dir, tmp_path):
    from safetensors import safe_open

    register_auto_classes()
    base = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(
        run_dir / "pretrain" / "final", dtype=torch.bfloat16
    ).save_pretrained(base)
    done = toolkit("merge-adapter", str(run_dir), "--base", str(base), "--out", str(tmp_path / "m"), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_a_stage_with_full_weights_has_nothing_to_merge(run_dir):
    done = toolkit("merge-adapter", str(run_dir), "--stage", "pretrain")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {run_dir / 'pretrain' / 'final'} holds full weights, not a LoRA adapter: there is nothing "
        "to merge"
    )


def test_json_output_stays_json_where_a_library_logs_to_stdout(run_dir, tmp_path):
    """With DeepSpeed installed (its environment), saving a model imports it, and it logs an accelerator
    warning to stdout: under `--json` that line goes to stderr and stdout holds the JSON alone."""
    from tests.toolkit.train.test_deepspeed_configs import deepspeed_python

    python = deepspeed_python()
    if python is None:
        pytest.skip("needs DeepSpeed: `make deepspeed-env` sets up its environment")
    out = tmp_path / "merged"
    done = subprocess.run(
        [python, "-c", "import sys; from toolkit.cli import main; sys.exit(main())"]
        + ["merge-adapter", str(run_dir), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "real_accelerator" in done.stderr  # DeepSpeed was imported, and said so on stderr
    assert json.loads(done.stdout)["out"] == str(out)
