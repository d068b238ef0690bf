"""forge-toolkit: build, fine-tune and ship language models on the Hugging Face stack.

Importing the package registers the toolkit's architectures with the transformers Auto classes; nothing else
happens at import.
"""

import toolkit.models  # noqa: F401  (registers architectures)

__version__ = "0.1.0"
