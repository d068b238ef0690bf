"""Helpers for the vLLM export and Hub push tests: a tiny run folder, and a local stand-in for the Hub.

`make_run` writes what `toolkit train` leaves behind (recipe.yaml, env.json, a stage's metrics.jsonl, eval.json
and final/ with a one-layer `decoder`, the toolkit's tokenizer and an end-of-turn generation config), in
seconds and without training. `FakeHub` answers the few endpoints `huggingface_hub` calls for `create_repo`
and `create_commit` on 127.0.0.1 and keeps what it received.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import yaml

RECIPE = {
    "name": "tiny",
    "stages": [
        {"name": "tokenizer", "method": "tokenizer", "data": {"sources": ["corpus.txt"]}},
        {
            "name": "sft",
            "method": "sft",
            "model": {"path": "my-org/base-model"},
            "data": {"sources": ["data/sft/train.jsonl", {"path": "my-org/chat-data", "weight": 2}]},
            "train": {"max_steps": 3, "learning_rate": 1.0e-3},
        },
    ],
}
EVAL = {"tasks": {"accuracy": 0.25, "n": 8}, "perplexity": {"perplexity": 123.5, "nll": 4.8, "tokens": 99}}
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "In 1969, 3 astronauts flew 384400 km to the Moon.",
    "Les élèves étudient la physique; 東京は日本の首都です。",
    "Readability counts. Errors should never pass silently.",
] * 20


def make_tokenizer(folder: Path) -> Any:
    from toolkit.data.tokenizer import train_tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    corpus = folder.parent / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    return train_tokenizer([str(corpus)], vocab_size=320, out_dir=folder, min_frequency=1)


def preset_config(preset: str, tokenizer: Any, num_hidden_layers: int, **overrides: Any) -> Any:
    """A small config of a toolkit `preset` (its widths; `num_hidden_layers`, 256 positions) sized to
    `tokenizer`'s vocabulary and special ids, with the toolkit's architectures registered."""
    from toolkit.models import build_config, register_auto_classes

    register_auto_classes()
    return build_config(
        preset,
        vocab_size=len(tokenizer),
        num_hidden_layers=num_hidden_layers,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def make_model(folder: Path, tokenizer: Any, seed: int = 0, preset: str = "decoder-tiny") -> Path:
    """A one-layer model of `preset` with `tokenizer`, saved to `folder` with an end-of-turn generation
    config."""
    from transformers import AutoModelForCausalLM

    from toolkit.data.tokenizer import end_of_turn_ids

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(preset_config(preset, tokenizer, 1)).eval()
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_run(root: Path) -> Path:
    """runs/tiny with a finished `sft` stage (final/, metrics, eval) and a GGUF folder beside it."""
    run = root / "tiny"
    tokenizer = make_tokenizer(run / "tokenizer" / "final")
    make_model(run / "sft" / "final", tokenizer)
    (run / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    env = {"device": "cpu", "cpu_count": 2, "num_processes": 1, "packages": {"torch": torch.__version__}}
    (run / "env.json").write_text(json.dumps(env))
    metrics = [{"step": 1, "loss": 5.5}, {"step": 3, "loss": 4.25}, {"step": 3, "train_runtime": 1.5}]
    (run / "sft" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "sft" / "eval.json").write_text(json.dumps(EVAL))
    # Stand-ins for what `toolkit export ollama` writes; the push only lists and uploads them.
    (run / "gguf").mkdir(parents=True)
    (run / "gguf" / "tiny-q8_0.gguf").write_bytes(b"GGUF" + bytes(60))
    (run / "gguf" / "Modelfile").write_text("FROM ./tiny-q8_0.gguf\n")
    return run


class FakeHub:
    """A minimal Hub on 127.0.0.1: repo creation, README metadata validation, pre-upload (every file
    inline, so no LFS or Xet transfer) and commits."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # method, path, authorization, json body (when JSON)
        self.repos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(
                    {"method": "POST", "path": self.path, "authorization": self.headers.get("Authorization")}
                )
                status, answer = hub.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                hub.requests.append({"method": "GET", "path": self.path})
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        parts = path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["api", "repos", "create"]:
            request = json.loads(body)
            repo = f"{request.get('organization') or 'user'}/{request['name']}"
            self.repos[repo] = request  # name, organization, visibility or private
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if parts[:2] == ["api", "validate-yaml"]:
            # The real Hub checks the card's metadata; here it must at least parse as a model card.
            from huggingface_hub import ModelCard

            try:
                ModelCard(json.loads(body)["content"], ignore_metadata_errors=False)
            except Exception as error:
                return 400, {"errors": [{"message": str(error)}]}
            return 200, {"errors": [], "warnings": []}
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return 200, {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            }
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            received = self.files.setdefault(repo, {})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}
        return 404, {"error": f"not faked: {path}"}

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


# Runs in `python -I` with the project blocked: transformers' own class must load the folder by itself.
_NATIVE_CHECK = """
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("toolkit", "export", "eval"):
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, Block())
import torch
import transformers

model = getattr(transformers, sys.argv[1]).from_pretrained(sys.argv[2], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor([json.loads(sys.argv[3])])).logits[0], sys.argv[4])
"""
NATIVE_IDS = [5, 17, 42, 99, 3, 7, 250, 11]


def native_logits(class_name: str, folder: Path, workdir: Path) -> torch.Tensor:
    """Logits for `NATIVE_IDS` from transformers' `class_name` loading `folder` in a clean process."""
    out = workdir / "logits.pt"
    subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            _NATIVE_CHECK,
            class_name,
            str(folder),
            json.dumps(NATIVE_IDS),
            str(out),
        ],
        check=True,
        cwd=workdir,
        capture_output=True,
    )
    return torch.load(out)


# A conversation a tiny model learns by heart in seconds: asked the question, it answers and ends its turn.
QUESTION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
]


def teach_answer(model: Any, tokenizer: Any, answer: str, steps: int = 120, lr: float = 3e-3) -> None:
    """Train `model` (a transformers or PEFT model) on QUESTION + `answer` until it answers that and ends its
    turn: the loss on every token of the rendered conversation, so the end-of-turn token is learnt too."""
    text = tokenizer.apply_chat_template(
        QUESTION + [{"role": "assistant", "content": answer}], tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def greedy_reply(model: Any, tokenizer: Any, max_new_tokens: int = 24) -> tuple[str, bool]:
    """transformers' greedy reply to QUESTION through the chat template, and whether it ended its turn."""
    from toolkit.data.tokenizer import end_of_turn_ids

    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    stops = end_of_turn_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
    ended = bool(out) and out[-1] in stops
    return tokenizer.decode(out, skip_special_tokens=True), ended


def make_chat_model(folder: Path, tokenizer: Any, answer: str = "42.") -> Path:
    """A two-layer `decoder` that answers QUESTION with `answer` and ends its turn, saved with an end-of-turn
    generation config."""
    from transformers import AutoModelForCausalLM

    from toolkit.data.tokenizer import end_of_turn_ids

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("decoder-tiny", tokenizer, 2))
    teach_answer(model, tokenizer, answer)
    assert greedy_reply(model, tokenizer) == (answer, True)
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_chat_lora_run(root: Path, base: Path, tokenizer: Any, answer: str) -> Path:
    """A LoRA run (runs/<name>/lora/final: adapter and tokenizer) on `base` whose adapter answers QUESTION
    with `answer` instead."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    teach_answer(peft_model, tokenizer, answer, steps=150, lr=1e-2)
    assert greedy_reply(peft_model, tokenizer) == (answer, True)
    run = root / "chat-lora"
    peft_model.save_pretrained(run / "lora" / "final")
    tokenizer.save_pretrained(run / "lora" / "final")
    (run / "recipe.yaml").write_text("name: chat-lora\nstages: [{name: lora, method: sft}]\n")
    return run
