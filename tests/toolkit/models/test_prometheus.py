"""`prometheus` against transformers' own GPT2LMHeadModel, through the Auto classes, and its preset sizes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tests.toolkit.models.conventions import assert_checkpointing_keeps_gradients, randomize_norms_and_biases
from toolkit.models import build_config, count_parameters
from toolkit.models.prometheus import PrometheusForCausalLM

VOCAB = 512


def gpt2_state(ours: PrometheusForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names, written out by hand (not through the export plan), with the four
    projection weights transposed into `Conv1D`'s [in, out] layout."""
    state = {
        "transformer.wte.weight": ours.model.embed_tokens.weight,
        "transformer.wpe.weight": ours.model.embed_positions.weight,
        "transformer.ln_f.weight": ours.model.norm.weight,
        "transformer.ln_f.bias": ours.model.norm.bias,
        "lm_head.weight": ours.lm_head.weight,
    }
    for i, layer in enumerate(ours.model.layers):
        pairs = {
            "ln_1": layer.input_layernorm,
            "attn.c_attn": layer.self_attn.qkv_proj,
            "attn.c_proj": layer.self_attn.o_proj,
            "ln_2": layer.post_attention_layernorm,
            "mlp.c_fc": layer.mlp.up_proj,
            "mlp.c_proj": layer.mlp.down_proj,
        }
        for name, module in pairs.items():
            weight = module.weight if name.startswith("ln") else module.weight.t()
            state[f"transformer.h.{i}.{name}.weight"] = weight
            state[f"transformer.h.{i}.{name}.bias"] = module.bias
    return {k: v.detach().clone() for k, v in state.items()}


def make_pair(**overrides):
    torch.manual_seed(0)
    config = build_config("prometheus-tiny", vocab_size=VOCAB, num_hidden_layers=2, **overrides)
    ours = PrometheusForCausalLM(config).eval()
    randomize_norms_and_biases(ours)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=config.max_position_embeddings,
            n_embd=config.hidden_size,
            n_layer=config.num_hidden_layers,
            n_head=config.num_attention_heads,
            n_inner=config.intermediate_size,
            activation_function="gelu_new",
            layer_norm_epsilon=config.layer_norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,  # GPT-2's 50256 lies outside this vocabulary
            eos_token_id=None,
        )
    ).eval()
    missing, unexpected = gpt2.load_state_dict(gpt2_state(ours), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    return ours, gpt2


def test_logits_match_gpt2():
    ours, gpt2 = make_pair()
    ids = torch.randint(0, VOCAB, (2, 33))
    with torch.no_grad():
        a = ours(ids).logits
        b = gpt2(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_cache_matches_no_cache_and_gpt2(attn):
    ours, gpt2 = make_pair()
    ours.config._attn_implementation = attn
    ids = torch.randint(0, VOCAB, (1, 7))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = ours.generate(ids, use_cache=True, **kwargs)
        uncached = ours.generate(ids, use_cache=False, **kwargs)
        reference = gpt2.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


def test_save_load_round_trip_through_auto_classes(tmp_path):
    ours, _ = make_pair()
    ours.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "prometheus"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PrometheusForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_gradient_checkpointing_gives_same_gradients():
    assert_checkpointing_keeps_gradients(make_pair()[0], VOCAB)


def test_125m_parameter_count_matches_hand_formula():
    vocab, d, layers, ff, context = 50257, 768, 12, 3072, 512
    layer_norm = 2 * d  # weight and bias
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # fused q/k/v and output projection, with biases
    mlp = (d * ff + ff) + (ff * d + d)
    per_layer = 2 * layer_norm + attention + mlp
    # Token and position embeddings, the blocks, the final norm; the LM head is the token embedding.
    expected = vocab * d + context * d + layers * per_layer + layer_norm
    assert expected == 124_046_592
    assert count_parameters(build_config("prometheus-125m")) == expected
