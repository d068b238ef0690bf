"""Every `toolkit` subcommand run as a user runs it: the installed console script in a fresh process, from a
working directory of its own, with relative paths, on a small model of each registered architecture.

In-process tests import modules in an order a shell never does (the remote-code export once crashed from
the command line on a circular import that no in-process test could see), so these run nothing in-process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export.conftest import save_preset_model
from toolkit.models import ARCHITECTURES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")
# The architectures that reach every export target. The BitNet family (transformers' BitNet) reaches GGUF only,
# and only with SiLU: test_arch_check_names_what_blocks_the_bitnet_family; cognate reaches the Hub remote-code
# folder only: test_cognate_exports_refuse_before_writing; the lattice is not a language model and reaches the
# Hub remote-code folder only (tests/export/test_hf_export.py).
ARCHS = sorted(a for a in ARCHITECTURES if a not in ("bitnet", "cognate", "lattice"))


def toolkit(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([TOOLKIT, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, (
            f"toolkit {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", params=ARCHS)
def workdir(request, tmp_path_factory) -> tuple[str, Path]:
    """A working directory holding `model/`: a two-layer model of `<arch>-tiny` with its tokenizer."""
    arch = request.param
    work = tmp_path_factory.mktemp(f"cli-{arch}")
    save_preset_model(f"{arch}-tiny", work / "model", train=True)
    for name in ("data/eval/heldout.jsonl", "data/corpus/valid.jsonl"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, work / name)
    return arch, work


def test_arch_check_reaches_every_target(workdir):
    arch, work = workdir
    out = toolkit("arch", "check", "model", "--json", cwd=work).stdout
    verdicts = {v["target"]: v for v in json.loads(out)["targets"]}
    assert all(v["ok"] for v in verdicts.values()), verdicts
    assert toolkit("arch", "check", arch, cwd=work).returncode == 0


def test_arch_check_names_what_blocks_the_bitnet_family(tmp_path):
    blocked = toolkit("arch", "check", "bitnet-tiny", "--json", cwd=tmp_path, ok=False)
    assert blocked.returncode == 1
    verdicts = {v["target"]: v for v in json.loads(blocked.stdout)["targets"]}
    assert "activation (hidden_act" in verdicts["gguf"]["detail"] and "'relu2'" in verdicts["gguf"]["detail"]
    assert "quant_method: bitnet" in verdicts["vllm-native"]["detail"]
    assert verdicts["remote-code"]["ok"] and verdicts["remote-code"]["name"] == "BitNetForCausalLM"


def test_cognate_exports_refuse_before_writing(tmp_path):
    save_preset_model("cognate-tiny", tmp_path / "model")
    checked = toolkit("arch", "check", "model", "--json", cwd=tmp_path, ok=False)
    assert checked.returncode == 1
    verdicts = {v["target"]: v for v in json.loads(checked.stdout)["targets"]}
    assert "llama.cpp's graphs run each block once per token" in verdicts["gguf"]["detail"]
    assert "one KV cache per attention module" in verdicts["vllm-transformers"]["detail"]
    assert verdicts["remote-code"]["ok"] and verdicts["remote-code"]["name"] == "CognateForCausalLM"
    for args in (("gguf", "model", "--out", "m.gguf"), ("vllm", "model", "--out", "vllm")):
        refused = toolkit("export", *args, cwd=tmp_path, ok=False)
        assert refused.returncode != 0 and "cognate" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_export_gguf_verifies_in_llama_cpp(workdir, quant):
    _, work = workdir
    out = toolkit(
        "export", "gguf", "model", "--quant", quant, "--out", f"gguf/m-{quant}.gguf", cwd=work
    ).stdout
    report = json.loads((work / "gguf" / f"m-{quant}.gguf.report.json").read_text())
    assert report["ok"] and "| greedy_identical |" in out


def test_export_ollama_writes_a_modelfile(workdir):
    _, work = workdir
    out = toolkit("export", "ollama", "model", "--quant", "q8_0", "--out", "ollama", cwd=work).stdout
    modelfile = (work / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./") and "PARAMETER stop" in modelfile
    assert "ollama create NAME -f ollama/Modelfile" in out


@pytest.mark.parametrize("form", ["native", "remote-code"])
def test_export_vllm_serve_and_push_dry_run(workdir, form):
    _, work = workdir
    folder = f"vllm-{form}"
    toolkit("export", "vllm", "model", "--form", form, "--out", folder, cwd=work)
    report = json.loads((work / folder / "export_report.json").read_text())
    assert report["ok"] and report["form"] == form
    serve = toolkit("serve", folder, cwd=work).stdout
    assert serve.startswith("vllm serve ") and str(work / folder) in serve
    if form == "remote-code":
        assert "--trust-remote-code" in serve
    push = toolkit("push", folder, "--repo", "me/tiny", "--dry-run", cwd=work).stdout
    assert "would upload to me/tiny:" in push and "README.md" in push and "config.json" in push


def test_eval_prints_accuracy_and_perplexity(workdir):
    _, work = workdir
    out = toolkit(
        "eval",
        "model",
        "--tasks",
        "data/eval/heldout.jsonl",
        "--limit",
        "4",
        "--perplexity",
        "data/corpus/valid.jsonl",
        cwd=work,
    ).stdout
    result = json.loads(out[out.index("{") :])
    assert result["tasks"]["n"] == 4 and result["perplexity"]["perplexity"] > 1


def test_commands_that_need_no_model(tmp_path):
    methods = toolkit("methods", cwd=tmp_path).stdout
    for line in ("pretrain", "sft", "dpo", "grpo", "rloo", "tokenizer", "export"):
        assert any(row.split()[:1] == [line] for row in methods.splitlines()), methods
    assert "GRPOConfig" in methods and "eval:" in methods
    out = toolkit("arch", "list", cwd=tmp_path).stdout
    assert all(f"{arch}-tiny" in out for arch in ARCHS)
    info = json.loads(toolkit("arch", "info", "decoder-125m", "--json", cwd=tmp_path).stdout)
    assert info["parameters"] == 109_529_856
    lattice = toolkit("arch", "info", "lattice-15x15x11", cwd=tmp_path).stdout
    assert "2,475 cells of 13,038 parameters: 32,269,050 in the cells" in lattice and "kv cache" in lattice
    shutil.copy(ROOT / "data/sft/train.jsonl", tmp_path / "sft.jsonl")
    assert toolkit("data", "check", "sft.jsonl", cwd=tmp_path).stdout.strip() == "sft.jsonl: ok"
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n{oops\n')
    bad = toolkit("data", "check", "bad.jsonl", cwd=tmp_path, ok=False)
    assert bad.returncode == 1 and "bad.jsonl:1:" in bad.stdout and "bad.jsonl:2:" in bad.stdout
    shutil.copy(ROOT / "data/corpus/valid.jsonl", tmp_path / "corpus.jsonl")
    toolkit(
        "data", "tokenizer", "--corpus", "corpus.jsonl", "--vocab-size", "300", "--out", "tok", cwd=tmp_path
    )
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    unknown = toolkit("arch", "info", "decoder-tny", cwd=tmp_path, ok=False)
    assert unknown.returncode == 2 and "did you mean 'decoder-tiny'?" in unknown.stderr


def test_train_runs_a_recipe_and_reports_every_problem_first(tmp_path):
    shutil.copy(ROOT / "data/corpus/valid.jsonl", tmp_path / "corpus.jsonl")
    recipe = (
        "name: cli\n"
        "stages:\n"
        "  - {name: tok, method: tokenizer, data: {sources: [corpus.jsonl]}, tokenizer: {vocab_size: 300}}\n"
        "  - name: pretrain\n"
        "    method: pretrain\n"
        "    model: {preset: decoder-tiny, config: {num_hidden_layers: 1, hidden_size: 64, intermediate_size: 128}}\n"
        "    data: {sources: [corpus.jsonl]}\n"
        "    train: {max_steps: 2, per_device_train_batch_size: 2, max_length: 32}\n"
    )
    (tmp_path / "r.yaml").write_text(
        recipe.replace("max_steps", "max_step").replace(
            "corpus.jsonl]}\n    train", "missing.jsonl]}\n    train"
        )
    )
    bad = toolkit("train", "r.yaml", cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: 2 problems in r.yaml:")
    assert "did you mean 'max_steps'?" in bad.stderr and "missing.jsonl: no such file or folder" in bad.stderr
    (tmp_path / "r.yaml").write_text(recipe)
    out = toolkit("train", "r.yaml", cwd=tmp_path).stdout
    assert (tmp_path / "runs" / "cli" / "pretrain" / "final" / "model.safetensors").exists()
    assert "pretrain" in out
    # Overrides after options too, as users type them.
    toolkit("train", "r.yaml", "--overwrite", "stages.pretrain.train.max_steps=3", cwd=tmp_path)
    logged = (tmp_path / "runs/cli/pretrain/metrics.jsonl").read_text().splitlines()
    assert json.loads(logged[-1])["step"] == 3
    wrong = toolkit("train", "r.yaml", "--force", cwd=tmp_path, ok=False)
    assert wrong.returncode == 2 and "unrecognized arguments: --force" in wrong.stderr
