"""vLLM itself on the exports, in its own environment (`make vllm-env`; `make test-vllm` runs these): every
architecture's folder verified in vLLM by `toolkit export vllm --verify-in vllm` (natively and through the
Transformers backend), a folder vLLM computes differently failing by the check's name, and `toolkit serve
--run` answering an OpenAI client the way users call it, for a model and for a base + LoRA adapter.

The references are transformers' own figures on the source model (greedy tokens, log-probabilities) and, for
serving, its greedy chat reply; nothing here compares vLLM with itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.servers import free_port, server, stop
from export.verify_hf import source_reference
from export.verify_vllm import server_environ, verify_in_vllm
from export.vllm import export_vllm
from tests.export.vllm_helpers import (
    QUESTION,
    greedy_reply,
    make_chat_lora_run,
    make_chat_model,
    make_model,
    make_run,
    make_tokenizer,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOOLKIT = str(Path(sys.executable).parent / "toolkit")
SERVER_START_S = 600  # a vLLM server on two cores: ~60 s for a tiny model
# What the reference and vLLM agreed to on these models (~1e-6); a wrong weight or position is far above.
LOGPROB_AGREEMENT = 1e-4


def toolkit(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([TOOLKIT, *args], capture_output=True, text=True, timeout=1200)
    if ok:
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize(
    ("preset", "form"),
    [
        ("decoder-tiny", "native"),
        ("prometheus-tiny", "native"),
        ("codette-tiny", "native"),
        ("prometheus-tiny", "remote-code"),
        ("codette-tiny", "remote-code"),
    ],
)
def test_export_is_verified_in_vllm(tmp_path, preset, form):
    """vLLM serves each architecture's folder, natively (as Llama, GPT-2, Starcoder2) or through its
    Transformers backend, with the source's greedy tokens and log-probabilities, and the report says which
    route ran."""
    source = make_model(tmp_path / "model", make_tokenizer(tmp_path / "tokenizer"), preset=preset)
    out = tmp_path / form
    proc = toolkit("export", "vllm", str(source), "--out", str(out), "--form", form, "--verify-in", "vllm")
    report = json.loads((out / "export_report.json").read_text())
    section = report["verification"]["vllm"]
    assert report["ok"] and section["ok"], section["checks"]
    route = "transformers" if form == "remote-code" else "native"
    assert section["required_route"] == route and section["routes"][route]["ran"]
    assert section["measures"][f"vllm_{route}_greedy_identical"] == 1.0
    assert section["measures"][f"vllm_{route}_prompt_logprob_max_abs_delta"] <= LOGPROB_AGREEMENT
    assert section["measures"][f"vllm_{route}_greedy_logprob_max_abs_delta"] <= LOGPROB_AGREEMENT
    assert f"route `{route}`: ran" in proc.stdout
    if form == "remote-code":
        architecture = json.loads((out / "config.json").read_text())["architectures"][0]
        assert section["routes"]["native"] == {
            "ran": False,
            "why": f"vLLM has no native implementation of {architecture}",
        }
        # Where vLLM itself ran the folder, the clean process does not emulate its backend.
        assert "transformers_backend_max_abs_logit_delta" not in report["verification"]["model"]["measures"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


def test_other_weights_fail_by_name(tiny_run, tmp_path):
    """A folder whose weights vLLM computes differently from the source fails the greedy and
    log-probability checks by name; one vLLM cannot load fails `vllm_native_serves` with vLLM's reason."""
    from safetensors.torch import load_file, save_file

    source = source_reference(tiny_run / "sft" / "final", "float32", vllm_rows=True)
    folder = export_vllm(tiny_run, tmp_path / "vllm", verify=False).path
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = -tensors["model.norm.weight"]  # every logit negated: greedy picks others
    save_file(tensors, weights, metadata={"format": "pt"})
    section = verify_in_vllm(folder, source, form="native")
    failed = {c["measure"] for c in section["checks"] if not c["ok"]}
    assert not section["ok"]
    assert {"vllm_native_greedy_identical", "vllm_native_prompt_logprob_max_abs_delta"} <= failed
    assert section["measures"]["vllm_native_tokenization_identical"] == 1.0  # same tokenizer: only weights

    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    section = verify_in_vllm(folder, source, form="native")
    assert [c["measure"] for c in section["checks"]] == ["vllm_native_serves"] and not section["ok"]
    assert section["routes"]["native"]["error"]


@pytest.fixture(scope="module")
def remote_folder(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote") / "out"
    return export_vllm(tiny_run, out, form="remote-code", verify=False).path


NARROW_FORWARD = (
    "\n\n_forward = DecoderModel.forward\n\n\n"
    "def _narrow(self, input_ids=None, attention_mask=None, **kwargs):\n"
    "    return _forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)\n\n\n"
    "DecoderModel.forward = _narrow\n"
)


@pytest.mark.parametrize(
    ("old", "new", "failed"),
    [
        # Positions counted in the packed row, not read from `position_ids`: one prompt at a time (and so
        # transformers in a clean process) hides it, vLLM's batches do not.
        (
            "self.rotary_emb(hidden_states, position_ids=position_ids)",
            "self.rotary_emb(hidden_states, position_ids=torch.arange(hidden_states.shape[1])[None])",
            "vllm_transformers_greedy_logprob_max_abs_delta",
        ),
        # A decoder forward that computes the same but does not name the arguments vLLM compiles with.
        ("", NARROW_FORWARD, "vllm_transformers_serves"),
    ],
    ids=["positions-not-from-position-ids", "decoder-forward-without-compiled-arguments"],
)
def test_remote_code_that_breaks_the_backend_contract_fails(
    tiny_run, remote_folder, tmp_path, old, new, failed
):
    """Remote code that transformers runs right but vLLM's Transformers backend cannot: vLLM itself says so."""
    folder = tmp_path / "edited"
    shutil.copytree(remote_folder, folder)
    modeling = folder / "modeling_decoder.py"
    text = modeling.read_text()
    assert old in text
    modeling.write_text(text.replace(old, new) if old else text + new)
    source = source_reference(tiny_run / "sft" / "final", "float32", vllm_rows=True)
    section = verify_in_vllm(folder, source, form="remote-code")
    assert not section["ok"] and failed in {c["measure"] for c in section["checks"] if not c["ok"]}


@contextmanager
def served(src: Path, log: Path, *options: str):
    """`toolkit serve SRC --run [OPTIONS]` on 127.0.0.1 (the real `vllm serve` it becomes), ready on
    `/health`; its process group is stopped on the way out, whatever happened inside."""
    port = free_port()
    argv = [TOOLKIT, "serve", str(src), "--run", "--host", "127.0.0.1", "--port", str(port), *options]
    with server(
        argv, port, log, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, start_s=SERVER_START_S
    ) as url:
        yield url


def chat(url: str, model: str) -> tuple[str, str, int]:
    """The OpenAI client's greedy chat reply to QUESTION: text, finish reason, completion tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    # Room for a runaway: a reply that does not stop at the end of its turn runs to max_tokens.
    answer = client.chat.completions.create(model=model, messages=QUESTION, temperature=0.0, max_tokens=48)
    choice = answer.choices[0]
    return choice.message.content, choice.finish_reason, answer.usage.completion_tokens


def listed_models(url: str) -> list[str]:
    from openai import OpenAI

    return [m.id for m in OpenAI(base_url=f"{url}/v1", api_key="unused").models.list().data]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> tuple[Path, object]:
    """A decoder that answers QUESTION with '42.' and ends its turn, and its tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = make_tokenizer(root / "tokenizer")
    return make_chat_model(root / "chat-model", tokenizer), tokenizer


def test_served_reply_stops_at_end_of_turn(chat_base, tmp_path):
    """The served model answers an OpenAI chat request as transformers does and stops at the end of its turn
    (finish reason "stop", not "length"); `/v1/models` lists the served name."""
    base, tokenizer = chat_base
    out = tmp_path / "chat-model-vllm"
    toolkit("export", "vllm", str(base), "--out", str(out), "--verify-in", "clean")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    expected, ended = greedy_reply(model, tokenizer)
    assert ended
    with served(out, tmp_path / "serve.log") as url:
        assert listed_models(url) == [out.name]
        text, finish, tokens = chat(url, out.name)
    assert (text, finish) == (expected, "stop")
    assert tokens == len(tokenizer(expected, add_special_tokens=False)["input_ids"]) + 1  # + end of turn


def test_served_adapter_answers_as_the_merged_model(chat_base, tmp_path):
    """A LoRA run served as base + adapter (`--enable-lora --lora-modules`): the adapter's reply equals the
    merged folder's in transformers, the base's stays the base's, both stop at the end of the turn."""
    base, tokenizer = chat_base
    run = make_chat_lora_run(tmp_path, base, tokenizer, "forty-two.")
    out = tmp_path / "lora-vllm"
    toolkit("export", "vllm", str(run), "--out", str(out), "--verify-in", "clean")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    merged_reply, ended = greedy_reply(merged, tokenizer)
    assert ended and merged_reply == "forty-two."
    with served(out, tmp_path / "serve.log") as url:
        assert set(listed_models(url)) == {out.name, "adapter"}
        adapter_text, adapter_finish, _ = chat(url, "adapter")
        base_text, base_finish, _ = chat(url, out.name)
    assert (adapter_text, adapter_finish) == (merged_reply, "stop")
    assert (base_text, base_finish) == ("42.", "stop")
    shutil.rmtree(out)


def test_merge_adapter_verdicts_hold_in_vllm(chat_base, tmp_path):
    """`toolkit merge-adapter`'s verdict on who takes an adapter folder, checked in vLLM itself. "yes": the
    adapter as the run wrote it, served beside the base's export (`toolkit serve BASE --lora NAME=ADAPTER`),
    answers as the merged folder does in transformers. "no" (whole embedding and head rows, after added
    tokens): `toolkit serve` refuses it, and vLLM, given the same flags directly, does not serve it either."""
    from peft import LoraConfig, get_peft_model

    from export.serve import serve_command
    from export.verify_vllm import vllm_executable

    base, tokenizer = chat_base
    run = make_chat_lora_run(tmp_path, base, tokenizer, "forty-two.")
    adapter = run / "lora" / "final"
    report = json.loads(toolkit("merge-adapter", str(run), "--json").stdout)
    assert report["consumers"]["vllm"] == "yes: --enable-lora --lora-modules NAME=ADAPTER --max-lora-rank 8"
    merged = AutoModelForCausalLM.from_pretrained(run / "lora" / "merged", dtype=torch.float32).eval()
    expected, ended = greedy_reply(merged, tokenizer)
    assert ended and expected == "forty-two."
    base_export = tmp_path / "base-vllm"
    toolkit("export", "vllm", str(base), "--out", str(base_export), "--verify-in", "clean")
    with served(base_export, tmp_path / "serve.log", "--lora", f"tuned={adapter}") as url:
        assert set(listed_models(url)) == {base_export.name, "tuned"}
        assert chat(url, "tuned")[:2] == (expected, "stop")

    grown = tokenizer.__class__.from_pretrained(base)
    grown.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(grown), mean_resizing=False)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    whole = tmp_path / "whole-rows"
    get_peft_model(model, lora).save_pretrained(whole)
    grown.save_pretrained(whole)
    report = json.loads(toolkit("merge-adapter", str(whole), "--base", str(base), "--json").stdout)
    assert report["consumers"]["vllm"].startswith("no: vLLM's LoRA loads low-rank A/B weights")
    refused = toolkit("serve", str(base_export), "--lora", f"whole={whole}", ok=False)
    assert refused.returncode == 2 and "holds whole embedding/head rows" in refused.stderr

    port = free_port()
    argv = serve_command(base_export, gpus=0, host="127.0.0.1", port=port)
    argv += ["--enable-lora", "--lora-modules", f"whole={whole}", "--max-lora-rank", "8"]
    log = tmp_path / "whole.log"
    env = server_environ(VLLM_CPU_KVCACHE_SPACE="1")
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(vllm_executable()), *argv[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline, answer = time.monotonic() + SERVER_START_S, None
        while process.poll() is None and time.monotonic() < deadline and answer is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    answer = chat(f"http://127.0.0.1:{port}", "whole")
            except OSError:
                time.sleep(2)
            except Exception as error:  # noqa: BLE001 - the adapter's request failing is the expected outcome
                answer = error
        exited = process.poll()  # None while it runs
    finally:
        stop(process)
    # vLLM 0.32 refuses to start with it ("vLLM only supports modules_to_save being either None or
    # ['classifier', 'score'] ..."); a version that started would have to fail the adapter's requests.
    refusal = exited not in (None, 0) and "modules_to_save" in log.read_text()
    assert isinstance(answer, Exception) or (answer is None and refusal), (answer, log.read_text()[-2000:])
