"""The optimizers a recipe's `train:` names beyond TrainingArguments' own: `optim: muon` and `grokfast:`.

- `optim: muon` — Muon (momentum, then Newton–Schulz orthogonalization of the update) for the 2-D weight
  matrices of the hidden layers, AdamW for everything Muon is not meant for: embeddings, the LM head (tied or
  not), norms and biases. torch's own `torch.optim.Muon` does the Muon part (torch ≥ 2.9); the two run as one
  optimizer (`MuonAdamW`), so the Trainer's learning-rate schedule, gradient clipping and checkpoints see one
  set of parameter groups and one state. Muon's learning rate is adjusted with `match_rms_adamw` (Moonshot's
  rule) by default, so that the recipe's `learning_rate` and `weight_decay` serve both halves; `optim_args`
  ("momentum=0.9,ns_steps=5,adjust_lr_fn=original,nesterov=false") sets Muon's own.
- `grokfast: {alpha, lamb}` — Grokfast-EMA (Lee et al. 2024): before each optimizer step every gradient g
  becomes g + lamb · ema, with ema ← alpha · ema + (1 - alpha) · g, amplifying its slow component. A Trainer
  callback at `on_pre_optimizer_step` (after gradient clipping, which the Trainer does first); the EMA is
  saved in each checkpoint (`grokfast.safetensors`), so a resumed run continues the same filter.

Neither Trainer nor TRL offers these, hence the code here; the update rules are torch's and the paper's.
"""

from __future__ import annotations

from collections import ChainMap
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from toolkit.errors import RecipeError

MUON_ARGS = {"momentum": float, "nesterov": bool, "ns_steps": int, "eps": float, "adjust_lr_fn": str}
GROKFAST_STATE = "grokfast.safetensors"


def muon_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters Muon takes (2-D matrices of the hidden layers) and of those AdamW
    takes (embeddings, the output head, norms, biases, anything not 2-D)."""
    embedding_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embedding_ids |= {id(p) for p in head.parameters(recurse=False)}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.ndim == 2 and id(p) not in embedding_ids else adamw).append(name)
    return muon, adamw


def muon_options(optim_args: str | None, where: str = "train") -> dict[str, Any]:
    """`optim_args` ("k=v,k=v") as Muon's keyword arguments, each checked and typed."""
    options: dict[str, Any] = {"adjust_lr_fn": "match_rms_adamw"}
    for item in filter(None, (optim_args or "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if key not in MUON_ARGS:
            raise RecipeError(
                f"{where}.optim_args: '{key}' is not an option of Muon (options: {', '.join(MUON_ARGS)})"
            )
        kind = MUON_ARGS[key]
        options[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return options


class MuonAdamW(torch.optim.Optimizer):
    """torch's Muon on the hidden matrices and AdamW on the rest, as one optimizer: its parameter groups are
    the two optimizers' own (the same dicts, so a scheduler's learning rate reaches both), its state both
    states, its step both steps."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        for group in muon.param_groups:
            group["muon"] = True
        for group in adamw.param_groups:
            group["muon"] = False
        # Optimizer.__init__ keeps the group dicts it is given: the inner optimizers' own.
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self.state = ChainMap(muon.state, adamw.state)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def build_muon(model: torch.nn.Module, args: TrainingArguments, options: dict[str, Any]) -> MuonAdamW:
    """The `optim: muon` optimizer for `model` with the run's learning rate, weight decay and Adam betas."""
    if not hasattr(torch.optim, "Muon"):
        raise RecipeError(
            f"train.optim: muon needs torch ≥ 2.9 (torch.optim.Muon); this is {torch.__version__}"
        )
    params = dict(model.named_parameters())
    muon_names, adamw_names = muon_split(model)
    if not muon_names:
        raise RecipeError("optim: muon: the model has no trainable 2-D hidden weights for Muon to take")
    no_decay = {n for n in adamw_names if params[n].ndim < 2 or "norm" in n.lower()}

    def group(names: list[str], decay: float) -> dict[str, Any]:
        return {"params": [params[n] for n in names], "weight_decay": decay}

    muon = torch.optim.Muon(
        [group(muon_names, args.weight_decay)] if muon_names else [],
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        **options,
    )
    adamw_groups = [
        g
        for g in (
            group([n for n in adamw_names if n not in no_decay], args.weight_decay),
            group([n for n in adamw_names if n in no_decay], 0.0),
        )
        if g["params"]
    ]
    adamw = torch.optim.AdamW(
        adamw_groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    return MuonAdamW(muon, adamw)


class MuonFactory:
    """What Trainer's `optimizer_cls_and_kwargs` takes for an optimizer built from the model (Trainer
    calls `MuonFactory()(model, **kwargs)`)."""

    def __call__(self, model: torch.nn.Module, args: TrainingArguments, options: dict[str, Any]) -> MuonAdamW:
        return build_muon(model, args, options)


class GrokfastCallback(TrainerCallback):
    """Grokfast-EMA on every trainable gradient before each optimizer step; the EMA kept in checkpoints."""

    def __init__(self, alpha: float, lamb: float) -> None:
        self.alpha, self.lamb = alpha, lamb
        self.ema: dict[str, torch.Tensor] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A resumed run: the Trainer has read the checkpoint's state, so its step names the checkpoint.
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / GROKFAST_STATE
        if state.global_step and saved.exists():
            from safetensors.torch import load_file

            self.ema = load_file(str(saved))

    @torch.no_grad()
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for name, p in kwargs["model"].named_parameters():
            if p.grad is None:
                continue
            ema = self.ema.get(name)
            if ema is None:
                ema = self.ema[name] = p.grad.detach().clone()  # the filter starts at the first gradient
            else:
                ema.mul_(self.alpha).add_(p.grad, alpha=1 - self.alpha)
            p.grad.add_(ema, alpha=self.lamb)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.ema or not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{GROKFAST_STATE}.tmp"
        save_file({k: v.contiguous().cpu() for k, v in self.ema.items()}, str(tmp))
        tmp.replace(folder / GROKFAST_STATE)
