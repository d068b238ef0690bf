"""`lattice`: the batched cells equal a cell-by-cell loop, gradients reach every cell, and it is a transformers
model (Auto classes, save/load, Trainer) that is not a language model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, Trainer, TrainingArguments

from toolkit.models import ARCHITECTURES, build_config, count_parameters, register_auto_classes


def lattice(dtype=torch.float32, **overrides):
    register_auto_classes()
    torch.manual_seed(0)
    model = AutoModel.from_config(build_config("lattice-tiny", **overrides)).to(dtype)
    with torch.no_grad():  # random spatial gates and norms: the identity start would hide a wrong mixing
        for layer in model.layers:
            layer.spatial_weight.normal_(0, 0.3)
            layer.spatial_bias.normal_(1, 0.3)
            layer.gate_norm_weight.normal_(1, 0.3)
            layer.norm_bias.normal_(0, 0.3)
    return model


@pytest.mark.parametrize(
    "shape", [dict(height=4, width=5, depth=3), dict(height=3, width=3, depth=2, neighbourhood=5)]
)
def test_batched_cells_equal_a_cell_by_cell_loop(shape):
    model = lattice(torch.float64, **shape).eval()
    surface = torch.randn(3, model.config.cells_per_layer, dtype=torch.float64)
    with torch.no_grad():
        batched = model.propagate(surface)
        looped = model.propagate(surface, per_cell=True)
    assert len(batched) == model.config.depth + 1
    for a, b in zip(batched, looped, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(batched[-1], batched[-2])  # the layers do something


def test_gradients_reach_every_cell():
    model = lattice()
    q, a = torch.randn(4, 64), torch.randn(4, 64)
    model(q, a).loss.backward()
    cells = model.config.cells_per_layer
    for layer in model.layers:
        for name in ("up_weight", "down_weight", "spatial_weight", "memory", "gate_norm_weight"):
            grad = getattr(layer, name).grad
            reached = grad.reshape(cells, -1).abs().sum(-1) > 0
            assert bool(reached.all()), (
                f"layer {layer.layer_idx} {name}: cells {(~reached).nonzero().flatten().tolist()}"
            )
    assert bool((model.input_weight.grad.abs().sum(-1) > 0).all())
    assert bool((model.read_weight.grad.abs().sum(-1) > 0).all())


def test_parameter_count_is_cells_plus_adapter_and_decoder():
    config = build_config("lattice-15x15x11")
    assert config.cells == 2475
    adapter = (4096 * 8192 + 8192 + 2 * 8192) + (8192 * 1472 + 1472 + 2 * 1472) + (1472 * 225 + 225)
    decoder = 225 * 4096 + 4096
    surfaces = 2 * 225 * 32 + 225 * 32 + 225
    assert (
        count_parameters(config) == config.cells * config.parameters_per_cell + adapter + decoder + surfaces
    )
    assert adapter == pytest.approx(45.9e6, rel=0.01)  # the seed's universal adapter


def test_save_load_and_a_trainer_step(tmp_path):
    model = lattice()
    assert not ARCHITECTURES["lattice"].is_language_model
    q, a = torch.randn(8, 64), torch.randn(8, 64)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(q).predicted_embedding, model.eval()(q).predicted_embedding)

    rows = [{"question_embeddings": q[i], "answer_embeddings": a[i]} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to="none", use_cpu=True, logging_steps=1, remove_unused_columns=False,
    )  # fmt: skip
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("layers.") for n in moved) and any(n.startswith("adapter.") for n in moved)
    assert set(model.pop_loss_parts()) <= set(model.LOSS_PARTS)


def test_gradient_checkpointing_gives_the_same_gradients():
    q, a = torch.randn(4, 64), torch.randn(4, 64)
    grads = []
    for checkpointing in (False, True):
        model = lattice().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.layers)
        model(q, a).loss.backward()
        grads.append(model.layers[0].up_weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
