"""Training data: formats and their canonical rows, loading with file:line validation, mixtures, tokenizers.

- `formats`: the input formats (text, alpaca, sharegpt, messages, preference, prompt), the kind of row each
  becomes, and the per-row checks.
- `loading`: `DataSource`, `load_source`, `load_mixture`, `check_file`: files, folders and Hub datasets into
  canonical rows, with every problem named by file and line.
- `tokenizer`: `train_tokenizer`, the special tokens and the ChatML chat template of the toolkit's tokenizers.
"""

from toolkit.data.formats import FORMATS, KINDS, detect_format, formats_for, to_canonical
from toolkit.data.loading import DataSource, check_file, load_mixture, load_source, mixture_counts
from toolkit.data.tokenizer import CHAT_TEMPLATE, END_OF_TURN_TOKENS, SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "END_OF_TURN_TOKENS",
    "FORMATS",
    "KINDS",
    "SPECIAL_TOKENS",
    "DataSource",
    "check_file",
    "detect_format",
    "formats_for",
    "load_mixture",
    "load_source",
    "mixture_counts",
    "to_canonical",
    "train_tokenizer",
]
