"""Shared test setup: deterministic, single-threaded torch (steadier on small shared machines)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers' BitNet layers wrap their quantizers in torch.compile, which on a CPU compiles C++ for about 30 s
# in every process (and again for new shapes) for kernels of microseconds: the suite, and the processes it
# starts, run them eagerly. The math is the same; the compiled path is transformers' own.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


from export.verify_vllm import DISABLED, PYTHON_ENV, SETUP, vllm_python  # noqa: E402

# The vLLM environment, if one is set up; then turned off for this process and its children, so that an
# export's "auto" verification never starts a vLLM engine (a minute each) outside the `vllm`-marked tests,
# fixtures of any scope included.
VLLM_PYTHON = vllm_python()
os.environ[PYTHON_ENV] = DISABLED


# Seconds of unit tests, no subprocess, no shared fixture: what runs third (see below).
THIRD = "tests/toolkit/quantization/test_staged.py"


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if VLLM_PYTHON is None:
        skips["vllm"] = pytest.mark.skip(reason=f"needs the vLLM environment: `{SETUP}` sets it up")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
    # Whole recipes (tests/recipes/) are the longest files, the demo's training at size (about 30 minutes on one
    # core) the longest of them: they start first, so that under pytest-xdist no worker takes one up near the
    # end while the others sit idle.
    items.sort(
        key=lambda item: (
            not item.nodeid.startswith("tests/recipes/test_quickstart_learns.py"),
            not item.nodeid.startswith("tests/recipes/"),
        )
    )
    # pytest-xdist's file scheduling gives a worker whose first file has at most two tests a second file at the
    # start (loadscope's "at least two work units"): the worker that takes the demo's training also takes the
    # third file, and runs it only after that half hour. A file of quick unit tests goes there.
    files = list(dict.fromkeys(item.nodeid.split("::")[0] for item in items))
    if len(files) > 3 and THIRD in files:
        order = [*files[:2], THIRD, *(f for f in files[2:] if f != THIRD)]
        rank = {f: i for i, f in enumerate(order)}
        items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


@pytest.fixture(autouse=True)
def _vllm_where_marked(request, monkeypatch):
    """`vllm`-marked tests get the vLLM environment back."""
    if "vllm" in request.keywords and VLLM_PYTHON is not None:
        monkeypatch.setenv(PYTHON_ENV, str(VLLM_PYTHON))
