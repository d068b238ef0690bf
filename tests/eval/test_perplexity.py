"""Perplexity against the model's own shifted cross-entropy, computed by transformers."""

import math

import torch

from eval.perplexity import perplexity
from toolkit.data.tokenizer import train_tokenizer
from toolkit.models import build_config
from toolkit.models.decoder import DecoderForCausalLM


def tiny_model(tmp_path):
    """A one-layer decoder, random weights, with a tokenizer trained on a small corpus."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log.\n" * 40)
    tokenizer = train_tokenizer([str(corpus)], vocab_size=280, out_dir=tmp_path / "tok")
    torch.manual_seed(0)
    model = DecoderForCausalLM(
        build_config("decoder-tiny", vocab_size=len(tokenizer), num_hidden_layers=1)
    ).eval()
    return model, tokenizer


def test_perplexity_is_exp_of_transformers_loss(tmp_path):
    model, tokenizer = tiny_model(tmp_path)
    texts = ["the cat sat on the mat", "and the dog sat on the log"]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    window = len(stream)  # one window holding everything: the figure is exp(loss) of that sequence
    with torch.no_grad():
        loss = model(torch.tensor([stream]), labels=torch.tensor([stream])).loss.item()
    result = perplexity(model, tokenizer, texts, window=window)
    assert result["tokens"] == window - 1
    assert math.isclose(result["perplexity"], math.exp(loss), rel_tol=1e-5)


def test_sliding_window_equals_a_token_by_token_computation(tmp_path):
    """Each token scored once with the context a sliding window gives it, computed here one token at a time."""
    model, tokenizer = tiny_model(tmp_path)
    texts = ["the cat sat on the mat and the dog sat on the log"] * 3
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    window, stride = 12, 5
    # Token t is first new in the window starting at the smallest multiple of `stride` with t < start + window
    # (and start <= t - 1, so that it has a token before it); its context runs from that start.
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(stream)):
            start = next(b for b in range(0, len(stream), stride) if t < b + window)
            logits = model(torch.tensor([stream[start:t]])).logits[0, -1]
            nll -= torch.log_softmax(logits, -1)[stream[t]].item()
    result = perplexity(model, tokenizer, texts, window=window, stride=stride)
    assert result["tokens"] == len(stream) - 1
    assert math.isclose(result["nll"], nll / (len(stream) - 1), rel_tol=1e-5)
    full = perplexity(model, tokenizer, texts, window=window)  # non-overlapping: less context, other figure
    assert not math.isclose(full["nll"], result["nll"], rel_tol=1e-3)
