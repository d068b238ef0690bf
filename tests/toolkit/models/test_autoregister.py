"""`import toolkit` is cheap and still makes the Auto classes resolve the toolkit's architectures, whatever
order transformers is imported in. Each case runs in a fresh interpreter: import order is the point."""

import subprocess
import sys

import pytest

ROOT = __file__.rsplit("/tests/", 1)[0]


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_import_toolkit_and_the_gguf_exporter_import_no_torch():
    out = run(
        "import sys, toolkit, toolkit.cli, export.cli, export.gguf\n"
        "from toolkit.models import PRESETS\n"
        "from toolkit.models.plans import get_plan\n"
        "assert get_plan('codette').gguf.arch == 'starcoder2'\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert out == "[]"


@pytest.mark.parametrize(
    "imports",
    [
        "import toolkit\nfrom transformers import AutoConfig, AutoModelForCausalLM",
        # transformers first: toolkit registers at once
        "from transformers import AutoConfig, AutoModelForCausalLM\nimport toolkit",
        # A transformers model imports the Auto classes from inside a half-imported module (modeling_layers):
        # registering right then would fail; it happens when that import completes.
        "import toolkit\nfrom transformers import LlamaForCausalLM\nfrom transformers import AutoConfig, AutoModelForCausalLM",
        "import toolkit\nimport trl\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    ],
    ids=["toolkit-first", "transformers-first", "via-a-model-module", "via-trl"],
)
def test_auto_classes_resolve_every_architecture(imports):
    out = run(
        imports + "\n"
        "for name in ('decoder', 'prometheus', 'codette'):\n"
        "    config = AutoConfig.for_model(name, num_hidden_layers=1)\n"
        "    print(type(AutoModelForCausalLM.from_config(config)).__name__)"
    )
    assert out.split() == ["DecoderForCausalLM", "PrometheusForCausalLM", "CodetteForCausalLM"]


def test_watcher_leaves_once_registered():
    out = run(
        "import sys, toolkit\n"
        "from toolkit.models.autoregister import _watcher\n"
        "print(_watcher in sys.meta_path)\n"
        "from transformers import AutoConfig\n"
        "print(_watcher in sys.meta_path)"
    )
    assert out.split() == ["True", "False"]
