"""forge-toolkit: build, fine-tune and ship language models on the Hugging Face stack.

Importing the package imports nothing heavy (no torch, no modelling code), so commands that need no model
start in a fraction of a second. `toolkit.models.register_auto_classes()` makes transformers' Auto classes
resolve the toolkit's architectures; every command, the recipe runner and the exporters call it before they
build or load a model, and so does importing a model class from `toolkit.models`.
"""

__version__ = "0.1.0"
