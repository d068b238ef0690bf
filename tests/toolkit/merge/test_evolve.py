"""`toolkit evolve`: the genetic operators against their definitions, then whole evolutions as users run them
(a fresh process), a kill and `--resume` that ends where an uninterrupted run ends, and CMA-ES."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.toolkit.merge.family import family, tensors
from toolkit.merge.evolve import (
    PAIRS,
    EvolveOptions,
    Genome,
    diversity,
    merge_genomes,
    mutate,
    neutral_genome,
    next_generation,
    recipe_documents,
    starting_combinations,
)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[3]


def genome(seed: int, techniques=("linear", "ties", "dfs"), models: int = 2, layers: int = 3) -> Genome:
    rng = random.Random(seed)
    return neutral_genome(techniques, models, layers).with_vector(
        [rng.random() for _ in range(2 * 3 + 3 * 3)]
    )


def test_the_start_is_the_eight_combinations_one_technique_per_pair():
    combos = starting_combinations()
    assert len(set(combos)) == 8
    for combo in combos:
        assert all(choice in PAIRS[pair] for pair, choice in zip(PAIRS, combo, strict=True))


def test_a_generation_keeps_the_elite_merges_losers_and_stays_in_range():
    options = EvolveOptions(
        models=["a", "b"], base_model="base", population=8, elite=2, fitness={"tasks": "t.jsonl"}
    )
    scored = [(genome(i), float(i)) for i in range(8)]
    children = next_generation(scored, options, random.Random(0))
    assert len(children) == 8
    assert children[:2] == [scored[7][0], scored[6][0]]  # the best two, unchanged
    assert all(0.0 <= v <= 1.0 for child in children for v in child.vector())


def test_random_immigrants_keep_the_population_above_the_diversity_floor():
    options = EvolveOptions(models=["a", "b"], base_model="base", population=8, fitness={"tasks": "t.jsonl"})
    clones = [(genome(1), float(i)) for i in range(8)]
    children = next_generation(clones, options, random.Random(0))
    assert diversity(children) >= 0.3 and children[:2] == [clones[0][0], clones[0][0]]
    off = EvolveOptions(**{**options.__dict__, "diversity_floor": 0.0})
    assert diversity(next_generation(clones, off, random.Random(0))) < 0.3


def test_losers_merge_into_their_mean_and_majority():
    group = [
        genome(1, ("linear", "ties", "dfs")),
        genome(2, ("slerp", "ties", "dfs")),
        genome(3, ("slerp", "dare_ties", "frankenmerge")),
    ]
    child = merge_genomes(group)
    assert (child.interpolate, child.task, child.layers) == ("slerp", "ties", "dfs")
    for value, *column in zip(child.vector(), *(g.vector() for g in group), strict=True):
        assert value == pytest.approx(sum(column) / 3)


def test_diversity_is_zero_for_clones_and_one_for_opposites():
    a = genome(1)
    assert diversity([a, a, a]) == 0.0
    low = neutral_genome(("linear", "ties", "frankenmerge"), 2, 3).with_vector([0.0] * 15)
    high = neutral_genome(("slerp", "dare_ties", "dfs"), 2, 3).with_vector([1.0] * 15)
    assert diversity([low, high]) == 1.0
    assert 0.0 < diversity([genome(i) for i in range(6)]) < 1.0


def test_mutation_moves_genes_within_bounds():
    rng = random.Random(0)
    parent = genome(4)
    children = [mutate(parent, rng, rate=1.0, sigma=0.5) for _ in range(20)]
    assert all(c.vector() != parent.vector() for c in children)
    assert all(0.0 <= v <= 1.0 for c in children for v in c.vector())


def test_a_genome_is_three_mergekit_documents():
    frankenmerge = neutral_genome(("slerp", "dare_ties", "frankenmerge"), 2, 4)
    first, task, final = recipe_documents(frankenmerge, ["a", "b"], "base", 4, "float32")
    assert (first["name"], first["merge_method"], task["merge_method"]) == (
        "interpolate",
        "multislerp",
        "dare_ties",
    )
    assert task["base_model"] == "base" and [m["parameters"]["density"] for m in task["models"]] == [0.5, 0.5]
    # Layers 0-1 from the interpolation, 2-3 from the task merge: two slices, as users write a frankenmerge.
    assert final == {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "interpolate", "layer_range": [0, 2]}]},
            {"sources": [{"model": "task", "layer_range": [2, 4]}]},
        ],
        "dtype": "float32",
    }
    dfs = neutral_genome(("linear", "ties", "dfs"), 2, 2)
    dfs.offset = [0.9, 0.5]
    dfs.scale = [1.0, 0.5]  # the top of the scale range: 1.5
    final = recipe_documents(dfs, ["a", "b"], "base", 2, "float32")[2]
    assert final["merge_method"] == "dfs"
    assert final["slices"] == [
        {"sources": [{"model": "interpolate", "layer_range": [1, 2]}], "parameters": {"scale": 1.5}},
        {"sources": [{"model": "task", "layer_range": [1, 2]}]},
    ]


def evolve_config(tmp_path: Path, folders: list[Path], **options) -> Path:
    base, a, b = folders
    config = {
        "models": [str(a), str(b)],
        "base_model": str(base),
        "generations": 3,
        "population": 4,
        "seed": 3,
        "fitness": {
            "tasks": str(ROOT / "data/eval/heldout.jsonl"),
            "families": ["addition", "copy"],
            "limit": 3,
            "max_new_tokens": 4,
            "perplexity": str(ROOT / "data/corpus/valid.jsonl"),
            "perplexity_limit": 3,
            "weights": {"accuracy": 1.0, "likelihood": 1.0, "perplexity": 1.0},
        },
        **options,
    }
    path = tmp_path / f"evolve-{len(options)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return family(tmp_path_factory.mktemp("family"), "decoder-tiny")


@pytest.fixture(scope="module")
def evolved(models, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evolve")
    done = subprocess.run(
        [str(BIN / "toolkit"), "evolve", str(evolve_config(tmp, models)), "--out", str(tmp / "out")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Fitness gain over the best parent" in done.stdout
    return tmp / "out"


@pytest.mark.slow
def test_an_evolution_records_every_generation_and_saves_a_reproducible_champion(evolved, tmp_path):
    state = json.loads((evolved / "evolve.json").read_text())
    history = state["history"]
    assert [h["generation"] for h in history] == [0, 1, 2]
    assert len(history[0]["combinations"]) == 8 and state["combinations_used"] == sorted(
        f"{a}+{b}+{c}" for a, b, c in starting_combinations()
    )
    assert [h["best"] for h in history] == sorted(h["best"] for h in history)  # the elite is kept
    evaluations = [json.loads(line) for line in (evolved / "evaluations.jsonl").read_text().splitlines()]
    assert len({e["key"] for e in evaluations}) == len(evaluations)  # nothing scored twice
    best = max(evaluations, key=lambda e: e["fitness"])
    assert state["champion"]["key"] == best["key"] and state["champion"]["fitness"] == history[-1]["best"]
    assert (evolved / "plots" / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| champion (" in (evolved / "report.md").read_text()

    # The champion's recipe is an ordinary merge config: `toolkit merge` rebuilds the same weights.
    champion = evolved / "champion"
    assert len(list(yaml.safe_load_all((champion / "merge.yaml").read_text()))) == 3
    done = subprocess.run(
        [str(BIN / "toolkit"), "merge", str(champion / "merge.yaml"), "--out", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    again, saved = tensors(tmp_path / "again"), tensors(champion)
    assert set(again) == set(saved) and all((again[k] == saved[k]).all() for k in again)


@pytest.mark.slow
def test_a_killed_evolution_resumes_to_the_same_end(models, evolved, tmp_path):
    config = evolve_config(tmp_path, models)
    out = tmp_path / "out"
    command = [str(BIN / "toolkit"), "evolve", str(config), "--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    evaluations = out / "evaluations.jsonl"
    deadline = time.monotonic() + 600
    # Killed in generation 1: after the 8 starting combinations and one more candidate were scored.
    while time.monotonic() < deadline and process.poll() is None:
        if evaluations.exists() and len(evaluations.read_text().splitlines()) >= 9:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    state = json.loads((out / "evolve.json").read_text())
    assert len(state["history"]) < 3 and "champion" not in state

    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume continues it" in refused.stderr
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, reference = (
        json.loads((out / "evolve.json").read_text()),
        json.loads((evolved / "evolve.json").read_text()),
    )
    for key in ("best", "mean", "diversity", "best_key", "combinations"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in reference["history"]], key
    assert resumed["champion"]["key"] == reference["champion"]["key"]


@pytest.mark.slow
def test_cma_es_searches_the_genes_of_the_best_starting_combination(models, tmp_path):
    out = tmp_path / "out"
    config = evolve_config(tmp_path, models, strategy="cma", generations=2)
    done = subprocess.run(
        [str(BIN / "toolkit"), "evolve", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "evolve.json").read_text())
    assert len(state["history"]) == 2 and (out / "cma.pickle").exists()
    template = state["cma_template"]
    combination = f"{template['interpolate']}+{template['task']}+{template['layers']}"
    assert combination == state["initial_best"]["combination"]
    assert state["history"][1]["combinations"] == [combination]  # CMA-ES moves genes, not techniques


def test_bad_options_name_the_key():
    from toolkit.errors import ToolkitError
    from toolkit.merge.evolve import parse_options

    with pytest.raises(
        ToolkitError, match=r"unknown key 'generation' in evolve.yaml \(did you mean 'generations'\?\)"
    ):
        parse_options(
            {"models": ["a", "b"], "base_model": "c", "generation": 3, "fitness": {"tasks": "t"}},
            "evolve.yaml",
        )
    with pytest.raises(ToolkitError, match="strategy 'cmaes' \\(did you mean 'cma'\\?\\)"):
        parse_options(
            {"models": ["a", "b"], "base_model": "c", "strategy": "cmaes", "fitness": {"tasks": "t"}}, "e"
        )
    with pytest.raises(ToolkitError, match="models: two or more"):
        parse_options({"models": ["a"], "base_model": "c", "fitness": {"tasks": "t"}}, "e")
