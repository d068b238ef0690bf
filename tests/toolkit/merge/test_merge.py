"""`toolkit merge` against mergekit's own commands on the same configs.

The reference for the toolkit's architectures is mergekit-multi (mergekit's CLI, every config of the
list in one process) run on the remote-code exports of the same models, which mergekit loads with
`--trust-remote-code` and describes by its own inference; for Hub families it is mergekit on the very same
folders (its llama.json). Equal means equal tensors (to 1e-6) under the same names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.toolkit.merge.family import LAYERS, family, llama_family, remote_code, tensors
from toolkit.errors import ToolkitError
from toolkit.merge.run import merge_documents

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Every deterministic method of mergekit 0.1.5 that takes two models (and a base), and DARE with a seed.
METHODS = {
    "linear": lambda a, b, base: {
        "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}]
    },
    "slerp": lambda a, b, base: {
        "base_model": a,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"t": 0.3},
    },
    "multislerp": lambda a, b, base: {
        "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.3}}]
    },
    "nuslerp": lambda a, b, base: {
        "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]
    },
    "karcher": lambda a, b, base: {"models": [{"model": a}, {"model": b}]},
    "task_arithmetic": lambda a, b, base: {
        "base_model": base,
        "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.5}}],
    },
    "ties": lambda a, b, base: {
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": b, "parameters": {"weight": 0.4, "density": 0.7}},
        ],
    },
    "breadcrumbs": lambda a, b, base: {
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
        ],
    },
    "model_stock": lambda a, b, base: {"base_model": base, "models": [{"model": a}, {"model": b}]},
    "sce": lambda a, b, base: {
        "base_model": base,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"select_topk": 0.5},
    },
    "dare_ties": lambda a, b, base: {
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.6}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.6}},
        ],
    },
    "della": lambda a, b, base: {
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}},
        ],
    },
}
PASSTHROUGH = lambda a, b, base: {  # noqa: E731 - one more row of the table above
    "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [1, 3]}]},
    ]
}
SEED = 7


def config(method: str, a: Path, b: Path, base: Path) -> dict:
    build = PASSTHROUGH if method == "passthrough" else METHODS[method]
    return {"merge_method": method, **build(str(a), str(b), str(base)), "dtype": "float32"}


def mergekit_reference(folders: list[Path], methods: list[str], out: Path) -> dict[str, Path]:
    """Each method's merge by mergekit-multi (one named document per method), in a fresh process."""
    base, a, b = folders
    # Named after the method with a prefix: mergekit-multi takes any string equal to a merge's name for a
    # reference to it, `merge_method: linear` included.
    documents = [{"name": f"by-{m}", **config(m, a, b, base)} for m in methods]
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    command = [str(BIN / "mergekit-multi"), str(path), "-I", str(out), "--trust-remote-code"]
    done = subprocess.run([*command, "--random-seed", str(SEED)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {m: out / f"by-{m}" for m in methods}


def assert_same_tensors(ours: Path, reference: Path) -> None:
    mine, theirs = tensors(ours), tensors(reference)
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-6, rtol=0, msg=name)


# Methods compared for every architecture (passthrough has its own test: mergekit's inference of an unknown
# architecture puts the final norm before the layers, so that reference is wrong for slices).
COMPARED = [m for m in METHODS]


@pytest.mark.parametrize("preset", ["decoder-tiny", "prometheus-tiny", "codette-tiny"])
def test_every_method_equals_mergekits_own_on_each_architecture(preset, tmp_path):
    ours_in = family(tmp_path, preset)
    reference = mergekit_reference(remote_code(ours_in), COMPARED, tmp_path / "reference")
    base, a, b = ours_in
    for method in COMPARED:
        report = merge_documents([config(method, a, b, base)], tmp_path / method, seed=SEED)
        assert report.layers == LAYERS
        assert_same_tensors(tmp_path / method, reference[method])


def test_llama_pair_equals_mergekit_including_slices_and_dare(tmp_path):
    folders = llama_family(tmp_path)
    methods = ["linear", "slerp", "ties", "dare_ties", "della", "passthrough"]
    reference = mergekit_reference(folders, methods, tmp_path / "reference")
    base, a, b = folders
    for method in methods:
        merge_documents([config(method, a, b, base)], tmp_path / method, seed=SEED)
        assert_same_tensors(tmp_path / method, reference[method])
    assert json.loads((tmp_path / "passthrough" / "config.json").read_text())["num_hidden_layers"] == 4


def test_slices_of_our_architectures_take_each_layer_from_its_source(tmp_path):
    """passthrough on the toolkit's declaration: embeddings from the first slice's model, layers in slice
    order, final norm from the last slice's model (as mergekit's own definitions do), and the config's layer
    count rewritten."""
    base, a, b = family(tmp_path, "decoder-tiny")
    merge_documents([config("passthrough", a, b, base)], tmp_path / "out")
    out, first, second = tensors(tmp_path / "out"), tensors(a), tensors(b)
    expected = {"model.embed_tokens.weight": first["model.embed_tokens.weight"]}
    expected["model.norm.weight"] = second["model.norm.weight"]
    for position, (source, layer) in enumerate([(first, 0), (first, 1), (second, 1), (second, 2)]):
        for name, tensor in source.items():
            if name.startswith(f"model.layers.{layer}."):
                expected[name.replace(f"layers.{layer}.", f"layers.{position}.", 1)] = tensor
    assert set(out) == set(expected)
    for name, tensor in out.items():
        assert torch.equal(tensor, expected[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.parametrize("preset", ["decoder-tiny", "prometheus-tiny", "codette-tiny", "llama"])
def test_dfs_equals_the_layer_path_with_scaled_inputs(preset, tmp_path):
    """A dfs merge computes what the passthrough of the same path computes when each layer's input is
    multiplied by its scale (forward pre-hooks on mergekit's own passthrough merge)."""
    from transformers import AutoModelForCausalLM

    from toolkit.merge.architectures import layer_stack
    from toolkit.models import register_auto_classes

    register_auto_classes()
    _, a, b = llama_family(tmp_path) if preset == "llama" else family(tmp_path, preset)
    slices = [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3]}], "parameters": {"scale": [0.7, 1.4]}},
        {"sources": [{"model": str(a), "layer_range": [1, 2]}], "parameters": {"scale": 2.0}},
    ]
    scales = [1.0, 1.0, 0.7, 1.4, 2.0]
    report = merge_documents(
        [{"merge_method": "dfs", "slices": slices, "dtype": "float32"}], tmp_path / "dfs"
    )
    assert report.mergekit_method == "passthrough" and report.layers == 5
    plain = [{"sources": s["sources"]} for s in slices]
    merge_documents([{"merge_method": "passthrough", "slices": plain, "dtype": "float32"}], tmp_path / "path")

    dfs = AutoModelForCausalLM.from_pretrained(tmp_path / "dfs").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "path").eval()
    for layer, scale in zip(layer_stack(reference)[1], scales, strict=True):

        def scaled(module, args, kwargs, scale=scale):
            if args:
                return (args[0] * scale, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

        layer.register_forward_pre_hook(scaled, with_kwargs=True)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = dfs(ids).logits, reference(ids).logits
        unscaled = AutoModelForCausalLM.from_pretrained(tmp_path / "path").eval()(ids).logits
    # Equal up to the norms' epsilon, which a scaled input sees slightly differently.
    assert (got - expected).abs().max() < 2e-3 * expected.abs().max()
    assert (got - unscaled).abs().max() > 0.05 * expected.abs().max()  # the scales matter


def test_the_command_writes_a_whole_folder_that_exports_to_gguf(tmp_path):
    """As users run it: `toolkit merge CONFIG --out DIR`, then `toolkit export gguf DIR` (verified in
    llama.cpp). The folder has the tokenizer, the chat template of the inputs, the card and the report."""
    base, a, b = family(tmp_path, "decoder-tiny")
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(config("ties", a, b, base)))
    done = subprocess.run(
        [str(BIN / "toolkit"), "merge", str(path), "--out", str(tmp_path / "merged"), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    merged = tmp_path / "merged"
    assert json.loads((merged / "merge_report.json").read_text())["versions"]["mergekit"] == "0.1.5"
    assert report["method"] == "ties" and {i["reference"] for i in report["inputs"]} == {
        str(base),
        str(a),
        str(b),
    }
    assert (merged / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()
    card = (merged / "README.md").read_text()
    assert "mergekit" in card and "ties" in card and "density: 0.5" in card
    exported = subprocess.run(
        [
            str(BIN / "toolkit"),
            "export",
            "gguf",
            str(merged),
            "--quant",
            "f32",
            "--out",
            str(tmp_path / "m.gguf"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    verification = json.loads((tmp_path / "m.gguf.report.json").read_text())
    assert verification["ok"] is True


def test_different_vocabularies_merge_by_union_with_every_row_accounted_for(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import register_auto_classes

    register_auto_classes()
    base, a, b = family(tmp_path, "decoder-tiny")
    tokenizer = AutoTokenizer.from_pretrained(b)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(b)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-2:].normal_(0, 1)
    grown = tmp_path / "grown"
    model.save_pretrained(grown)
    tokenizer.save_pretrained(grown)

    plain = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(grown)}]}
    with pytest.raises(ToolkitError, match=r"tensor model\.embed_tokens\.weight: .* set tokenizer_source"):
        merge_documents([plain], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    report = merge_documents(
        [
            {
                **plain,
                "merge_method": "ties",
                "base_model": str(base),
                "tokenizer_source": "union",
                "parameters": {"density": 0.5, "weight": 0.5},
            }
        ],
        tmp_path / "union",
    )
    size = len(tokenizer)
    assert report.vocabulary["tokens"] == report.vocabulary["embedding_rows"] == size
    assert report.vocabulary["config_vocab_size"] == size
    rows = report.vocabulary["rows"]
    assert rows["merged from every input"] == size - 2
    assert rows["from one input only"] == {str(grown): {"count": 2, "tokens": ["<think>", "</think>"]}}
    merged, source = tensors(tmp_path / "union"), tensors(grown)
    union = AutoTokenizer.from_pretrained(tmp_path / "union")
    for token in ("<think>", "</think>"):
        row = merged["model.embed_tokens.weight"][union.convert_tokens_to_ids(token)]
        assert torch.equal(row, source["model.embed_tokens.weight"][tokenizer.convert_tokens_to_ids(token)])


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    base, a, b = family(tmp_path, "decoder-tiny")
    other = family(tmp_path / "p", "prometheus-tiny", variants=0)[0]
    wide_dir = tmp_path / "wide"
    wide_dir.mkdir()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.export.vllm_helpers import preset_config

    tokenizer = AutoTokenizer.from_pretrained(a)
    wide = AutoModelForCausalLM.from_config(preset_config("decoder-tiny", tokenizer, LAYERS, hidden_size=96))
    wide.save_pretrained(wide_dir)
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    for file in a.iterdir():
        (quantized / file.name).write_bytes(file.read_bytes())
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(cfg))

    def refused(document: dict, message: str) -> None:
        with pytest.raises(ToolkitError, match=message):
            merge_documents([document], tmp_path / "out")
        assert not (tmp_path / "out").exists()

    two = [{"model": str(a)}, {"model": str(b)}]
    refused({"merge_method": "tie", "models": two}, r"unknown method 'tie' \(did you mean 'ties'\?\)")
    refused(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"densty": 0.5}}],
        },
        r"unknown key 'densty' in models\[0\]\.parameters \(did you mean 'density'\?\); ties takes density",
    )
    refused(
        {"merge_method": "linear", "models": two, "tokenizer_sorce": "union"},
        r"unknown key 'tokenizer_sorce' in the merge config \(did you mean 'tokenizer_source'\?\)",
    )
    refused(
        {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(tmp_path / "nowhere")}]},
        rf"models\[1\]\.model: {tmp_path / 'nowhere'}: no such folder",
    )
    refused(
        {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(wide_dir)}]},
        r"tensor model\.embed_tokens\.weight: .* has shape \[\d+, (96|256)\], .* has \[\d+, (96|256)\]",
    )
    refused(
        {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(other)}]},
        "different architectures",
    )
    refused(
        {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(quantized)}]},
        r"stored quantized \(bitsandbytes\).*toolkit merge-adapter ADAPTER --base FULL_PRECISION_BASE",
    )
    refused(
        {
            "merge_method": "dfs",
            "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}], "parameters": {"scale": -1}}],
        },
        r"slices\[0\]\.parameters\.scale: -1; scales are positive",
    )

    # The command: exit status 2, one message, no traceback.
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linaer", "models": two}))
    done = subprocess.run(
        [str(BIN / "toolkit"), "merge", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown method 'linaer' (did you mean 'linear'?)" in done.stderr


def test_named_steps_feed_the_output_as_mergekit_multimerge_reads_them(tmp_path):
    base, a, b = family(tmp_path, "decoder-tiny")
    documents = [
        {"name": "soup", **config("linear", a, b, base)},
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": "soup"}],
            "parameters": {"t": 0.5},
            "dtype": "float32",
        },
    ]
    report = merge_documents(documents, tmp_path / "out")
    assert {i["reference"] for i in report.inputs} == {str(base), "soup"} and report.steps[0][
        "name"
    ] == "soup"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.steps")]  # intermediates cleaned up
    merge_documents([config("linear", a, b, base)], tmp_path / "soup")
    expected = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(tmp_path / "soup")}],
        "parameters": {"t": 0.5},
        "dtype": "float32",
    }
    merge_documents([expected], tmp_path / "expected")
    assert_same_tensors(tmp_path / "out", tmp_path / "expected")
    with pytest.raises(ToolkitError, match="names the merge 'soup', which comes later"):
        merge_documents(
            [
                documents[1] | {"name": "first"},
                documents[0],
                {"merge_method": "linear", "models": [{"model": "first"}, {"model": "soup"}]},
            ],
            tmp_path / "x",
        )
