"""Analysis measures against hand computations: distinct-n and repetition on known token lists, attention
entropy of a model whose attention is uniform (log of the keys each query sees), FLOPs per token counted by
torch beside the estimate, and `toolkit eval --analysis` as a user runs it (report, JSON, heat-map PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eval.analysis import (
    attention_entropy,
    distinct_n,
    flops_estimate,
    flops_measured,
    generation_measures,
    repetition,
)
from tests.eval.helpers import toolkit_eval

ROOT = Path(__file__).resolve().parents[2]


def test_distinct_and_repetition_by_hand():
    texts = [["a", "b", "a", "b", "a", "b"], ["c", "d"]]
    assert distinct_n(texts, 1) == pytest.approx(4 / 8)  # a b c d over 8 tokens
    assert distinct_n(texts, 2) == pytest.approx(3 / 6)  # ab ba cd over ab ba ab ba ab cd
    assert repetition(texts[0]) == pytest.approx(1 - 2 / 3)  # abab baba abab: 2 unique of 3
    assert repetition(["x", "y"]) == 0.0
    measures = generation_measures(texts)
    assert measures["mean_length"] == 4.0 and measures["repetition_4"] == pytest.approx((1 / 3 + 0) / 2)


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.export.vllm_helpers import make_tokenizer, preset_config

    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("decoder-tiny", tokenizer, 2)).eval()
    return model, tokenizer


def test_uniform_attention_has_the_entropy_of_a_uniform_distribution(model_and_tokenizer):
    """With zero query weights every score is 0: query i attends uniformly to its i + 1 keys."""
    model, tokenizer = model_and_tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    queries = []
    with torch.no_grad():
        saved = [layer.self_attn.q_proj.weight.clone() for layer in model.model.layers]
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
        try:
            entropy = attention_entropy(model, tokenizer, [text])
        finally:
            for layer, weight in zip(model.model.layers, saved, strict=True):
                layer.self_attn.q_proj.weight.copy_(weight)
    length = len(tokenizer(text)["input_ids"])
    queries = [math.log(i + 1) for i in range(1, length)]
    assert len(entropy) == 2 and len(entropy[0]) == model.config.num_attention_heads
    for row in entropy:
        assert row == pytest.approx([sum(queries) / len(queries)] * len(row), abs=1e-5)
    # And the model's own attention is not uniform: the measure follows the weights.
    assert attention_entropy(model, tokenizer, [text])[0] != pytest.approx(entropy[0], abs=1e-5)


def test_flops_counted_by_torch_beside_the_estimate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = torch.randint(0, len(tokenizer), (1, 64))
    measured = flops_measured(model, ids)
    n = sum(p.numel() for p in model.parameters())  # tied: the output projection is the embedding
    assert flops_estimate(model, 0) == 2 * n
    assert measured == pytest.approx(flops_estimate(model, 64), rel=0.15)


@pytest.mark.slow
def test_toolkit_eval_analysis(tmp_path):
    from tests.export.vllm_helpers import make_run

    run = make_run(tmp_path)
    done = toolkit_eval(
        tmp_path, str(run), "--analysis", "--prompts", str(ROOT / "data/eval/open.jsonl"),
        "--perplexity", str(ROOT / "data/corpus/valid.jsonl"), "--limit", "4", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["generations"]["n"] == 4 and result["parameters"] > 0
    memory = result["memory"]
    assert memory["measured"]["weights"] == memory["estimate"]["inference"]["weights"]  # float32
    assert memory["measured"]["training_step_peak_rise"] > 0
    heatmap = Path(result["attention_entropy"]["heatmap"])
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heatmap.parent.parent == run / "eval"
    assert json.loads((heatmap.parent / "analysis.json").read_text())["artifact"] == str(
        run / "sft" / "final"
    )
