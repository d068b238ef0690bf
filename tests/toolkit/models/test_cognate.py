"""`cognate` beyond the conformance suite: the recursion is real, the memory computes the formula it cites, the
cache holds with a short window, halting learns to stop early, and the loss parts reach the training log."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from tests.toolkit.models.conventions import randomize_norms_and_biases
from toolkit.models import build_config, count_parameters, register_auto_classes

VOCAB = 64


def cognate(**overrides) -> torch.nn.Module:
    register_auto_classes()
    torch.manual_seed(0)
    config = build_config("cognate-tiny", vocab_size=VOCAB, pad_token_id=0, **overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_norms_and_biases(model)
    return model


def test_more_steps_change_the_answer_and_every_application_uses_the_same_blocks():
    model = cognate(supervision_steps=3)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    calls = []
    hooks = [
        layer.register_forward_hook(lambda m, *_: calls.append(m.layer_idx)) for layer in model.model.layers
    ]
    with torch.no_grad():
        by_steps = [model(ids, steps=n).logits for n in (1, 2, 3)]
    for hook in hooks:
        hook.remove()
    config = model.config
    # Each step runs h_cycles x (l_cycles + 1) passes through the same two blocks.
    assert calls == [0, 1] * (config.applications_per_step * (1 + 2 + 3))
    assert not torch.allclose(by_steps[0], by_steps[1]) and not torch.allclose(by_steps[1], by_steps[2])
    assert torch.equal(by_steps[2], model(ids).logits)  # supervision_steps is the default

    # More recursion adds no parameter: the same tensors, by name and count.
    deeper = build_config("cognate-tiny", vocab_size=VOCAB, h_cycles=4, l_cycles=5, supervision_steps=6)
    assert count_parameters(deeper) == count_parameters(config)
    again = AutoModelForCausalLM.from_config(deeper)
    assert again.state_dict().keys() == model.state_dict().keys()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(again.eval()(ids, steps=1).logits, by_steps[0])  # more cycles per step


def test_only_the_last_cycle_of_a_step_gets_gradients():
    """TRM: the earlier cycles of a step run without gradients, so a weight used only there gets none. With
    one step of two cycles, the second cycle's gradients equal those of a model whose first cycle's output is
    handed in as a constant."""
    model = cognate(supervision_steps=1, h_cycles=2, deep_supervision_weight=0.0)
    model.train()
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    one_cycle = cognate(supervision_steps=1, h_cycles=1, deep_supervision_weight=0.0)
    one_cycle.load_state_dict(model.state_dict())
    one_cycle.train()
    core = model.model
    with torch.no_grad():  # the first cycle, as the two-cycle model runs it
        x = core.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        blocks = dict(position_ids=positions, position_embeddings=core.rotary_emb(x, positions))
        start = (core.y_init.expand_as(x), core.z_init.expand_as(x))
        y0, z0, _ = core._cycle(x, *start, 0, core.write_memories(x), **blocks)
    one_cycle.model.y_init = y0  # broadcastable starting carry: (batch, seq, hidden)
    one_cycle.model.z_init = z0
    one_cycle(ids, labels=ids).loss.backward()
    for name, p in one_cycle.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5)


def memory_in_numpy(module, x: np.ndarray, h: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Titans' linear memory as the module docstring of modeling_cognate.py writes it, one token at a time:
    written from the input stream `x`, read with queries from the block state `h`."""

    def weight(linear):
        return linear.weight.detach().double().numpy()

    heads, dim = module.heads, module.dim
    batch, length, _ = x.shape
    eps, gain = module.norm.variance_epsilon, module.norm.weight.detach().double().numpy()
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * gain  # the memory's RMSNorm

    def per_head(inputs, w):
        return (inputs @ w.T).reshape(batch, length, heads, dim)

    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    k, v = unit(per_head(x, weight(module.k_proj))), per_head(x, weight(module.v_proj))
    q = unit(per_head(h, weight(module.q_proj)))
    rates = 1 / (1 + np.exp(-(x @ weight(module.rates).T + module.rates.bias.detach().double().numpy())))
    theta, eta, alpha = rates.reshape(batch, length, 3, heads).transpose(2, 0, 1, 3)
    theta = theta * module.max_lr
    reads = np.zeros((batch, length, heads, dim))
    final = np.zeros((batch, heads, dim, dim))
    for b in range(batch):
        for j in range(heads):
            memory, surprise = np.zeros((dim, dim)), np.zeros((dim, dim))
            for t in range(length):
                if mask[b, t]:
                    gradient = np.outer(memory @ k[b, t, j] - v[b, t, j], k[b, t, j])  # d/dM 1/2||Mk - v||^2
                    surprise = eta[b, t, j] * surprise - theta[b, t, j] * gradient
                    memory = (1 - alpha[b, t, j]) * memory + surprise
                reads[b, t, j] = memory @ q[b, t, j]
            final[b, j] = memory
    out = reads.reshape(batch, length, heads * dim) @ weight(module.o_proj).T
    return out, final


def test_memory_write_and_read_match_the_formula_in_numpy():
    model = cognate().double()
    module = model.model.layers[0].memory
    with torch.no_grad():
        module.rates.bias.normal_(0, 1)  # rates away from their initial values
    generator = torch.Generator().manual_seed(3)
    x, h = (
        torch.randn(2, 7, model.config.hidden_size, generator=generator, dtype=torch.float64) for _ in "xh"
    )
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False  # left padding: no write, no momentum
    with torch.no_grad():
        memories, (memory, _) = module.write(x, mask)
        out = module.read(h, memories)
    expected, final = memory_in_numpy(module, x.numpy(), h.numpy(), mask.numpy())
    # The RMSNorm computes in float32 whatever the dtype (as Llama's does): 1e-9 here, the rest float64.
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(memory.numpy(), final, atol=1e-7)


@pytest.mark.parametrize("memory_heads", [4, 0])
def test_cache_equals_recomputation_with_a_window_shorter_than_the_text(memory_heads):
    """A 4-token window over 20-token texts: the cached keys are trimmed to the window and the memory state
    travels in the cache; greedy tokens and the last logits match recomputing everything."""
    model = cognate(sliding_window=4, memory_heads=memory_heads)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (2, 14), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # left padding
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        recomputed = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        alone = model.generate(input_ids=ids[1:, 5:], use_cache=True, **kwargs)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[1, 14:], alone[0, 9:])


def test_the_window_limits_attention_when_the_memory_is_off():
    """Without memory, a token further back than every application's window together cannot matter."""
    model = cognate(sliding_window=2, memory_heads=0, supervision_steps=1, h_cycles=1, l_cycles=1)
    reach = model.config.cache_layers * (model.config.sliding_window - 1)  # each application sees 1 back
    ids = torch.randint(1, VOCAB, (1, reach + 3), generator=torch.Generator().manual_seed(5))
    changed_far, changed_near = ids.clone(), ids.clone()
    changed_far[0, 0] = (ids[0, 0] % (VOCAB - 1)) + 1
    changed_near[0, -2] = (ids[0, -2] % (VOCAB - 1)) + 1
    with torch.no_grad():
        base, far, near = (model(t).logits[0, -1] for t in (ids, changed_far, changed_near))
    assert torch.equal(base, far)
    assert not torch.allclose(base, near)


def toy_batch(generator: torch.Generator, rows: int = 16, length: int = 12) -> torch.Tensor:
    """Half the rows repeat one token (1-8): easy, right after one step. Half are random tokens 9-63."""
    easy = torch.randint(1, 9, (rows // 2, 1), generator=generator).expand(-1, length)
    hard = torch.randint(9, VOCAB, (rows - rows // 2, length), generator=generator)
    return torch.cat([easy, hard])


STEPS = 100


def test_halting_learns_to_stop_early_on_easy_input():
    model = cognate(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        memory_heads=0,
        supervision_steps=3,
        h_cycles=1,
        l_cycles=1,
        halting_loss_weight=1.0,
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(6)
    for _ in range(STEPS):
        ids = toy_batch(generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.config.halting = "adaptive"
    easy = torch.full((1, 12), 3)
    hard = torch.randint(9, VOCAB, (1, 12), generator=generator)
    with torch.no_grad():
        steps = [int(model(ids).halting_steps[0]) for ids in (easy, hard)]
        cache_run = model(easy, use_cache=True)
    assert steps == [1, 3]
    # A cache keeps the step count of its first call: one step's slots only.
    config = model.config
    assert len(
        cache_run.cache.layers if hasattr(cache_run, "cache") else cache_run.past_key_values.layers
    ) == (config.applications_per_step * config.num_hidden_layers)


def test_loss_parts_add_up_and_reach_the_training_log(tmp_path):
    from toolkit.train.callbacks import MetricsCallback, ModelLogCallback

    model = cognate(supervision_steps=2)
    ids = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(ids, labels=ids)
    c = model.config
    total = (
        out.lm_loss
        + c.deep_supervision_weight * out.deep_supervision_loss
        + c.halting_loss_weight * out.halting_loss
        + c.ponder_cost_weight * out.ponder_cost
    )
    torch.testing.assert_close(out.loss, total)
    assert not torch.isclose(out.lm_loss, out.deep_supervision_loss)  # two steps, two different answers
    assert 1 / c.supervision_steps <= float(out.ponder_cost) <= 1  # expected steps over the most steps

    metrics = tmp_path / "metrics.jsonl"
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    rows = [{"input_ids": row, "labels": row} for row in ids]
    Trainer(
        model=model.train(),
        args=args,
        train_dataset=rows,
        callbacks=[ModelLogCallback(), MetricsCallback(metrics)],
    ).train()
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert {"lm_loss", "deep_supervision_loss", "halting_loss", "ponder_cost", "halting_steps"} <= set(
            record
        )
        assert record["halting_steps"] == c.supervision_steps  # training runs every step


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_trl_trains_it_unchanged(method, tmp_path):
    """TRL's preference and online-RL trainers take the model as it is: a DPO step on pairs, a GRPO step
    that generates with it (KV cache, adaptive halting off) and scores the completions."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from tests.export.conftest import save_preset_model

    folder = save_preset_model("cognate-tiny", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    common = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = [{"prompt": "Say yes.", "chosen": " yes", "rejected": " no"}] * 4
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**common, max_length=32),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    else:
        from trl import GRPOConfig, GRPOTrainer

        def reward(completions, **kwargs):
            return [float(len(c)) for c in completions]

        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=GRPOConfig(**common, num_generations=2, max_completion_length=4, beta=0.0),
            train_dataset=Dataset.from_list([{"prompt": "Count: 1 2 3"}] * 4),
            processing_class=tokenizer,
        )
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.halt_head.weight" not in changed


def test_the_memory_specialisation_starts_its_gates_on_the_memory_side():
    """memory_gate_bias sets where the MAG gates start: sigmoid(-2) = 0.12 of each block's mixing from
    attention, so the memory carries most of it (memory_use near 0.88) before any training."""
    register_auto_classes()
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    uses = {}
    for bias in (0.0, -2.0):
        torch.manual_seed(0)
        config = build_config("cognate-tiny", vocab_size=VOCAB, pad_token_id=0, memory_gate_bias=bias)
        model = AutoModelForCausalLM.from_config(config).eval()
        assert all(torch.all(layer.memory_gate.bias == bias) for layer in model.model.layers)
        with torch.no_grad():
            model(ids)
        uses[bias] = sum(layer.memory_use for layer in model.model.layers) / len(model.model.layers)
    assert uses[0.0] == pytest.approx(0.5, abs=0.05) and uses[-2.0] == pytest.approx(0.88, abs=0.05)
    assert build_config("cognate-tiny-memory").memory_gate_bias == -2.0
