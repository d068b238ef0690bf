"""Teacher embeddings: pairs read with file:line errors, pooling as defined, and the `datasets` cache reused."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit.data.embeddings import HIERARCHY_LAYERS, embedded_pairs, pool, read_pairs
from toolkit.errors import ToolkitError


@pytest.fixture(scope="module")
def make_teacher():
    """A tiny causal LM with a tokenizer trained on the shipped corpus, saved as an HF folder."""

    def make(out):
        from toolkit.data.tokenizer import train_tokenizer
        from toolkit.models import DecoderForCausalLM, build_config

        tokenizer = train_tokenizer(["data/corpus/valid.jsonl"], 300, out)
        torch.manual_seed(0)
        config = build_config(
            "decoder-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128
        )
        DecoderForCausalLM(config).save_pretrained(out)
        return out

    return make


def test_pairs_come_from_conversations_and_prompt_answer_rows(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                                 {"role": "assistant", "content": "a1"}]}) + "\n"
        + json.dumps({"prompt": "q2", "answer": "a2"}) + "\n"
    )  # fmt: skip
    assert read_pairs([chats]) == [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q"}) + "\n" + json.dumps({"text": "no pair"}) + "\n")
    with pytest.raises(ToolkitError, match=r"bad.jsonl:1: no question and answer"):
        read_pairs([bad])


def test_pooling_excludes_padding_and_hierarchical_averages_the_last_layers():
    torch.manual_seed(0)
    hidden = tuple(torch.randn(2, 5, 3) for _ in range(6))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mean = pool(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], hidden[-1][0, :3].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "last")[0], hidden[-1][0, 2])
    expected = torch.stack([h[0, :3].mean(0) for h in hidden[-HIERARCHY_LAYERS:]]).mean(0)
    torch.testing.assert_close(pool(hidden, mask, "hierarchical")[0], expected)


def test_embedded_pairs_are_cached_and_the_teacher_runs_once(make_teacher, tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    pairs = [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(6)]
    calls = []

    def load():
        from toolkit.data.embeddings import load_teacher

        calls.append(1)
        return load_teacher(str(teacher))

    def embedded(pooling: str):
        return embedded_pairs(
            str(teacher),
            pairs,
            pooling=pooling,
            max_length=32,
            batch_size=4,
            cache_dir=tmp_path / "c",
            teacher=load,
        )

    first, hit = embedded("mean")
    assert not hit and len(calls) == 1 and len(first[0]["question_embeddings"]) == 64
    again, hit = embedded("mean")
    assert hit and len(calls) == 1  # read from the Arrow file, no teacher
    assert again[:]["answer_embeddings"] == first[:]["answer_embeddings"]
    _, hit = embedded("last")
    assert not hit and len(calls) == 2  # another pooling is another file
