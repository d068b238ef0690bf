"""`recipes/agent-forge.yaml` end to end, every phase cut to a few steps, as a user runs it: three
specialisations of one foundation, the evolved merge, thought baking, thought RL, BitNet and the ternary export,
then one markdown report of every phase. The cognate family ends in a Hub folder (cognate has no GGUF), the
decoder family in a TQ2_0 GGUF verified in llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLKIT = str(Path(sys.executable).parent / "toolkit")

pytestmark = pytest.mark.slow

# The header's decoder variant: the same pipeline ending in a ternary GGUF.
DECODER = [
    "stages.foundation.model.preset=decoder-tiny",
    "stages.reasoning.model.config={}",
    "stages.memory.model.config={}",
    "stages.speed.model.config={}",
    "stages.export.export={target: gguf, quant: tq2_0}",
]


def tiny(tmp: Path, out: Path) -> list[str]:
    from tests.tiny import head

    corpus = head("data/corpus/train.jsonl", 300, tmp / "corpus.jsonl")
    valid = head("data/corpus/valid.jsonl", 10, tmp / "valid.jsonl")
    short = "{max_steps: %d, per_device_train_batch_size: 8, max_length: 96, logging_steps: 2}"
    return [
        f"output_dir={out}",
        f"stages.tokenizer.data.sources=[{corpus}]",
        "stages.tokenizer.tokenizer.vocab_size=400",
        f"stages.foundation.data.sources=[{corpus}]",
        f"stages.foundation.train={short % 8}",
        *(f"stages.{s}.train={short % 4}" for s in ("reasoning", "memory", "speed")),
        "stages.diversity.diversity.limit=3",
        "stages.evolve.evolve.generations=1",
        "stages.evolve.evolve.population=4",
        "stages.evolve.evolve.fitness.limit=2",
        f"stages.bake.train={short % 6}",
        "stages.bake.thoughts={check_every: 6, limit: 4, min_steps: 0, max_new_tokens: 24}",
        "stages.bake.eval.limit=4",
        "stages.think.train.max_steps=2",
        "stages.think.train.max_completion_length=24",
        "stages.think.theater={check_every: 2, limit: 2, samples: 2, max_new_tokens: 16}",
        "stages.think.eval.limit=4",
        f"stages.bitnet.train={short % 3}",
        "stages.bitnet.eval.limit=4",
        f"stages.bitnet.eval.perplexity={valid}",
    ]


@pytest.mark.parametrize("family", ["decoder", "cognate"])
def test_the_pipeline_end_to_end(tmp_path, family):
    out = tmp_path / "run"
    overrides = tiny(tmp_path, out) + (DECODER if family == "decoder" else [])
    done = subprocess.run(
        [TOOLKIT, "train", "recipes/agent-forge.yaml", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = (out / "report.md").read_text()
    for phase in (
        "## Cognate",
        "## EvoMerge",
        "## Thought baking",
        "## Thought RL",
        "## BitNet",
        "## Export",
    ):
        assert phase in report
    assert "Pairwise distances" in report or "distance" in report  # the diversity stage's own report
    assert "over the best parent" in report  # the evolution's fitness gain
    assert "thought format accuracy" in report and "anti-theater:" in report
    assert "accuracy change:" in report  # BitNet: held-out accuracy before and after the ternary layers
    config = json.loads((out / "bitnet" / "final" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    exported = json.loads((out / "export" / "eval.json").read_text())
    if family == "decoder":
        assert exported["bitnet"]["ternary_share"] > 0.5 and "compression" in report
        assert exported["verification"]["mean_kl"] < 1e-3
    else:  # cognate: the Hub folder with its modelling files, loaded in a clean process
        assert exported["hf"] and exported.get("remote_code")
