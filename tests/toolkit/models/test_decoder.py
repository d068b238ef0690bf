"""`decoder` against transformers' own LlamaForCausalLM, and through the Auto classes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.toolkit.models.conventions import assert_checkpointing_keeps_gradients, randomize_norms_and_biases
from toolkit.models import build_config
from toolkit.models.decoder import DecoderForCausalLM

SHAPES = {
    "tied-gqa": dict(tie_word_embeddings=True, num_key_value_heads=2),
    "untied-mha": dict(tie_word_embeddings=False, num_key_value_heads=4),
}


def make_pair(**overrides):
    torch.manual_seed(0)
    config = build_config("decoder-tiny", vocab_size=512, num_hidden_layers=2, **overrides)
    ours = DecoderForCausalLM(config).eval()
    randomize_norms_and_biases(ours)
    llama_config = LlamaConfig(
        **{k: v for k, v in config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    )
    llama = LlamaForCausalLM(llama_config).eval()
    missing, unexpected = llama.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    return ours, llama


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_llama(shape):
    ours, llama = make_pair(**SHAPES[shape])
    ids = torch.randint(0, 512, (2, 33))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on one row exercises the mask path
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = llama(ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert (
        ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr() or shape == "untied-mha"
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_cache_matches_no_cache_and_llama(attn):
    ours, llama = make_pair()
    ours.config._attn_implementation = attn
    ids = torch.randint(0, 512, (1, 7))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = ours.generate(ids, use_cache=True, **kwargs)
        uncached = ours.generate(ids, use_cache=False, **kwargs)
        reference = llama.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


def test_save_load_round_trip_through_auto_classes(tmp_path):
    ours, _ = make_pair(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "decoder"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DecoderForCausalLM
    # Non-persistent RoPE buffers must be recomputed on load, with the saved theta.
    assert torch.equal(loaded.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_untied_embeddings_survive_reload(tmp_path):
    ours, _ = make_pair(tie_word_embeddings=False)
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings is False
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, ours.lm_head.weight)


def test_gradient_checkpointing_gives_same_gradients():
    assert_checkpointing_keeps_gradients(make_pair()[0], 512)


def test_loss_is_shifted_cross_entropy():
    ours, _ = make_pair()
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        out = ours(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert torch.allclose(out.loss, expected, atol=1e-6)
