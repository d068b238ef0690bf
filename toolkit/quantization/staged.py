"""Staged BitNet quantization: layer groups made ternary in turn, each followed by continued training and the
stage's evaluation suite, a group that costs too much accuracy kept in full precision.

    model:
      path: runs/quickstart/pretrain/final
      quantization: {method: bitnet, groups: 2, max_drop: 0.10, measure: perplexity, on_drop: fallback}
    train: {max_steps: 150, ...}                     # steps after each group
    eval: {perplexity: data/corpus/valid.jsonl}      # the suite run after each group

The full-precision model is scored first. Then, group by group: its linear layers become BitNet layers
(absmean ternary weights, 8-bit activations, toolkit.quantization.bitnet), the model trains `train.max_steps`
steps with a fresh trainer (its own warm-up and schedule), and is scored again. The relative drop of the
measure from the full-precision score (perplexity and answer NLL: rise; accuracy: fall) is compared with
`max_drop`: within it, the group stays ternary; past it, the model goes back to its state before the group
(weights and layers) and, with `on_drop: fallback`, the next group is tried; with `stop`, the remaining
groups stay in full precision. Every decision, with its figures, is in `<stage>/quantization.json`, whose
final drop the GGUF export's report quotes; each group's drop is logged in `metrics.jsonl` and plotted.

Written here because no library does it: transformers' BitNet integration converts every layer at once,
and Trainer has no notion of a model whose layers change between phases. The evaluation is the stage's own
`eval:` section hook (registered by the eval package), the training the stage's own trainer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import ToolkitError
from toolkit.io import atomic_path, write_text
from toolkit.quantization.bitnet import (
    BitNetOptions,
    _excluded,
    convert_layers,
    plan_layers,
    revert_layers,
    ternary_layer_names,
)

# measure -> (where in the eval hook's result, which input of `eval:` it needs, whether lower is better)
MEASURES: dict[str, tuple[tuple[str, str], str, bool]] = {
    "perplexity": (("perplexity", "perplexity"), "perplexity", True),
    "answer_nll": (("tasks", "answer_nll"), "tasks", True),
    "accuracy": (("tasks", "accuracy"), "tasks", False),
}
ON_DROP = ("fallback", "stop")
BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")
RECORD = "quantization.json"
STATE = "quantization-state.safetensors"


def default_measure(eval_section: dict[str, Any] | None) -> str | None:
    """The measure a staged quantization judges by when the recipe names none: perplexity when the stage's
    `eval:` computes it, else task accuracy."""
    section = eval_section or {}
    return "perplexity" if section.get("perplexity") else "accuracy" if section.get("tasks") else None


def check_options(options: dict[str, Any], eval_section: dict[str, Any] | None, at: str) -> list[str]:
    """What is wrong with a staged quantization's options, given the stage's `eval:` section (empty: nothing)."""
    problems = []
    groups = options.get("groups")
    if groups is None:
        return problems
    flat = isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1
    nested = (
        isinstance(groups, list)
        and groups
        and all(isinstance(g, list) and g and all(isinstance(p, str) and p for p in g) for g in groups)
    )
    if not (flat or nested):
        problems.append(
            f"{at}.groups: give a number of groups (>= 1) or a list of groups, each a list of module names or "
            f"patterns, got {groups!r}"
        )
    drop = options.get("max_drop", 0.10)
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop < 0:
        problems.append(f"{at}.max_drop: give a relative drop >= 0 (0.10 for 10%), got {drop!r}")
    if options.get("on_drop", "fallback") not in ON_DROP:
        problems.append(f"{at}.on_drop: give one of {', '.join(ON_DROP)}, got {options.get('on_drop')!r}")
    measure = options.get("measure") or default_measure(eval_section)
    if measure is None:
        problems.append(
            f"{at}.groups: staged quantization scores the model after each group with the stage's eval: "
            "section; give it `perplexity:` (a text file) or `tasks:` (checkable tasks)"
        )
    elif measure not in MEASURES:
        problems.append(f"{at}.measure: give one of {', '.join(MEASURES)}, got {measure!r}")
    elif not (eval_section or {}).get(MEASURES[measure][1]):
        problems.append(f"{at}.measure: {measure} needs the stage's eval.{MEASURES[measure][1]}")
    return problems


def layer_groups(model: torch.nn.Module, options: BitNetOptions) -> list[list[str]]:
    """The quantizable linear layers (toolkit.quantization.bitnet.plan_layers) in the order they are made
    ternary: `groups: N` splits the model's blocks (layers named `<prefix>.<index>`), in model order, into N
    consecutive groups as evenly as they go (a linear layer outside the blocks, such as cognate's halting head,
    goes with the last group rather than making a group of its own); a list of pattern lists takes the layers
    each group names. A layer no group names stays in full precision."""
    layers, _ = plan_layers(model, options.exclude)
    if isinstance(options.groups, int):
        blocks: dict[str, list[str]] = {}
        loose = []
        for name in layers:
            match = BLOCK.match(name)
            if match:
                blocks.setdefault(match.group(1), []).append(name)
            else:
                loose.append(name)
        if not blocks:  # no numbered blocks at all: each layer is its own unit
            blocks, loose = {name: [name] for name in loose}, []
        if options.groups > len(blocks):
            raise ToolkitError(
                f"model.quantization.groups: {options.groups} groups of {len(blocks)} blocks "
                f"({', '.join(list(blocks)[:4])}, ...); give at most {len(blocks)}"
            )
        names = list(blocks)
        size, extra = divmod(len(names), options.groups)
        groups, start = [], 0
        for index in range(options.groups):
            end = start + size + (index < extra)
            groups.append([layer for block in names[start:end] for layer in blocks[block]])
            start = end
        groups[-1] += loose
        return groups
    groups, taken = [], {}
    for index, patterns in enumerate(options.groups or []):
        group = [name for name in layers if _excluded(name, patterns) and name not in taken]
        if not group:
            raise ToolkitError(
                f"model.quantization.groups[{index}]: {patterns} names no quantizable layer left "
                f"(layers: {', '.join(layers[:6])}, ...)"
            )
        taken.update(dict.fromkeys(group, index))
        groups.append(group)
    return groups


def score(result: dict[str, Any], measure: str) -> float:
    (section, key), _, _ = MEASURES[measure]
    return float(result[section][key])


def relative_drop(measure: str, full_precision: float, value: float) -> float:
    """How much worse `value` is than `full_precision`, relative: perplexity and answer NLL by their rise,
    accuracy by its fall (0 when the full-precision model got none right and this one none either)."""
    lower_is_better = MEASURES[measure][2]
    if lower_is_better:
        return value / full_precision - 1.0
    return (full_precision - value) / full_precision if full_precision > 0 else float(value < full_precision)


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    write_text(folder / RECORD, json.dumps(record, indent=2) + "\n")


def _save_state(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def run_staged(
    model: torch.nn.Module,
    options: BitNetOptions,
    folder: Path,
    evaluate: Callable[[torch.nn.Module], dict[str, Any]],
    train: Callable[[torch.nn.Module, int, int], int],
    log: Callable[[dict[str, Any]], None] = lambda record: None,
    resume: bool = False,
    name: str = "stage",
) -> dict[str, Any]:
    """Quantize `model` (full precision, in place) group by group. `evaluate(model)` is the stage's `eval:`
    result; `train(model, group_index, steps_so_far)` trains one phase and returns its steps; `log` gets each group's
    figures for `metrics.jsonl`. With `resume`, groups that `<folder>/quantization.json` records as decided
    are not run again: their layers and the weights after the last one (kept beside it) are restored."""
    measure = options.measure or "perplexity"
    groups = layer_groups(model, options)
    path = folder / RECORD
    record = json.loads(path.read_text()) if resume and path.exists() else None
    if record is None or record.get("layer_groups") != groups:
        full = evaluate(model)
        record = {
            "measure": measure,
            "max_drop": options.max_drop,
            "on_drop": options.on_drop,
            "layer_groups": groups,
            "full_precision": {"score": score(full, measure), "eval": full},
            "groups": [],
            "steps": 0,
        }
        _write_record(folder, record)
    else:
        for done in record["groups"]:
            if done["ternary"]:
                convert_layers(model, groups[done["index"]])
        if record["groups"]:
            from safetensors.torch import load_model

            load_model(model, str(folder / STATE))
        print(
            f"[{name}] staged quantization: {len(record['groups'])} of {len(groups)} groups already decided"
        )
    base = record["full_precision"]["score"]
    print(
        f"[{name}] staged quantization: {len(groups)} groups; full precision {measure} {base:.4g}", flush=True
    )
    stopped = any(g["decision"] == "stop" for g in record["groups"])
    for index in range(len(record["groups"]), len(groups)):
        group = groups[index]
        if stopped:
            record["groups"].append(
                {"index": index, "layers": len(group), "ternary": False, "decision": "skipped"}
            )
            continue
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        convert_layers(model, group)
        record["steps"] += train(model, index, record["steps"])
        result = evaluate(model)
        value = score(result, measure)
        drop = relative_drop(measure, base, value)
        within = drop <= options.max_drop
        decision = "ternary" if within else options.on_drop
        print(
            f"[{name}] group {index + 1}/{len(groups)} ({len(group)} layers ternary): {measure} {value:.4g}, "
            f"drop {drop:+.1%} (bound {options.max_drop:.0%}): "
            + (
                "kept ternary"
                if within
                else "back to full precision" + (", stopping" if decision == "stop" else "")
            ),
            flush=True,
        )
        if not within:
            revert_layers(model, group)
            model.load_state_dict(before)
            stopped = decision == "stop"
        record["groups"].append(
            {
                "index": index,
                "layers": len(group),
                "ternary": within,
                "decision": decision,
                "score": value,
                "drop": drop,
                "eval": result,
            }
        )
        log({"step": record["steps"], "quantization_drop": drop, "quantized_groups": index + 1})
        _save_state(model, folder / STATE)
        _write_record(folder, record)
    ternary = ternary_layer_names(model)
    if not ternary:
        raise ToolkitError(
            f"[{name}] staged quantization: no group stayed within the {options.max_drop:.0%} {measure} drop "
            f"bound; every layer is still full precision ({folder / RECORD} has each group's figures)"
        )
    kept = [g for g in record["groups"] if g["ternary"]]
    last = kept[-1]
    record["final"] = {"ternary_layers": len(ternary), "score": last["score"], "drop": last["drop"]}
    _write_record(folder, record)
    return record
