"""The conformance suite: what every registered architecture must do the transformers way, checked the same way
for each. A new architecture is added to the registry and gets these tests for free; each compares the model
with itself under another path that must give the same numbers (cache against recomputation, a padded batch
against each row alone, a reloaded folder against the model that saved it, checkpointed against plain
gradients), so none can pass by construction.

An architecture takes part through its `<arch>-tiny` preset, shrunk to two layers.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from tests.toolkit.models.conventions import assert_checkpointing_keeps_gradients, randomize_norms_and_biases
from toolkit.models import ARCHITECTURES, PRESETS, build_config, register_auto_classes

VOCAB = 512
PAD = 0


def tiny_model(arch: str, attn: str = "sdpa") -> torch.nn.Module:
    preset = f"{arch}-tiny"
    assert preset in PRESETS and PRESETS[preset].arch == arch, (
        f"architecture '{arch}' needs a '{preset}' preset"
    )
    register_auto_classes()
    torch.manual_seed(0)
    config = build_config(preset, vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=PAD)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_norms_and_biases(model)
    return model


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` derives them from the attention mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two prompts of different lengths, left-padded into one batch; also each prompt alone."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,), generator=generator) for n in (9, 5)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask, rows


# The language models: the lattice maps embeddings to embeddings (no tokens, cache or generation) and has its
# own tests (test_lattice.py: save/load, checkpointing, a Trainer step, the batched cells against a loop).
ARCHS = sorted(name for name, arch in ARCHITECTURES.items() if arch.is_language_model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_cache_equals_without(arch, attn):
    """Greedy decoding of a left-padded batch of two: the KV cache must give exactly the tokens that
    recomputing the whole sequence gives, and each row what it gives alone."""
    model = tiny_model(arch, attn)
    ids, mask, rows = left_padded_batch()
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        recomputed = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        alone = [model.generate(input_ids=row[None], use_cache=True, **kwargs)[0, len(row) :] for row in rows]
    assert torch.equal(cached, recomputed)
    for i, row in enumerate(alone):
        assert torch.equal(cached[i, ids.shape[1] :], row), f"row {i} decodes differently in the batch"


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_step_logits_equal_full_forward(arch):
    """One decode step against the cache gives the logits of a full forward pass at that position."""
    model = tiny_model(arch)
    ids, mask, _ = left_padded_batch()
    nxt = torch.randint(1, VOCAB, (ids.shape[0], 1), generator=torch.Generator().manual_seed(2))
    whole_ids, whole_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    whole_positions = positions(whole_mask)
    with torch.no_grad():
        full = model(input_ids=whole_ids, attention_mask=whole_mask, position_ids=whole_positions).logits[
            :, -1
        ]
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        step = model(
            input_ids=nxt,
            attention_mask=whole_mask,
            position_ids=whole_positions[:, -1:],
            use_cache=True,
            **{cache_name(): cache_of(prefill)},
        ).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5, rtol=0), (full - step).abs().max()


def cache_name() -> str:
    """The cache's argument name in the installed transformers (renamed from `past_key_values` in 5.24)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_of(output) -> object:
    cache = getattr(output, cache_name())
    assert cache is not None and cache.get_seq_length() > 0, "use_cache=True returned no cache"
    return cache


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_does_not_change_a_rows_logits(arch):
    model = tiny_model(arch)
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=row[None]).logits[0]
            assert torch.allclose(batch[i, ids.shape[1] - len(row) :], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_through_auto_classes(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == arch
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_score_head_loads_from_the_causal_lm_and_reads_the_last_real_token(arch, tmp_path):
    """A reward model starts from a trained causal LM: the same body weights, a new one-label head, and the
    score of a right-padded row equal to the row's score alone (the head reads the last non-pad token)."""
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    assert ARCHITECTURES[arch].adapter_targets and scorer.config.num_labels == 1
    assert type(scorer).__name__ == type(model).__name__.replace("ForCausalLM", "ForSequenceClassification")
    body = dict(model.base_model.state_dict())
    assert all(torch.equal(t, body[k]) for k, t in scorer.base_model.state_dict().items())
    ids, mask, rows = left_padded_batch()
    right = torch.full_like(ids, PAD)
    for i, row in enumerate(rows):
        right[i, : len(row)] = row
    with torch.no_grad():
        batch = scorer(input_ids=right, attention_mask=(right != PAD).long()).logits[:, 0]
        alone = torch.stack([scorer(input_ids=row[None]).logits[0, 0] for row in rows])
    assert torch.allclose(batch, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_keeps_gradients(arch):
    assert_checkpointing_keeps_gradients(tiny_model(arch, "eager"), VOCAB)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_trainer_step_lowers_the_loss_on_its_batch(arch, tmp_path):
    """`Trainer` trains it unchanged: the loss comes from the model, and a step on a batch lowers it."""
    model = tiny_model(arch).train()
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss
    Trainer(model=model, args=args, train_dataset=rows).train()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(before) and after < before


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_check_gives_a_verdict_for_every_target(arch):
    """`toolkit arch check` answers for the architecture before any training: each export target either
    reached (with what it becomes) or blocked (with the component that blocks it)."""
    from export.check import TARGETS, check

    result = check(arch)
    assert [v.target for v in result.targets] == list(TARGETS)
    assert all(v.detail for v in result.targets)
    assert all(v.name for v in result.targets if v.ok)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_interface_gets_the_callers_keywords_and_unrepeated_heads(arch):
    """Through `ALL_ATTENTION_FUNCTIONS`, each layer's attention module (found by its `layer_idx`) receives the
    keyword arguments given to the model's forward, and keys and values at the config's key/value head count
    (repeated inside the attention function, not before): the contract of serving backends such as vLLM's,
    which route their own state through those keywords and size their KV cache by that count."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs.get("marker"), key.shape[1], value.shape[1]))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording", recording)
    model = tiny_model(arch, attn="sdpa")
    reference = model(input_ids=torch.tensor([[5, 17, 42, 99]])).logits
    model.config._attn_implementation = "recording"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 17, 42, 99]]), marker="from the caller").logits
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    layers = model.config.num_hidden_layers
    # A recursive architecture applies its blocks several times per pass (one cache slot each), in order.
    applications = getattr(model.config, "cache_layers", layers) // layers
    assert seen == [
        (i, "from the caller", kv_heads, kv_heads) for _ in range(applications) for i in range(layers)
    ]
    torch.testing.assert_close(logits, reference)
