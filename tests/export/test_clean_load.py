"""The clean-process checks of an exported HF folder catch what would break vLLM while transformers still
loads: checkpoint names without a parameter, and models that break the Transformers backend's contract
(keyword arguments not passed down to attention, positions not read from `position_ids`, a decoder forward
without the arguments vLLM compiles, key/value heads repeated before the attention function)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.clean_load import AttentionLayer, packed_causal_attention
from export.verify_hf import compare, reference, run_clean
from export.vllm import export_vllm
from tests.export.vllm_helpers import make_run

ANY_CLASS = r".*"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def source(run) -> dict:
    return reference(run / "sft" / "final", "float32")


@pytest.fixture(scope="module")
def remote(run, tmp_path_factory) -> Path:
    return export_vllm(run, tmp_path_factory.mktemp("remote") / "out", form="remote-code", verify=False).path


def _edited_copy(folder: Path, tmp_path: Path, old: str, new: str) -> Path:
    """`folder` copied with one edit to its modelling file."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    modeling = copy / "modeling_decoder.py"
    text = modeling.read_text()
    assert old in text, old
    modeling.write_text(text.replace(old, new))
    return copy


def _backend_check(section: dict) -> dict:
    return next(c for c in section["checks"] if c["measure"] == "transformers_backend_max_abs_logit_delta")


def test_intact_folder_passes_every_check(remote, source):
    section = compare(source, run_clean(remote, remote_code=True, transformers_backend=True), ANY_CLASS)
    assert section["ok"], section["checks"]
    assert section["loading_problems"] == [] and section["transformers_backend_error"] is None
    assert section["measures"]["transformers_backend_max_abs_logit_delta"] <= 1e-9


def test_keyword_arguments_must_reach_attention(remote, source, tmp_path):
    edited = _edited_copy(
        remote, tmp_path, "scaling=self.scaling,\n            **kwargs,", "scaling=self.scaling,"
    )
    section = compare(source, run_clean(edited, remote_code=True, transformers_backend=True), ANY_CLASS)
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5  # transformers alone does not notice
    assert not section["ok"] and not _backend_check(section)["ok"]
    assert "attention_instances" in section["transformers_backend_error"]


def test_positions_must_come_from_position_ids(remote, source, tmp_path):
    edited = _edited_copy(
        remote,
        tmp_path,
        "self.rotary_emb(hidden_states, position_ids=position_ids)",
        "self.rotary_emb(hidden_states, position_ids=torch.arange(hidden_states.shape[1])[None])",
    )
    section = compare(source, run_clean(edited, remote_code=True, transformers_backend=True), ANY_CLASS)
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5  # one prompt at a time hides it
    assert section["measures"]["transformers_backend_max_abs_logit_delta"] > 1e-3
    assert not section["ok"]


def test_decoder_forward_must_name_the_compiled_arguments(remote, source, tmp_path):
    """vLLM marks `input_ids`, `inputs_embeds` and `position_ids` of the decoder's forward dynamic for
    compilation and refuses a forward that does not name them, even one that computes the same."""
    wrapper = (
        "\n\n_forward = DecoderModel.forward\n\n\n"
        "def _narrow(self, input_ids=None, attention_mask=None, **kwargs):\n"
        "    return _forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)\n\n\n"
        "DecoderModel.forward = _narrow\n"
    )
    text = (remote / "modeling_decoder.py").read_text()
    edited = _edited_copy(remote, tmp_path, text, text + wrapper)
    section = compare(source, run_clean(edited, remote_code=True, transformers_backend=True), ANY_CLASS)
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    assert section["transformers_backend_error"] == (
        "RuntimeError: DecoderModel.forward lacks inputs_embeds, position_ids"
    )
    assert not section["ok"]


def test_checkpoint_names_must_match_one_to_one(remote, source, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(remote, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    section = compare(source, run_clean(folder, remote_code=True, transformers_backend=True), ANY_CLASS)
    assert section["measures"]["max_abs_logit_delta"] <= 1e-5
    assert section["loading_problems"] == ["unexpected: model.extra.weight"]
    assert "'extra.weight' has no place" in section["transformers_backend_error"]
    assert not section["ok"]


def test_attention_stand_in_keeps_sequences_apart_and_caches():
    """Two sequences packed in one row, then one more token of the first against its cache, equal the
    sequences attended alone; key/value repeated to the query's head count before attention are refused."""

    class Module:
        layer_idx = 0

    step = {"spans": [(0, 0, 3), (1, 3, 5)]}
    layer = AttentionLayer(heads=4, kv_heads=2, head_size=8, sequences=2, step=step)
    query, key, value = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)

    def alone(start: int, end: int) -> torch.Tensor:
        k, v = (x[:, :, start:end].repeat_interleave(2, dim=1) for x in (key, value))
        attended = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], k, v, is_causal=True
        )
        return attended[0].transpose(0, 1).reshape(end - start, -1)

    prefill, _ = packed_causal_attention(
        Module(), query[:, :, :5], key[:, :, :5], value[:, :, :5], None, attention_instances={0: layer}
    )
    assert torch.allclose(prefill[3:], alone(3, 5), atol=1e-6)
    assert torch.allclose(prefill[:3], alone(0, 3), atol=1e-6)
    # The first sequence's fourth token (index 5 of the random tensors) comes in the next step, alone.
    query, key, value = (torch.cat([x[:, :, :3], x[:, :, 5:]], dim=2) for x in (query, key, value))
    step["spans"] = [(0, 0, 1)]
    decode, _ = packed_causal_attention(
        Module(), query[:, :, 3:], key[:, :, 3:], value[:, :, 3:], None, attention_instances={0: layer}
    )
    assert torch.allclose(decode, alone(0, 4)[3:], atol=1e-6)

    repeated = key.repeat_interleave(2, dim=1)
    with pytest.raises(RuntimeError, match="4 query and 4 key/value heads; vLLM allocates 4 and 2"):
        packed_causal_attention(Module(), query, repeated, repeated, None, attention_instances={0: layer})
