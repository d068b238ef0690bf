"""Task accuracy and answer likelihood against hand-computed references."""

import math

import pytest
import torch

from eval.accuracy import answer_nll, answer_spans, generate_answers, score_answers, task_accuracy
from toolkit.data.tokenizer import ANSWER_MARGIN, answer_budget, train_tokenizer
from toolkit.models import build_config
from toolkit.models.decoder import DecoderForCausalLM

ROWS = [
    {"task": "addition", "prompt": "What is 17 + 25?", "answer": "42"},
    {"task": "copy", "prompt": "Repeat after me: blue river", "answer": "blue river"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("c") / "c.txt"
    corpus.write_text("What is 17 + 25? It is 42. Repeat after me: blue river, blue river.\n" * 40)
    return train_tokenizer([str(corpus)], vocab_size=300, out_dir=tmp_path_factory.mktemp("t") / "tok")


def test_answer_spans_cover_exactly_the_answer_and_end_of_turn(tokenizer):
    sequences, masks = answer_spans(tokenizer, ROWS)
    for row, ids, mask in zip(ROWS, sequences, masks, strict=True):
        scored = [t for t, m in zip(ids, mask, strict=True) if m]
        assert tokenizer.decode(scored) == row["answer"] + "<|im_end|>"
        prompt = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert prompt.endswith("<|im_start|>assistant\n") and row["prompt"] in prompt


def test_answer_nll_matches_manual_log_softmax(tokenizer):
    torch.manual_seed(0)
    model = DecoderForCausalLM(
        build_config("decoder-tiny", vocab_size=len(tokenizer), num_hidden_layers=1)
    ).eval()
    sequences, masks = answer_spans(tokenizer, ROWS)
    total, count = 0.0, 0
    for ids, mask in zip(sequences, masks, strict=True):  # one row at a time: no padding involved
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for position in range(1, len(ids)):
            if mask[position]:
                total -= logp[position - 1, ids[position]].item()
                count += 1
    assert math.isclose(answer_nll(model, tokenizer, ROWS, batch_size=2), total / count, rel_tol=1e-4)


def test_score_answers_per_task():
    result = score_answers(ROWS, ["42.", "blue  river\nmore text"], samples=1)
    assert result["accuracy"] == 1.0 and result["per_task"] == {"addition": 1.0, "copy": 1.0}
    result = score_answers(ROWS, ["43", "blue river"])
    assert result["accuracy"] == 0.5 and result["per_task"]["addition"] == 0.0


def test_answers_get_enough_tokens_for_the_longest_right_answer(tokenizer):
    """A fixed limit cut long answers short (tool calls of 25-29 tokens under a 24-token limit), so they could
    only be scored wrong: the default budget is the longest answer's tokens, end of turn included, plus a
    margin, and it is recorded with the result."""
    long = {"task": "copy", "prompt": "Repeat after me: blue river", "answer": "blue river " * 12}
    needed = len(tokenizer(long["answer"], add_special_tokens=False)["input_ids"]) + 1
    assert answer_budget(tokenizer, [r["answer"] for r in [*ROWS, long]]) == needed + ANSWER_MARGIN
    torch.manual_seed(0)
    model = DecoderForCausalLM(
        build_config("decoder-tiny", vocab_size=len(tokenizer), num_hidden_layers=1)
    ).eval()
    model.generation_config.eos_token_id = None
    result = task_accuracy(model, tokenizer, [*ROWS, long], samples=0)
    assert result["max_new_tokens"] == needed + ANSWER_MARGIN > 24
    assert task_accuracy(model, tokenizer, ROWS, max_new_tokens=5, samples=0)["max_new_tokens"] == 5


def test_sampled_accuracy_scores_a_fixed_draw_and_leaves_the_random_state_alone(tokenizer):
    """`sampled` answers per prompt, drawn at the temperature an RL stage samples at, scored by the same rule:
    the expected exact-answer reward. The draw is fixed (seed 0) and the caller's random state is untouched."""
    torch.manual_seed(1)
    model = DecoderForCausalLM(
        build_config("decoder-tiny", vocab_size=len(tokenizer), num_hidden_layers=1)
    ).eval()
    rows = [*ROWS, {"task": "copy", "prompt": "Repeat after me: blue", "answer": "blue"}]
    torch.manual_seed(7)
    first = task_accuracy(model, tokenizer, rows, max_new_tokens=3, samples=0, sampled=4)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)  # the evaluation drew from its own generator state
    again = task_accuracy(model, tokenizer, rows, max_new_tokens=3, samples=0, sampled=4)
    assert first["sampled_accuracy"] == again["sampled_accuracy"]
    assert first["sampled"] == {"per_prompt": 4, "temperature": 1.0}
    torch.manual_seed(0)
    drawn = generate_answers(model, tokenizer, [r["prompt"] for r in rows], 3, sampled=4)
    assert len(drawn) == 12 and len(set(drawn)) > 1  # drawn, not greedy
    reference = score_answers([r for r in rows for _ in range(4)], drawn)
    assert first["sampled_accuracy"] == reference["accuracy"]
    assert first["per_task_sampled"] == reference["per_task"]
