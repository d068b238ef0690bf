"""lm-eval through `toolkit eval`: the toolkit's own tasks (eval/tasks/) give the same numbers through the
toolkit's command as through lm-eval's own command line on the same folder, results land in
<folder>/eval/<timestamp>/ saying what they were computed on, and an unknown task name is refused with the
nearest one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.vllm import export_vllm
from tests.eval.helpers import toolkit_eval
from tests.export.vllm_helpers import make_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TASKS = "forge_heldout,forge_heldout_choice,forge_corpus"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """runs/tiny: a one-layer toolkit `decoder` in its sft stage."""
    return make_run(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def folder(run) -> Path:
    """The same model as transformers' own LlamaForCausalLM, which lm-eval's command loads by itself."""
    return export_vllm(run, run.parent / "llama", verify=False).path


def test_toolkit_eval_equals_lm_eval_itself(folder, tmp_path):
    ours = toolkit_eval(tmp_path, str(folder), "--tasks", TASKS, "--limit", "8", "--json")
    assert ours.returncode == 0, ours.stderr[-3000:]
    results = json.loads(ours.stdout)  # --json: the results mapping and nothing else on stdout
    theirs = subprocess.run(
        [
            str(BIN / "lm_eval"),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={folder},dtype=float32",
            "--tasks",
            TASKS,
            "--include_path",
            str(ROOT / "eval" / "tasks"),
            "--limit",
            "8",
            "--output_path",
            str(tmp_path / "lm-eval"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    reference = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())["results"]
    for task in TASKS.split(","):
        numbers = {k: v for k, v in reference[task].items() if isinstance(v, float)}
        assert numbers and {k: results[task][k] for k in numbers} == numbers
    assert 1.0 < results["forge_corpus"]["byte_perplexity,none"] < 1e6

    saved = sorted((folder / "eval").glob("*/results.json"))[-1]
    record = json.loads(saved.read_text())
    assert record["results"] == results
    assert record["chat_template"] is False and record["limit"] == 8 and record["dtype"] == "float32"
    assert record["n"] == dict.fromkeys(TASKS.split(","), 8) and record["harness"].startswith("lm-eval 0.4")
    assert "| artifact | dtype | forge_heldout exact_match |" in (saved.parent / "report.md").read_text()


def test_unknown_task_names_the_nearest(folder, tmp_path):
    proc = toolkit_eval(tmp_path, str(folder), "--tasks", "forge_heldot")
    assert proc.returncode != 0
    assert "'forge_heldot' (did you mean 'forge_heldout'?)" in proc.stderr


def test_several_sources_side_by_side(run, folder, tmp_path):
    """A run folder (the toolkit's decoder, registered) and its Llama export in one table: the same weights
    give the same numbers through either class; each source keeps its own results."""
    proc = toolkit_eval(
        tmp_path,
        str(run),
        str(folder),
        "--tasks",
        "forge_corpus",
        "--limit",
        "4",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert list(results) == [str(run), str(folder)]
    ours, theirs = (results[key]["forge_corpus"]["byte_perplexity,none"] for key in results)
    assert ours == pytest.approx(theirs, rel=1e-6)
    record = json.loads(sorted((run / "eval").glob("*/results.json"))[-1].read_text())
    assert record["artifact"] == str((run / "sft" / "final").resolve())


@pytest.fixture(scope="module")
def gguf(run) -> Path:
    from export.gguf import export_gguf

    return export_gguf(run, "f32", run.parent / "tiny-f32.gguf", verify=False).path


def test_f32_gguf_scores_as_its_checkpoint(folder, gguf, tmp_path):
    """The GGUF through llama-cpp-python's server (generation) and llama.cpp's logits (log-likelihoods)
    gives the checkpoint's numbers: same choices, perplexity within 0.1%."""
    ours = toolkit_eval(tmp_path, str(folder), str(gguf), "--tasks", TASKS, "--limit", "8", "--json")
    assert ours.returncode == 0, ours.stderr[-3000:]
    both = json.loads(ours.stdout)
    checkpoint, file = both[str(folder)], both[str(gguf)]
    assert file["forge_heldout"]["exact_match,none"] == checkpoint["forge_heldout"]["exact_match,none"]
    assert file["forge_heldout_choice"]["acc,none"] == checkpoint["forge_heldout_choice"]["acc,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert file["forge_corpus"][metric] == pytest.approx(checkpoint["forge_corpus"][metric], rel=1e-3)
    record = json.loads(sorted((gguf.parent / "eval" / gguf.stem).glob("*/results.json"))[-1].read_text())
    assert record["kind"] == "gguf" and record["dtype"] == "f32" and record["artifact"] == str(gguf)


def test_gguf_generation_is_the_servers_and_equals_transformers(folder, gguf):
    """generate_until goes through the server and gives the checkpoint's greedy text."""
    from lm_eval.api.instance import Instance

    from eval.artifacts import resolve

    requests = [
        Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 12}), i)
        for i, prompt in enumerate(["def add(a, b):", "The capital of", "Question: 2 + 2 ="])
    ]
    with resolve(str(folder)).lm() as lm:
        expected = lm.generate_until(requests)
    with resolve(str(gguf)).lm() as lm:
        assert lm.base_url.startswith("http://127.0.0.1:")
        assert lm.generate_until(requests) == expected
    assert any(text.strip() for text in expected)


def test_server_is_stopped_when_the_evaluation_fails(gguf):
    from eval.artifacts import resolve
    from eval.servers import ready

    with pytest.raises(RuntimeError, match="task failed"):
        with resolve(str(gguf)).lm() as lm:
            url = lm.base_url.removesuffix("/v1/completions")
            assert ready(url)
            raise RuntimeError("task failed")
    assert not ready(url)


def test_gguf_perplexity_in_llama_cpp_equals_the_checkpoints(folder, gguf, tmp_path):
    """Perplexity of the f32 GGUF from llama.cpp's tokenizer and logits, within 0.1% of the checkpoint's,
    both in one table from the command; with a stride too."""
    from eval.perplexity import gguf_perplexity, perplexity
    from eval.stages import load_model_folder

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "corpus" / "valid.jsonl").open()][:6]
    text_file = tmp_path / "text.jsonl"
    text_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model, tokenizer = load_model_folder(folder)
    for stride in (None, 64):
        expected = perplexity(model, tokenizer, texts, stride=stride)
        got = gguf_perplexity(gguf, texts, stride=stride)
        assert got["tokens"] == expected["tokens"] > 256
        assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-3)
    proc = toolkit_eval(tmp_path, str(folder), str(gguf), "--perplexity", str(text_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| artifact | dtype | perplexity | tokens |" in proc.stdout
    assert f"| {gguf} | f32 | " in proc.stdout


@pytest.mark.vllm
def test_vllm_folder_served_by_vllm_scores_as_its_checkpoint(run, folder, tmp_path):
    """The vLLM folder through `vllm serve` (the vLLM environment) and lm-eval's completions client gives the
    checkpoint's exact-match and accuracy; the result says vLLM computed it, and the server is gone after."""
    checkpoint = str(run / "sft" / "final")
    ours = toolkit_eval(
        tmp_path,
        str(folder),
        checkpoint,
        "--tasks",
        "forge_heldout,forge_heldout_choice",
        "--limit",
        "8",
        "--json",
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    both = json.loads(ours.stdout)
    served, reference = both[str(folder)], both[checkpoint]
    assert served["forge_heldout"]["exact_match,none"] == reference["forge_heldout"]["exact_match,none"]
    assert served["forge_heldout_choice"]["acc,none"] == reference["forge_heldout_choice"]["acc,none"]
    record = json.loads(sorted((folder / "eval").glob("*/results.json"))[-1].read_text())
    assert record["kind"] == "vllm" and record["artifact"] == str(folder.resolve())
    log = (folder / "eval" / "vllm-server.log").read_text()
    assert "vllm" in log.lower()
    assert (
        subprocess.run(["pgrep", "-f", f"vllm serve {folder.resolve()}"], capture_output=True).returncode == 1
    )
