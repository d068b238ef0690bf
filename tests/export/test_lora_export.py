"""A LoRA run is merged in float32 into its full-precision base before export, with the drift reported."""

from __future__ import annotations

import json
import shutil

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from export.gguf import export_gguf
from export.llama_cpp import load_for_verification


def test_lora_run_is_merged_then_exported(decoder_dir, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(decoder_dir, base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # init_lora_weights=False: random A and B, so the adapter changes the logits and the merge matters.
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    final = tmp_path / "runs" / "lora-demo" / "sft" / "final"
    peft_model.save_pretrained(final)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(final)
    (final.parents[1] / "recipe.yaml").write_text("name: lora-demo\nstages: [{name: sft, method: sft}]\n")
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)

    result = export_gguf(tmp_path / "runs" / "lora-demo", "f32")
    assert result.ok, result.report["checks"]
    assert result.path == tmp_path / "runs" / "lora-demo" / "gguf" / "lora-demo-f32.gguf"
    assert result.lora["base"] == str(base_dir)
    assert result.lora["merge_drift_max_abs"] < 1e-4
    assert result.report["lora"]["merge_drift_max_abs"] == result.lora["merge_drift_max_abs"]
    # The GGUF computes the adapted model, not the base.
    ids = [5, 6, 7, 8]
    llm = load_for_verification(result.path, n_ctx=64)
    llm.eval(ids)
    gguf_logits = torch.tensor(llm.scores[: len(ids)])
    with torch.no_grad():
        adapted = peft_model(input_ids=torch.tensor([ids])).logits[0]
        with peft_model.disable_adapter():
            base = peft_model(input_ids=torch.tensor([ids])).logits[0]
    assert (gguf_logits - adapted).abs().max() < 1e-3 < (gguf_logits - base).abs().max()


def test_an_adapter_vllm_cannot_load_is_exported_merged_only(decoder_dir, tmp_path):
    """Added tokens make the adapter hold whole embedding and head rows, which vLLM's LoRA loader refuses (the
    merge's verdict): the vLLM export writes merged/ only, says why, and `toolkit serve` serves merged/."""
    from export.serve import serve_command
    from export.vllm import export_vllm

    base_dir = tmp_path / "base"
    shutil.copytree(decoder_dir, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LoraConfig(
        r=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    final = tmp_path / "runs" / "tools" / "sft" / "final"
    peft_model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final.parents[1] / "recipe.yaml").write_text("name: tools\nstages: [{name: sft, method: sft}]\n")

    result = export_vllm(tmp_path / "runs" / "tools", tmp_path / "out", verify_in="clean")
    assert result.ok, result.report["verification"]
    assert sorted(p.name for p in result.path.iterdir()) == ["export_report.json", "merged"]
    assert result.report["adapter"].startswith("not written: vLLM's LoRA loads low-rank A/B weights")
    assert result.adapter_dir is None and result.model_dir == result.path / "merged"
    assert serve_command(result.path, gpus=0)[2] == str((result.path / "merged").resolve())
