"""forge-toolkit: build, fine-tune and ship language models on the Hugging Face stack.

Importing the package makes the transformers Auto classes resolve the toolkit's architectures (at once when
transformers' Auto classes are already loaded, otherwise as soon as they are) and imports nothing heavy: torch
and the modelling code load only when something uses them.
"""

from toolkit.models import autoregister as _autoregister

_autoregister.install()

__version__ = "0.1.0"
