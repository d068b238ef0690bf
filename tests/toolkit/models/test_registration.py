"""Registration with the Auto classes is one explicit call, with no import hook: `import toolkit` stays cheap,
and `register_auto_classes()` (or reaching for a model class) makes the Auto classes resolve every
architecture, whatever was imported before. Each case runs in a fresh interpreter: import order is the point."""

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


def test_import_toolkit_and_the_gguf_exporter_import_no_torch_and_install_no_hook():
    out = run(
        "import sys\n"
        "finders = list(sys.meta_path)\n"
        "import toolkit, toolkit.cli, export.cli, export.gguf\n"
        "from toolkit.models import PRESETS\n"
        "from toolkit.models.plans import get_plan\n"
        "assert get_plan('codette').gguf.arch == 'starcoder2'\n"
        "from toolkit.stages import load_plugins\n"
        "load_plugins()  # every stage kind registered: what `toolkit methods` and a recipe's parse do first\n"
        "assert sys.meta_path == finders, sys.meta_path\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert out == "[]"


RESOLVE = (
    "for name in ('decoder', 'prometheus', 'codette'):\n"
    "    config = AutoConfig.for_model(name, num_hidden_layers=1)\n"
    "    print(type(AutoModelForCausalLM.from_config(config)).__name__)"
)


@pytest.mark.parametrize(
    "imports",
    [
        "from toolkit.models import register_auto_classes\nregister_auto_classes()\n"
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "from toolkit.models import register_auto_classes\nregister_auto_classes()",
        # A transformers model module half-imports the Auto classes; registering afterwards is unaffected.
        "from transformers import LlamaForCausalLM\nimport trl\nfrom toolkit.models import register_auto_classes\n"
        "register_auto_classes()\nfrom transformers import AutoConfig, AutoModelForCausalLM",
        # Reaching for a model class registers them all.
        "from toolkit.models import DecoderForCausalLM\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    ],
    ids=["register-first", "transformers-first", "via-a-model-module-and-trl", "model-class-access"],
)
def test_auto_classes_resolve_every_architecture(imports):
    assert run(imports + "\n" + RESOLVE).split() == [
        "DecoderForCausalLM",
        "PrometheusForCausalLM",
        "CodetteForCausalLM",
    ]


def test_modelling_modules_import_alone_in_any_order():
    """What the remote-code export relies on: a modelling module imports with transformers only, before or
    after anything else (the import hook this replaces broke here, half-way through transformers' own import
    of `modeling_layers`)."""
    out = run(
        "import toolkit.models.codette.modeling_codette as m\n"
        "import toolkit.models.decoder.modeling_decoder as d\n"
        "print(m.CodetteModel.__name__, d.DecoderModel.__name__)"
    )
    assert out == "CodetteModel DecoderModel"
