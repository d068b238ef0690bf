"""Export plans name only GGUF keys and tensors that gguf-py (and so llama.cpp) defines for their arch."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from toolkit.errors import ExportError
from toolkit.models.plans import get_plan, load_plans, permute_k

PLANS = load_plans()  # every architecture's export plan, loaded now

ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def _known_keys() -> set[str]:
    groups = [getattr(gguf.Keys, g) for g in dir(gguf.Keys) if not g.startswith("_")]
    return {
        getattr(g, k)
        for g in groups
        for k in dir(g)
        if not k.startswith("_") and isinstance(getattr(g, k), str)
    }


@pytest.mark.parametrize("model_type", sorted(name for name, plan in PLANS.items() if plan.gguf))
def test_plan_names_exist_in_gguf(model_type):
    plan = get_plan(model_type).gguf
    arch = ARCH_BY_NAME[plan.arch]
    known = _known_keys()
    assert all(h.key in known for h in plan.hparams), [h.key for h in plan.hparams if h.key not in known]
    tensor_names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for rule in plan.tensors:
        base = rule.target.rsplit(".", 1)[0]  # drop .weight / .bias
        assert base in tensor_names, f"{rule.target} is not a {plan.arch} tensor"


def test_decoder_uses_the_llama_graph():
    assert get_plan("decoder").gguf.arch == "llama"
    with pytest.raises(
        ExportError,
        match="architectures with one: bitnet, codette, cognate, decoder, gemma3_text, lattice, llama, ministral3, mistral, olmo2, phi3, prometheus, qwen2, qwen3, smollm3",
    ):
        get_plan("gpt_neox")


def test_rope_permutation_interleaves_the_halves_of_each_head():
    # 2 kv heads of width 4: HF rows (h0: 0 1 | 2 3) become llama.cpp's pairs (0 2 1 3).
    rows = np.arange(8, dtype=np.float32)[:, None]
    permuted = permute_k(rows, {"num_attention_heads": 4, "num_key_value_heads": 2})
    assert permuted[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
