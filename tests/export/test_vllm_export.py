"""vLLM export: native rewrite against transformers' own LlamaForCausalLM in a clean process, the remote-code
folder without forge-toolkit, eos, LoRA folders, refusals and the `vllm serve` command (vLLM itself:
tests/export/test_in_vllm.py)."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from export.serve import serve_command, tensor_parallel_size
from export.vllm import ALLOWED_IMPORTS, export_vllm, portable_sources
from tests.export.vllm_helpers import NATIVE_IDS, make_run, native_logits
from toolkit.errors import ExportError
from toolkit.models.plans import ExportPlan, VLLMPlan, load_plans

PLANS = load_plans()  # every architecture's export plan, loaded now

IDS = NATIVE_IDS


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def native(run) -> Path:
    result = export_vllm(run, max_shard_size="1MB")
    assert result.ok, result.report["verification"]
    return result.path


def _source_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0]


def test_native_rewrite_matches_in_llama_for_causal_lm(run, native, tmp_path):
    config = json.loads((native / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32" and config["use_cache"] is True
    assert (
        len(list(native.glob("model-*.safetensors"))) > 1
        and (native / "model.safetensors.index.json").exists()
    )
    assert (native / "chat_template.jinja").exists() and (native / "tokenizer.json").exists()

    logits = native_logits("LlamaForCausalLM", native, tmp_path)
    delta = float((logits - _source_logits(run / "sft" / "final")).abs().max())
    assert delta <= 1e-5

    report = json.loads((native / "export_report.json").read_text())
    section = report["verification"]["model"]
    assert report["form"] == "native" and report["ok"]
    assert report["verified_in"] == ["clean"] and "vllm" not in report["verification"]  # no vLLM here
    assert section["loaded_class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    assert section["measures"]["greedy_identical"] == 1.0
    assert section["measures"]["loads_without_forge_toolkit"] == 1.0
    assert section["measures"]["checkpoint_names_match"] == 1.0 and section["loading_problems"] == []


def test_generation_config_lists_every_end_of_turn_token(run, native):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(native)
    expected = sorted(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
    generation = json.loads((native / "generation_config.json").read_text())
    assert generation["eos_token_id"] == expected
    assert json.loads((native / "config.json").read_text())["eos_token_id"] == expected
    assert generation["pad_token_id"] == tokenizer.pad_token_id


@pytest.mark.slow
def test_remote_code_folder_loads_without_forge_toolkit(run, tmp_path):
    result = export_vllm(run, tmp_path / "remote", form="remote-code")
    assert result.ok, result.report["verification"]
    config = json.loads((result.path / "config.json").read_text())
    assert list(config["auto_map"]) == ["AutoConfig", "AutoModel", "AutoModelForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decoder.DecoderForCausalLM"
    for name in ("configuration_decoder.py", "modeling_decoder.py"):
        for node in ast.walk(ast.parse((result.path / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ALLOWED_IMPORTS | set(sys.stdlib_module_names), (
                    node.module
                )
    section = result.report["verification"]["model"]
    assert section["loaded_class"].startswith("transformers_modules.")
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    assert section["measures"]["loads_without_forge_toolkit"] == 1.0
    assert "--trust-remote-code" in serve_command(result.path, gpus=0)


@pytest.mark.slow
def test_lora_run_gives_merged_and_adapter_folders(run, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base = run / "sft" / "final"
    lora_run = tmp_path / "lora-run"
    final = lora_run / "lora" / "final"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # Random A and B (init_lora_weights=False): the adapter changes the logits, so the merge matters.
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(final)
    AutoTokenizer.from_pretrained(base).save_pretrained(final)
    (lora_run / "recipe.yaml").write_text("name: lora-run\nstages: [{name: lora, method: sft}]\n")

    result = export_vllm(lora_run, tmp_path / "out")
    assert result.ok, result.report["verification"]
    assert result.model_dir == tmp_path / "out" / "merged"
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert json.loads((result.base_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "out" / "base").resolve())
    for section in result.report["verification"].values():
        assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    argv = serve_command(result.path, gpus=0)
    assert argv[2] == str(result.base_dir.resolve())
    assert argv[argv.index("--lora-modules") + 1] == f"adapter={result.adapter_dir.resolve()}"
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "8"


def test_existing_output_is_kept_unless_forced(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_vllm(run, out, verify=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_vllm(run, out, verify=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_unservable_architecture_refuses_before_writing(run, tmp_path, monkeypatch):
    blocked = ExportPlan("decoder", vllm=VLLMPlan(blocker="sliding-window attention has no vLLM kernel"))
    monkeypatch.setitem(PLANS, "decoder", blocked)
    with pytest.raises(ExportError, match="sliding-window attention has no vLLM kernel"):
        export_vllm(run, tmp_path / "out")
    monkeypatch.setitem(PLANS, "decoder", ExportPlan("decoder"))
    with pytest.raises(ExportError, match="declares no vLLM export"):
        export_vllm(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remote_code_needs_the_attention_interface(run, tmp_path, monkeypatch):
    from toolkit.models import DecoderForCausalLM

    monkeypatch.setattr(DecoderForCausalLM, "_supports_attention_backend", False)
    with pytest.raises(ExportError, match="_supports_attention_backend"):
        export_vllm(run, tmp_path / "out", form="remote-code")
    assert not (tmp_path / "out").exists()


def test_copied_sources_import_only_what_transformers_brings(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "configuration_x.py").write_text("import math\nclass XConfig: ...\n")
    (package / "modeling_x.py").write_text("import torch\nfrom mypkg.pkg.configuration_x import XConfig\n")
    files = portable_sources([str(package / "modeling_x.py")], "mypkg.pkg")
    assert "from .configuration_x import XConfig" in files["modeling_x.py"]
    assert set(files) == {"modeling_x.py", "configuration_x.py"}
    (package / "modeling_y.py").write_text("import torch\n\nimport yaml\n")
    with pytest.raises(ExportError, match=r"modeling_y.py:3: imports yaml"):
        portable_sources([str(package / "modeling_y.py")], "mypkg.pkg")


def test_serve_command_carries_what_the_folder_implies(native):
    argv = serve_command(native, gpus=0)
    assert argv[:3] == ["vllm", "serve", str(native.resolve())]
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--max-model-len") + 1] == "256"
    assert argv[argv.index("--chat-template") + 1] == str(native.resolve() / "chat_template.jinja")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "1"
    assert "--trust-remote-code" not in argv and "--enable-lora" not in argv
    assert serve_command(native.parent, gpus=0) == argv  # a run folder finds its vllm/ export
    config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    assert [tensor_parallel_size(config, n) for n in (0, 1, 2, 3, 4, 8)] == [1, 1, 2, 2, 4, 4]


def test_cli_prints_the_serve_command(native, capsys):
    from toolkit.cli import main

    assert main(["serve", str(native)]) == 0
    assert capsys.readouterr().out.startswith(f"vllm serve {native.resolve()} ")


def test_serve_run_executes_the_printed_command(native, tmp_path):
    """`--run` replaces the process with exactly the command it printed; without vllm it says how to get it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv.txt"}\n')
    fake.chmod(0o755)
    code = f"from toolkit.cli import main; raise SystemExit(main(['serve', {str(native)!r}, '--run']))"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"},
        capture_output=True,
        text=True,
        check=True,
    )
    argv = serve_command(native, gpus=0)
    assert proc.stdout.strip() == shlex.join(argv)
    assert (tmp_path / "argv.txt").read_text().splitlines() == argv[1:]

    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PATH": str(tmp_path / "empty")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "vllm is not installed here" in proc.stderr
