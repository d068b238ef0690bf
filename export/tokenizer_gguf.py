"""The tokenizer part of a GGUF: tokens, types, merges, special ids, the pre-tokenizer name, the chat template.

llama.cpp does not run a tokenizer.json: it reimplements each known pre-tokenizer and picks one by the name
in `tokenizer.ggml.pre`. A wrong name still loads and silently splits digits and spaces differently, so the
name is read off the tokenizer's own pre-tokenizer definition and compared with the ones llama.cpp is known to
implement; anything else is refused before a byte is written. (gguf-py's `SpecialVocab`/`Vocab` helpers read
the same files but guess nothing about the pre-tokenizer, which is the part that matters here.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError

# The split regexes of the byte-level BPE families llama.cpp implements, as their tokenizer.json files hold
# them (Llama-3: digits in runs of up to three; Qwen2: single digits).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Mistral's Tekken (Mistral NeMo, Ministral 3): cased words split at case changes, single digits.
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Pre-tokenizer signature (see `pre_tokenizer_signature`) -> llama.cpp's `tokenizer.ggml.pre` name.
KNOWN_PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (("ByteLevel", False, True),): "gpt-2",
    (("Split", LLAMA3_REGEX, "Isolated"), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", QWEN2_REGEX, "Isolated"), ("ByteLevel", False, False)): "qwen2",
    (("Split", TEKKEN_REGEX, "Isolated"), ("ByteLevel", False, False)): "tekken",
}

# gguf-py's TokenType values, named here so the table below reads without the enum.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

# HF's `{% generation %}` marks assistant tokens for training masks; jinja outside transformers cannot parse
# it. Replacing it by an always-true `if` with the same whitespace-control dashes renders identically.
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def portable_chat_template(template: str) -> str:
    """`template` without transformers-only tags, rendering the same text in any jinja2 / minja."""
    return _GENERATION_TAG.sub(
        lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", template
    )


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [step for inner in pre["pretokenizers"] for step in _steps(inner)]
    return [pre]


def _signature_of(step: dict[str, Any]) -> tuple[Any, ...]:
    kind = step.get("type")
    if kind == "ByteLevel":
        # trim_offsets only changes offsets, never ids, so it is not part of the signature.
        return ("ByteLevel", bool(step.get("add_prefix_space")), bool(step.get("use_regex", True)))
    if kind == "Split":
        pattern = step.get("pattern", {})
        regex = pattern.get("Regex", re.escape(pattern.get("String", "")))
        behavior = step.get("behavior") if not step.get("invert") else "inverted " + str(step.get("behavior"))
        return ("Split", regex, behavior)
    return (str(kind),)


def pre_tokenizer_signature(pre: dict[str, Any] | None) -> tuple[tuple[Any, ...], ...]:
    """A comparable summary of a tokenizer.json `pre_tokenizer`: one tuple per step, Sequences flattened."""
    return tuple(_signature_of(step) for step in _steps(pre))


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of `tokenizer_json`, or an ExportError saying what was found."""
    signature = pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    if signature in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[signature]
    found = " + ".join(
        f"{s[0]}({', '.join(repr(x) for x in s[1:])})" if len(s) > 1 else s[0] for s in signature
    )
    known = ", ".join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))
    raise ExportError(
        f"tokenizer pre-tokenizer not recognised by llama.cpp's names: found {found or 'none'}; "
        f"known: {known} (train the tokenizer with one of these, or add its signature to "
        "export/tokenizer_gguf.py after checking llama.cpp implements it)"
    )


@dataclass
class GGUFVocab:
    """Everything the `tokenizer.*` keys of a GGUF hold."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad (gguf-py's names)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    model: str = "gpt2"  # llama.cpp's name for byte-level BPE; "llama" for SentencePiece-style BPE
    scores: list[float] | None = None  # SentencePiece-style: what llama.cpp merges by, highest first
    add_space_prefix: bool | None = None  # SentencePiece-style: "▁" in front of the text (and after specials)


def is_sentencepiece_style(tokenizer_json: dict[str, Any]) -> bool:
    """A BPE over "▁"-joined text with byte fallback: the tokenizer.json of a SentencePiece model (Llama 2,
    Mistral, Gemma, Phi-3) as transformers converts it, and what llama.cpp runs as its "llama" vocabulary."""
    model = tokenizer_json.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def sentencepiece_space_prefix(tokenizer_json: dict[str, Any], where: Path) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" in front of each text (llama.cpp's add_space_prefix);
    refused, naming what was found, when its spaces are not plainly "▁" or its prefix is not one llama.cpp
    applies (it prefixes the text and every run of text after a special token)."""
    steps = _normalizer_steps(tokenizer_json.get("normalizer"))
    normalizer = [str(step.get("type")) for step in steps]
    pre = _steps(tokenizer_json.get("pre_tokenizer"))
    replaces_space = any(
        s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " " and s.get("content") == SPACE
        for s in steps
    )
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps)
    if not pre and replaces_space and set(normalizer) <= {"Prepend", "Replace"} and len(steps) <= 2:
        return prepends
    metaspace = [s for s in pre if s.get("type") == "Metaspace"]
    if not steps and len(pre) == 1 and metaspace and metaspace[0].get("replacement") == SPACE:
        scheme = metaspace[0].get("prepend_scheme", "always")
        if not metaspace[0].get("split", True) and scheme in ("always", "never"):
            return scheme == "always"
    described = [
        f"Metaspace({s.get('prepend_scheme')}, split={s.get('split')})"
        if s.get("type") == "Metaspace"
        else str(s.get("type"))
        for s in pre
    ]
    found = f"normalizer {' + '.join(normalizer) or 'none'}, pre-tokenizer {' + '.join(described) or 'none'}"
    if len(metaspace) == 1 and metaspace[0].get("prepend_scheme") == "first":
        raise ExportError(
            f"tokenizer {where}: pre_tokenizer.prepend_scheme = 'first' (\"▁\" before the text's first piece only) "
            'has no llama.cpp equivalent: its "llama" vocabulary also prefixes the text after every special '
            "token, so chat prompts would tokenize differently; 'always' (the legacy Llama 2 behaviour) and "
            "'never' are supported"
        )
    raise ExportError(
        f'tokenizer {where}: a SentencePiece-style BPE whose spacing llama.cpp\'s "llama" vocabulary cannot '
        f'reproduce: found {found}; it supports spaces replaced by "▁" with a "▁" prefixed to every run of '
        "text (normalizer Prepend + Replace, or Metaspace with prepend_scheme always) or to none"
    )


def _normalizer_steps(normalizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if normalizer is None:
        return []
    if normalizer.get("type") == "Sequence":
        return [step for inner in normalizer["normalizers"] for step in _normalizer_steps(inner)]
    return [normalizer]


def merge_scores(vocab: dict[str, int], merges: list[str]) -> list[float]:
    """Per token id, the score llama.cpp's "llama" vocabulary merges by: minus the rank of the first BPE merge
    that makes the token, so that the highest-scoring adjacent pair is the merge the BPE applies first; 0 for
    tokens no merge makes (characters, bytes, specials), which are never merge results.

    gguf-py's `LlamaHfVocab` (what llama.cpp's converter uses without a tokenizer.model) gives every token
    -1000, which leaves llama.cpp to merge left to right and so tokenize differently from the model's BPE.
    """
    scores = [0.0] * (max(vocab.values()) + 1)
    seen: set[str] = set()
    for rank, merge in enumerate(merges):
        token = merge.replace(" ", "", 1)
        if token in vocab and token not in seen:
            seen.add(token)
            scores[vocab[token]] = -float(rank + 1)
    return scores


def _check_model(tokenizer_json: dict[str, Any], where: Path) -> None:
    model = tokenizer_json.get("model", {})
    if is_sentencepiece_style(tokenizer_json):
        return
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or tokenizer_json.get("decoder", {}).get("type") not in ("ByteLevel", None)
    ):
        raise ExportError(
            f"tokenizer {where}: model {model.get('type')} "
            f"(byte_fallback={model.get('byte_fallback')}) is not byte-level BPE; GGUF export supports "
            "byte-level BPE tokenizers (the gpt-2 / llama-bpe / qwen2 families) and SentencePiece-style BPE "
            "with byte fallback (Llama 2, Mistral, Gemma, Phi-3)"
        )
    normalizer = tokenizer_json.get("normalizer")
    # llama.cpp applies no normalizer; NFC leaves already-composed text (nearly all text) unchanged.
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ExportError(
            f"tokenizer {where}: normalizer {normalizer.get('type')} has no llama.cpp equivalent"
        )


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_settings(folder: Path) -> dict[str, Any]:
    """The tokenizer's special tokens and chat template, from the files `transformers` writes:
    special_tokens_map.json, then tokenizer_config.json on top, then chat_template.jinja (transformers 5 keeps
    the template there). Read as files, not through `AutoTokenizer`, whose import alone brings in torch: GGUF
    export needs neither (verification, which does load transformers, compares the result with it)."""
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            settings.update(json.loads(path.read_text(encoding="utf-8")))
    template = folder / "chat_template.jinja"
    if template.exists():
        settings["chat_template"] = template.read_text(encoding="utf-8")
    elif isinstance(settings.get("chat_template"), list):  # named templates: llama.cpp takes the default
        named = {t.get("name"): t.get("template") for t in settings["chat_template"]}
        settings["chat_template"] = named.get("default")
    return settings


def read_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    """The GGUF vocabulary of the HF tokenizer in `folder`, padded to the model's `n_vocab` rows."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise ExportError(f"no tokenizer.json in {folder}: GGUF export needs a fast (tokenizers) tokenizer")
    text = path.read_text(encoding="utf-8")
    tokenizer_json = json.loads(text)
    _check_model(tokenizer_json, path)
    sentencepiece = is_sentencepiece_style(tokenizer_json)
    space_prefix = sentencepiece_space_prefix(tokenizer_json, path) if sentencepiece else None
    pre = "default" if sentencepiece else detect_pre_tokenizer(tokenizer_json)
    settings = tokenizer_settings(folder)

    id_to_token = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    types = dict.fromkeys(id_to_token, NORMAL)
    for added in tokenizer_json.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if (
        sentencepiece
    ):  # as llama.cpp's own converter types them (the <unk> of an SPM vocabulary is not CONTROL)
        types.update({i: BYTE for i, t in id_to_token.items() if BYTE_TOKEN.fullmatch(t)})
        unk = tokenizer_json["model"].get("unk_token")
        types.update({i: UNKNOWN for i, t in id_to_token.items() if t == unk})
    size = max(id_to_token) + 1
    if size > n_vocab:
        raise ExportError(
            f"tokenizer {path} has {size} tokens but the model's embedding has {n_vocab} rows (vocab_size)"
        )
    # Rows past the tokenizer (vocab padded for speed) get placeholder tokens, as llama.cpp expects one
    # token per embedding row.
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    scores = None
    if sentencepiece:
        scores = merge_scores({t: i for i, t in id_to_token.items()}, merges)
        scores += [0.0] * (n_vocab - len(scores))
        merges = []  # llama.cpp's "llama" vocabulary merges by score

    token_to_id = {t: i for i, t in id_to_token.items()}
    special_ids = {
        name: token_to_id[content]
        for name in ("bos", "eos", "unk", "pad")
        if (content := _token_content(settings.get(f"{name}_token"))) in token_to_id
    }
    # Whether BOS/EOS are added is what the tokenizer does (its post-processor), not what a flag claims.
    tokenizer = Tokenizer.from_str(text)
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    add_bos = len(full) > len(plain) and full[0] == special_ids.get("bos")
    add_eos = len(full) > len(plain) and full[-1] == special_ids.get("eos")
    template = settings.get("chat_template")
    return GGUFVocab(
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=portable_chat_template(template) if isinstance(template, str) else None,
        model="llama" if sentencepiece else "gpt2",
        scores=scores,
        add_space_prefix=space_prefix,
    )


def add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Write `vocab` into a `gguf.GGUFWriter` (before its header is written)."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for name, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
