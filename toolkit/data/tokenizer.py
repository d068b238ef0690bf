"""Training the toolkit's tokenizers: byte-level BPE that llama.cpp tokenizes exactly like transformers does.

The recipe is Qwen2's: a regex split that keeps every digit a token of its own (numbers are read digit by digit,
which arithmetic tasks need), then byte-level BPE, so any UTF-8 text round-trips without an unknown token. Because
the pre-tokenizer is Qwen2's to the letter, GGUF export names it `qwen2` (`tokenizer.ggml.pre`) and llama.cpp
splits text the same way.

Special tokens take the lowest ids, in `SPECIAL_TOKENS` order, whatever the corpus. Conversations use ChatML
(`CHAT_TEMPLATE`); a turn ends with `<|im_end|>`, a document with `<|endoftext|>`, and generation stops at either
(`END_OF_TURN_TOKENS`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from toolkit.data.loading import iter_texts
from toolkit.errors import DataError, ToolkitError

# Qwen2's pre-tokenizer split, verbatim from transformers' models/qwen2/tokenization_qwen2.py (PRETOKENIZE_REGEX);
# llama.cpp's `qwen2` pre-tokenizer (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2) is the same pattern. `\p{N}` takes
# one digit at a time, where GPT-2 and Llama-3 group up to three.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The `*_token` keys are the tokenizer attributes they set. The distinct tokens get ids 0, 1, 2... in this order.
SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<|endoftext|>",  # no BOS is added when encoding (like Qwen2); this names the document separator
    "eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>",  # its own token, so padding never masks a real end of text
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}
# Generation configs stop on either: a chat turn ends with <|im_end|>, a plain document with <|endoftext|>.
END_OF_TURN_TOKENS: tuple[str, ...] = (SPECIAL_TOKENS["im_end"], SPECIAL_TOKENS["eos_token"])

# ChatML. The assistant's content and its <|im_end|> sit inside {% generation %} so that
# `return_assistant_tokens_mask=True` (TRL's assistant_only_loss) trains the answer and the stop token only.
# Jinja outside transformers does not know that tag; `export.tokenizer_gguf.portable_chat_template` rewrites it.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _special_tokens(extra: tuple[str, ...] | list[str]) -> list[str]:
    return list(dict.fromkeys([*SPECIAL_TOKENS.values(), *extra]))


def build_bpe(special_tokens: list[str]) -> Tokenizer:
    """An untrained byte-level BPE with Qwen2's pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    # No normalizer (Qwen2's has NFC): text is kept byte for byte, so decoding gives back any string exactly,
    # decomposed accents included.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets for the assistant mask
    return tokenizer


def train_tokenizer(
    files: list[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    extra_special_tokens: list[str] | tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on the text of `files` (.txt lines or jsonl/json/csv/parquet `text` rows) into `out_dir`.

    The folder holds tokenizer.json, tokenizer_config.json (bos/eos/pad, model_max_length) and
    chat_template.jinja, and loads with `AutoTokenizer.from_pretrained`. It is built beside `out_dir` and renamed
    into place, so a failed run never leaves half a tokenizer; an existing tokenizer folder there is replaced.
    `vocab_size` is an upper bound: a small corpus may run out of pairs worth merging first.
    """
    specials = _special_tokens(extra_special_tokens)
    smallest = 256 + len(specials)  # every byte, plus the special tokens
    if vocab_size < smallest:
        raise ToolkitError(
            f"vocab_size {vocab_size} is too small: a byte-level vocabulary needs at least {smallest}"
        )
    if not files:
        raise DataError("no files to train the tokenizer on")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "tokenizer.json").exists():
        raise ToolkitError(f"{out_dir} exists and holds something other than a tokenizer; not replacing it")

    tokenizer = build_bpe(specials)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0

    def texts() -> Iterator[str]:  # streamed: the corpus is never held in memory
        nonlocal count
        for path in files:
            for text in iter_texts(str(path)):
                count += 1
                yield text

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    if count == 0:
        raise DataError(f"no text in {', '.join(map(str, files))}")

    named = {key: token for key, token in SPECIAL_TOKENS.items() if key.endswith("_token")}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **named,
        extra_special_tokens=[t for t in specials if t not in named.values()],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        wrapped.save_pretrained(staging)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; a directory cannot be renamed over a non-empty one, so the old one steps aside."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    target.rename(old / target.name)
    try:
        new.rename(target)
    except OSError:
        (old / target.name).rename(target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def end_of_turn_tokens(tokenizer: Any, extra_ids: Iterable[int] = ()) -> list[str]:
    """The tokens that end an assistant turn, the one definition every consumer uses (generation configs, the
    vLLM folder, Ollama's stops, the evaluation's `generate`): the special token the chat template puts right
    after an assistant message (found by rendering one, so it holds for any template, not only ChatML), the
    tokenizer's EOS, and `extra_ids` (the EOS ids a model's configs list: `folder_eos_ids`)."""
    stops: list[str] = []
    special = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder), key=len)
    if isinstance(tokenizer.chat_template, str):
        marker = "A1-end-probe"
        conversation = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception:  # a template may reject the probe's shape; the EOS ids alone then
            text = ""
        after = text[text.index(marker) + len(marker) :] if marker in text else ""
        stops += [t for t in reversed(special) if after.startswith(t)][:1]
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stops += [tokenizer.convert_ids_to_tokens(i) for i in [*ids, *extra_ids]]
    return list(dict.fromkeys(stops))


def end_of_turn_ids(tokenizer: Any, extra_ids: Iterable[int] = ()) -> list[int]:
    """`end_of_turn_tokens` as sorted token ids."""
    return sorted({int(tokenizer.convert_tokens_to_ids(t)) for t in end_of_turn_tokens(tokenizer, extra_ids)})


def folder_eos_ids(folder: str | Path) -> list[int]:
    """The EOS ids a model folder's generation_config.json and config.json list."""
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        value = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        ids += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
    return ids


ANSWER_MARGIN = 8  # tokens beyond the longest right answer: room for a near miss to show what it was


def answer_tokens(tokenizer: Any, answers: Iterable[str]) -> list[int]:
    """Tokens each answer takes in `tokenizer`, the end-of-turn token included: what a model must generate
    before its answer is complete."""
    return [len(tokenizer(str(a), add_special_tokens=False)["input_ids"]) + 1 for a in answers]


def answer_budget(tokenizer: Any, answers: Iterable[str], margin: int = ANSWER_MARGIN) -> int:
    """New tokens enough for the longest right answer, plus `margin`: the generation limit for scoring answers.

    A fixed limit is wrong for some tokenizer and task: with the quickstart's 2048-token vocabulary half of the
    held-out tool calls take 25-29 tokens, and a 24-token limit cut every one of them short, so they could only
    be scored wrong."""
    return max(answer_tokens(tokenizer, answers), default=0) + margin
