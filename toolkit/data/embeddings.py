"""Teacher embeddings: (question, answer) pairs from the shipped data, embedded by any Hugging Face model and
cached with `datasets`, for distilling a teacher's embedding space into a student (the lattice).

Pairs come from conversation rows (the first user turn and the assistant turn after it) or from rows with
`prompt`/`question` and `answer`. A row with neither is an error naming file and line.

A text's embedding is pooled from the teacher's hidden states over its tokens (padding excluded):
- `mean`: the mean of the last layer's states;
- `last`: the last layer's state at the last token (what a causal model has read everything by);
- `hierarchical`: the mean over tokens of each of the last four layers' states, then the mean of those four,
  so the embedding carries the top of the network at several depths, not its last layer alone.

The embedded pairs are a `datasets.Dataset` written to an Arrow file named by a hash of everything that
decides its values (the teacher's identity, its weights' sizes and times, pooling, maximum length, the pairs
themselves), so a second run with the same inputs reads the file and runs no teacher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.io import read_jsonl

POOLING = ("mean", "last", "hierarchical")
HIERARCHY_LAYERS = 4


def read_pairs(paths: list[str | Path], limit: int | None = None) -> list[dict[str, str]]:
    """(question, answer) rows of the files, in order; at most `limit` in all."""
    pairs: list[dict[str, str]] = []
    for path in paths:
        for line, row in enumerate(read_jsonl(path), start=1):
            pair = _pair(row)
            if pair is None:
                raise ToolkitError(
                    f"{path}:{line}: no question and answer in this row (give `messages` with a user turn "
                    "and the assistant's answer after it, or `prompt`/`question` and `answer`)"
                )
            pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs


def _pair(row: dict[str, Any]) -> dict[str, str] | None:
    question = row.get("question") or row.get("prompt")
    if question is not None and row.get("answer") is not None:
        return {"question": str(question), "answer": str(row["answer"])}
    messages = row.get("messages") or []
    for first, second in zip(messages, messages[1:], strict=False):
        if first.get("role") == "user" and second.get("role") == "assistant":
            return {"question": str(first["content"]), "answer": str(second["content"])}
    return None


@dataclass
class Teacher:
    """A loaded teacher: its tokenizer and base model, and the width of what it embeds."""

    source: str
    tokenizer: Any
    model: Any

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)


def load_teacher(source: str) -> Teacher:
    """The teacher model (a local folder or Hub id) in float32 on CPU, or on the GPU when there is one; its
    weights from safetensors, its code never from the Hub."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from toolkit.models import register_auto_classes

    register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(source, dtype=torch.float32, use_safetensors=True).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    return Teacher(source, tokenizer, model)


def pool(hidden_states: tuple[Any, ...], mask: Any, pooling: str) -> Any:
    """One vector per row from a model's hidden states (embeddings first, last layer last) and the
    attention mask (1 for tokens, 0 for padding)."""
    weights = mask.unsqueeze(-1).to(hidden_states[-1].dtype)

    def mean(states: Any) -> Any:
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1)

    if pooling == "mean":
        return mean(hidden_states[-1])
    if pooling == "last":
        last = mask.sum(1) - 1  # right padding: the last token of each row
        return hidden_states[-1][range(len(last)), last]
    if pooling == "hierarchical":
        layers = hidden_states[-HIERARCHY_LAYERS:]
        return sum(mean(states) for states in layers) / len(layers)
    raise ToolkitError(f"unknown pooling '{pooling}'; one of: {', '.join(POOLING)}")


def embed(
    teacher: Teacher, texts: list[str], pooling: str, max_length: int, batch_size: int
) -> list[list[float]]:
    """Pooled embeddings of `texts`, in order."""
    import torch

    device = next(teacher.model.parameters()).device
    vectors: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        batch = teacher.tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        with torch.no_grad():
            out = teacher.model(**batch, output_hidden_states=True)
        vectors += pool(out.hidden_states, batch["attention_mask"], pooling).float().cpu().tolist()
    return vectors


def teacher_identity(source: str) -> dict[str, Any]:
    """What names a teacher's weights: its config and each weight file's size and time for a local folder,
    the id for a Hub model (which a user pins by revision)."""
    folder = Path(source)
    if not folder.is_dir():
        return {"hub": source}
    files = sorted(folder.glob("*.safetensors"))
    return {
        "folder": str(folder.resolve()),
        "config": (folder / "config.json").read_text() if (folder / "config.json").exists() else "",
        "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
    }


def cache_key(source: str, pooling: str, max_length: int, pairs: list[dict[str, str]]) -> str:
    payload = json.dumps(
        {"teacher": teacher_identity(source), "pooling": pooling, "max_length": max_length, "pairs": pairs},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def embedded_pairs(
    source: str,
    pairs: list[dict[str, str]],
    *,
    pooling: str,
    max_length: int,
    batch_size: int,
    cache_dir: Path,
    teacher: Callable[[], Teacher] | None = None,
) -> tuple[Any, bool]:
    """The pairs with `question_embeddings` and `answer_embeddings` columns, as a `datasets.Dataset` backed by
    an Arrow file in `cache_dir`; and whether it was read from the cache (no teacher ran). `teacher` gives the
    loaded teacher when one is needed (default: `load_teacher(source)`)."""
    from datasets import Dataset

    if pooling not in POOLING:
        raise ToolkitError(f"unknown pooling '{pooling}'; one of: {', '.join(POOLING)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"pairs-{cache_key(source, pooling, max_length, pairs)}.arrow"
    if path.exists():
        return Dataset.from_file(str(path)), True
    model = teacher() if teacher is not None else load_teacher(source)

    def add_embeddings(batch: dict[str, list[str]]) -> dict[str, Any]:
        return {
            "question_embeddings": embed(model, batch["question"], pooling, max_length, batch_size),
            "answer_embeddings": embed(model, batch["answer"], pooling, max_length, batch_size),
        }

    dataset = Dataset.from_list(pairs).map(
        add_embeddings,
        batched=True,
        batch_size=max(batch_size, 64),
        cache_file_name=str(path),
        new_fingerprint=path.stem,
        desc="teacher embeddings",
    )
    return dataset, False


__all__ = ["POOLING", "Teacher", "embed", "embedded_pairs", "load_teacher", "pool", "read_pairs"]
