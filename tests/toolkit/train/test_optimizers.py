"""`optim: muon` and `grokfast:` change the update exactly as documented (toolkit/train/optimizers.py):
Muon (torch's) on the hidden matrices and AdamW on embeddings, head, norms and biases, as one optimizer;
Grokfast-EMA adds lamb times the gradients' EMA; and a run with both, killed and resumed, ends with the
weights of a run never interrupted (the composite state and the EMA live in the checkpoints)."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from tests.tiny import TINY, head, pretrain_stage, sft_stage, tokenizer_stage, write_recipe
from tests.toolkit.train.test_resume import assert_identical, train, weights
from toolkit.errors import RecipeError
from toolkit.models import build_config, register_auto_classes
from toolkit.train.optimizers import GrokfastCallback, build_muon, muon_options, muon_split


def tiny() -> torch.nn.Module:
    register_auto_classes()
    torch.manual_seed(0)
    config = build_config("decoder-tiny", vocab_size=64, tie_word_embeddings=False, **TINY)
    return AutoModelForCausalLM.from_config(config)


def with_grads(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    return model


def args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, weight_decay=0.1, report_to="none")


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny()
    muon, adamw = muon_split(model)
    linear = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }
    assert set(muon) == linear and muon
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(adamw)
    assert all(dict(model.named_parameters())[n].ndim == 1 for n in adamw if "norm" in n)


def test_one_step_is_torchs_muon_on_matrices_and_adamw_on_the_rest(tmp_path):
    model = tiny()
    reference = with_grads(copy.deepcopy(model), seed=1)  # the same weights, the same gradients
    with_grads(model, seed=1)
    optimizer = build_muon(model, args(tmp_path), muon_options(None))
    optimizer.step()

    params = dict(reference.named_parameters())
    muon_names, adamw_names = muon_split(reference)
    decayed = [n for n in adamw_names if params[n].ndim == 2]  # embeddings, head
    plain = [n for n in adamw_names if params[n].ndim < 2]  # norms (and biases): no weight decay
    torch.optim.Muon(
        [params[n] for n in muon_names], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    ).step()
    torch.optim.AdamW(
        [
            {"params": [params[n] for n in decayed], "weight_decay": 0.1},
            {"params": [params[n] for n in plain]},
        ],
        lr=1e-2,
        weight_decay=0.0,
    ).step()
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n], params[n]) for n in params), [
        n for n in params if not torch.equal(got[n], params[n])
    ]
    # And it is not AdamW's update: the matrices moved by an orthogonalized step.
    adam = with_grads(tiny(), seed=1)
    torch.optim.AdamW(adam.parameters(), lr=1e-2, weight_decay=0.1).step()
    name = muon_names[0]
    assert not torch.allclose(dict(adam.named_parameters())[name], got[name])


def test_the_state_round_trips_and_the_scheduler_reaches_both_halves(tmp_path):
    model = with_grads(tiny(), seed=2)
    optimizer = build_muon(model, args(tmp_path), muon_options("momentum=0.9,nesterov=false"))
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.muon.param_groups[0]["lr"] == optimizer.adamw.param_groups[0]["lr"] == 5e-3
    assert (
        optimizer.muon.param_groups[0]["momentum"] == 0.9 and not optimizer.muon.param_groups[0]["nesterov"]
    )
    state = optimizer.state_dict()
    again = build_muon(tiny(), args(tmp_path), muon_options("momentum=0.9,nesterov=false"))
    again.load_state_dict(state)
    assert again.state_dict()["muon"]["state"].keys() == state["muon"]["state"].keys()
    assert scheduler.get_last_lr()[0] == 5e-3


def test_grokfast_adds_lamb_times_the_ema(tmp_path):
    model = tiny()
    callback = GrokfastCallback(alpha=0.9, lamb=2.0)
    state = type("S", (), {"global_step": 0, "is_world_process_zero": True})()
    g1 = {n: p.grad.clone() for n, p in with_grads(model, seed=3).named_parameters()}
    callback.on_pre_optimizer_step(args(tmp_path), state, None, model=model)
    assert all(torch.allclose(p.grad, 3 * g1[n]) for n, p in model.named_parameters())  # ema = g1
    g2 = {n: p.grad.clone() for n, p in with_grads(model, seed=4).named_parameters()}
    callback.on_pre_optimizer_step(args(tmp_path), state, None, model=model)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, g2[n] + 2.0 * (0.9 * g1[n] + 0.1 * g2[n]), atol=1e-6)
    state.global_step = 5
    callback.on_save(args(tmp_path), state, None)
    resumed = GrokfastCallback(alpha=0.9, lamb=2.0)
    resumed.on_train_begin(args(tmp_path), state, None)
    assert resumed.ema.keys() == callback.ema.keys()
    assert all(torch.equal(resumed.ema[k], callback.ema[k]) for k in callback.ema)


def stage(train: dict):
    return sft_stage(train=train)


def test_bad_optimizer_settings_are_named():
    with pytest.raises(RecipeError) as error:
        stage({"optim": "muonn", "grokfast": {"alpha": 1.0, "lamda": 1}})
    text = str(error.value)
    assert "stages.sft.train.optim is 'muonn'; expected one of 'muon', 'adamw_torch'" in text
    assert "(did you mean 'muon'?)" in text
    assert "unknown key 'lamda' in recipe: stages.sft.train.grokfast (did you mean 'lamb'?)" in text
    assert "stages.sft.train.grokfast: alpha is 1.0; the EMA's decay lies in [0, 1)" in text
    with pytest.raises(RecipeError, match=r"stages.sft.train.optim_args: 'beta' is not an option of Muon"):
        muon_options("beta=0.9", "stages.sft.train")


@pytest.mark.slow
@pytest.mark.integration_test
def test_a_muon_grokfast_run_killed_and_resumed_ends_identical(tmp_path):
    corpus = head("data/corpus/train.jsonl", 120, tmp_path / "corpus.jsonl")
    pretrain = pretrain_stage(
        corpus,
        TINY,
        max_steps=8,
        save_steps=4,
        learning_rate=3e-3,
        optim="muon",
        optim_args="momentum=0.9",
        grokfast={"alpha": 0.9, "lamb": 1.0},
    )
    path = write_recipe(
        tmp_path / "muon.yaml", "muon", tmp_path / "unused", [tokenizer_stage(corpus), pretrain]
    )
    done = train(path, tmp_path / "reference")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = tmp_path / "reference" / "pretrain" / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "grokfast.safetensors").exists()
    assert set(torch.load(checkpoint / "optimizer.pt", weights_only=True)) == {"muon", "adamw"}

    killed = train(path, tmp_path / "run", kill=("step", 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train(path, tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(weights(tmp_path / "run", "pretrain"), weights(tmp_path / "reference", "pretrain"))
