"""The `peft:` section: LoRA's default targets are the linear layers each architecture declares (the same
set PEFT's own "all-linear" finds), DoRA and rsLoRA pass through to PEFT, and a target that matches nothing is
an error naming the layers there are."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.tiny import sft_stage
from toolkit.errors import RecipeError
from toolkit.models import ARCHITECTURES, build_config, register_auto_classes
from toolkit.train.trainer_stage import peft_config


def tiny(arch: str) -> torch.nn.Module:
    register_auto_classes()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(build_config(f"{arch}-tiny", vocab_size=256, num_hidden_layers=2))


def stage(peft: dict):
    return sft_stage(peft=peft)


def adapted(model: torch.nn.Module, config: LoraConfig) -> set[str]:
    wrapped = get_peft_model(model, config)
    return {n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


# The language models: a LoRA of the lattice (an embedding student, its cells batched parameters, not Linear
# layers) is not what `peft:` in a recipe is for.
@pytest.mark.parametrize("arch", sorted(a for a, spec in ARCHITECTURES.items() if spec.is_language_model))
def test_default_targets_are_the_architectures_linear_layers(arch):
    config = peft_config(stage({"method": "lora", "r": 4}), tiny(arch))
    assert sorted(config.target_modules) == sorted(ARCHITECTURES[arch].adapter_targets)
    reference = LoraConfig(r=4, task_type="CAUSAL_LM", target_modules="all-linear")
    assert adapted(tiny(arch), config) == adapted(tiny(arch), reference)


def test_dora_and_rslora_reach_peft():
    config = peft_config(
        stage({"method": "lora", "r": 4, "use_dora": True, "use_rslora": True}), tiny("decoder")
    )
    wrapped = get_peft_model(tiny("decoder"), config)
    layer = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    assert "default" in layer.lora_magnitude_vector  # DoRA's magnitude
    assert layer.scaling["default"] == pytest.approx(config.lora_alpha / 4**0.5)  # rsLoRA: alpha / sqrt(r)


def test_a_target_that_matches_nothing_names_the_layers_there_are():
    with pytest.raises(RecipeError) as error:
        peft_config(stage({"method": "lora", "target_modules": ["q_proj", "v_prj"]}), tiny("codette"))
    assert str(error.value) == (
        "stages.sft.peft.target_modules: 'v_prj' matches no module of CodetteForCausalLM (did you mean 'v_proj'?); "
        "its linear layers: c_fc, c_proj, k_proj, lm_head, o_proj, q_proj, v_proj"
    )
