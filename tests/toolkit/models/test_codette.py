"""`codette` against transformers' own Starcoder2ForCausalLM, through the Auto classes, and its preset sizes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

from tests.toolkit.models.conventions import assert_checkpointing_keeps_gradients, randomize_norms_and_biases
from toolkit.models import build_config, count_parameters
from toolkit.models.codette import CodetteForCausalLM

VOCAB = 512


def make_pair(**overrides) -> tuple[CodetteForCausalLM, Starcoder2ForCausalLM]:
    """A two-layer codette with random norms and biases, and a Starcoder2 holding the same weights."""
    torch.manual_seed(0)
    config = build_config("codette-tiny", vocab_size=VOCAB, num_hidden_layers=2, **overrides)
    ours = CodetteForCausalLM(config).eval()
    randomize_norms_and_biases(ours)
    # Starcoder2's config written out by hand (not through the export plan).
    reference = Starcoder2ForCausalLM(
        Starcoder2Config(
            vocab_size=VOCAB,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings,
            norm_epsilon=config.layer_norm_eps,
            use_bias=config.bias,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            residual_dropout=0.0,
            embedding_dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=None,  # Starcoder2's 50256 lies outside this vocabulary
            eos_token_id=None,
        )
    ).eval()
    # Same names on both sides: a strict load fails on any tensor that is missing, extra or misnamed.
    state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    reference.load_state_dict(state, strict=False)
    missing = set(reference.state_dict()) - set(state)
    assert missing == {"lm_head.weight"} and set(state) <= set(reference.state_dict())
    assert reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    return ours, reference


SHAPES = {
    "biased": {},
    "bias-free": {"bias": False},
    "grouped-kv": {"num_key_value_heads": 2},
    "erf-gelu": {"hidden_act": "gelu"},
}


@pytest.mark.parametrize("overrides", SHAPES.values(), ids=SHAPES.keys())
def test_logits_match_starcoder2(overrides):
    ours, reference = make_pair(**overrides)
    linear_biases = [n for n, _ in ours.named_parameters() if n.endswith("bias") and "norm" not in n]
    assert len(linear_biases) == (6 * 2 if ours.config.bias else 0)
    ids = torch.randint(0, VOCAB, (2, 33))
    with torch.no_grad():
        a = ours(ids).logits
        b = reference(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("bias", [True, False])
def test_left_padded_batch_matches_starcoder2_and_unpadded_rows(bias):
    ours, reference = make_pair(bias=bias)
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    with torch.no_grad():
        a = ours(**inputs).logits
        b = reference(**inputs).logits
        alone = ours(ids[1:, 5:]).logits
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5, rtol=0), (a[real] - b[real]).abs().max()
    # The padded row's real positions are what the row computes on its own.
    assert torch.allclose(a[1, 5:], alone[0], atol=1e-5, rtol=0), (a[1, 5:] - alone[0]).abs().max()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_cache_matches_no_cache_and_starcoder2(attn):
    ours, reference = make_pair()
    ours.config._attn_implementation = attn
    reference.config._attn_implementation = attn
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as batched generation does
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = ours.generate(ids, use_cache=True, **kwargs)
        uncached = ours.generate(ids, use_cache=False, **kwargs)
        expected = reference.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected)


def test_save_load_round_trip_through_auto_classes(tmp_path):
    ours, _ = make_pair(bias=False)
    ours.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "codette" and config.bias is False and config.tie_word_embeddings
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is CodetteForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # The rotary frequencies are not saved: a stale table after loading would still run, wrongly.
    assert torch.equal(loaded.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_gradient_checkpointing_gives_same_gradients():
    assert_checkpointing_keeps_gradients(make_pair()[0], VOCAB)


def test_dropout_sits_on_embeddings_residuals_and_inside_the_mlp():
    ours, _ = make_pair(dropout=0.1, attention_dropout=0.1)
    # The rate reaches each place the project applies it: embeddings, both residual branches, after the
    # MLP's activation; the attention probabilities have their own.
    assert ours.model.dropout.p == 0.1
    layer = ours.model.layers[0]
    assert layer.dropout.p == 0.1 and layer.mlp.dropout.p == 0.1 and layer.self_attn.attention_dropout == 0.1
    ids = torch.randint(0, VOCAB, (1, 16))
    ours.train()
    torch.manual_seed(1)
    noisy = ours(ids).logits
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(noisy, ours(ids).logits)
        assert torch.equal(ours(ids).logits, ours(ids).logits)


def codette_parameters(vocab: int, d: int, layers: int, heads: int, ff: int) -> int:
    """The count written out: tied embeddings, blocks of four biased attention projections (multi-head: k
    and v as wide as q), two LayerNorms and a biased two-matrix MLP, and the final LayerNorm."""
    layer_norm = 2 * d  # weight and bias
    attention = 4 * (d * d + d)  # q, k, v, o, each with its bias
    mlp = (d * ff + ff) + (ff * d + d)
    per_layer = 2 * layer_norm + attention + mlp
    return vocab * d + layers * per_layer + layer_norm


PUBLISHED = {
    # preset: (vocab, hidden, layers, heads, intermediate), our count; the project labels them 1.3B/2.7B/5.3B.
    "codette-small": ((32768, 1024, 18, 16, 4096), 260_288_512),
    "codette-medium": ((32768, 2048, 24, 32, 8192), 1_275_711_488),
    "codette-large": ((32768, 3072, 32, 48, 12288), 3_725_826_048),
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_published_parameter_counts_match_hand_formula(preset):
    shape, count = PUBLISHED[preset]
    config = build_config(preset)
    assert (
        config.vocab_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
    ) == shape
    assert config.max_position_embeddings == 2048 and config.layer_norm_eps == 1e-12
    assert config.dropout == config.attention_dropout == 0.1
    assert codette_parameters(*shape) == count
    assert count_parameters(config) == count


def test_arch_info_prints_the_projects_figures_beside_the_count(capsys):
    from toolkit.cli import main

    assert main(["arch", "info", "codette-small"]) == 0
    out = capsys.readouterr().out
    assert "260,288,512 parameters" in out
    assert "counted here: 0.26B, 1.0 GB fp32; project: 1.3B, 5.2 GB fp32" in out
