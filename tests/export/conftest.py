"""Fixtures for export tests: locally trained tokenizers and tiny models saved as HF folders.

Tokenizers are trained here with the `tokenizers` library in the three byte-level BPE styles llama.cpp
names (qwen2, llama-bpe, gpt-2); models are built with transformers' own classes (or ours), a few training steps so that logits
are peaked as a trained model's are, and saved with `save_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from export.tokenizer_gguf import LLAMA3_REGEX, QWEN2_REGEX, TEKKEN_REGEX  # noqa: E402

CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{%- else %}{{ message['content'] + '<|im_end|>' }}{%- endif %}{{ '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    prose = (
        "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
        "Readability counts. Errors should never pass silently, unless explicitly silenced. In the face of "
        "ambiguity, refuse the temptation to guess. Now is better than never; although never is often better "
        "than right now. If the implementation is hard to explain, it is a bad idea.\n"
    )
    extra = [
        "def add(a, b):\n    return a + b\n",
        "In 1969, 3 astronauts flew 384400 km to the Moon. 0 12 345 6789 3.14159 1,000,000",
        "Les élèves étudient la physique; 東京は日本の首都です。 emoji 🙂🚀 ñ ü ß Ελληνικά русский العربية",
        "The quick brown fox jumps over the lazy dog. don't won't I'm you're they'll we've",
    ]
    return [prose] * 8 + extra * 4


def train_tokenizer(style: str, out_dir: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer in `style` (qwen2, llama-bpe, gpt-2 or tekken), saved to `out_dir`."""
    # Tekken (Mistral NeMo, Ministral 3) looks a whole pre-token up before merging, as llama.cpp does for it.
    tok = Tokenizer(models.BPE(ignore_merges=style == "tekken"))
    if style == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = {"qwen2": QWEN2_REGEX, "tekken": TEKKEN_REGEX}.get(style, LLAMA3_REGEX)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = "<|endoftext|>"
    if style in ("llama-bpe", "tekken"):
        # Llama-3 and Tekken style: BOS added in front of every sequence.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=bos,
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


SPM_SPECIALS = ["<unk>", "<s>", "</s>"]


def train_sentencepiece_tokenizer(out_dir: Path, space_prefix: bool = True, vocab_size: int = 640):
    """A SentencePiece-style tokenizer.json as transformers converts Llama 2 / Mistral (`space_prefix`: "▁" in
    front of the text) or Gemma (none) models: BPE over "▁"-joined text with byte fallback, <unk> <s> </s>
    first, then the 256 byte tokens <0x00>..<0xFF>, then the learnt pieces; BOS added in front."""
    import json

    from tokenizers import normalizers

    space = "\u2581"
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend(space)] if space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", space)])
    # Pieces start at a "▁" (SentencePiece's whitespace split) while learning; the saved tokenizer runs without
    # a pre-tokenizer, as converted SentencePiece models do.
    tok.pre_tokenizer = pre_tokenizers.Split(space, behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SPM_SPECIALS)
    tok.train_from_iterator(corpus(), trainer)
    data = json.loads(tok.to_str())
    learnt = sorted(data["model"]["vocab"].items(), key=lambda item: item[1])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    order = (
        SPM_SPECIALS + byte_tokens + [t for t, _ in learnt if t not in SPM_SPECIALS and t not in byte_tokens]
    )
    data["model"]["vocab"] = {token: i for i, token in enumerate(order)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    data["pre_tokenizer"] = None
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": space}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if space_prefix else []),
        ],
    }
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def tokenizer_of_style(style: str, out_dir: Path) -> PreTrainedTokenizerFast:
    """A tokenizer of `style`: byte-level BPE (qwen2, llama-bpe, gpt-2) or SentencePiece-style (spm, spm-no-prefix)."""
    if style.startswith("spm"):
        return train_sentencepiece_tokenizer(out_dir, space_prefix=style == "spm")
    return train_tokenizer(style, out_dir)


def train_briefly(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, steps: int = 150) -> None:
    """A few AdamW steps on the corpus: peaked, structured logits like a trained model's, in seconds."""
    ids = torch.tensor(tokenizer("\n".join(corpus()))["input_ids"])
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def save_model(
    kind: str, out_dir: Path, style: str = "qwen2", seed: int = 0, train: bool = False, **overrides
) -> Path:
    """A tiny `kind` model (decoder, llama, qwen2, qwen3, olmo2, phi3, mistral, smollm3) with a `style` tokenizer, saved to `out_dir`.

    Styles: the byte-level BPE ones (qwen2, llama-bpe, gpt-2), or "spm" / "spm-no-prefix" for a
    SentencePiece-style one (Llama 2 / Mistral / Phi-3 with a "▁" prefix, Gemma without).

    Untrained models have flat logits (fine for f32 parity); `train` makes them peaked for quant bounds.
    """
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Ministral3Config,
        Ministral3ForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        SmolLM3Config,
        SmolLM3ForCausalLM,
    )

    from toolkit.models import DecoderForCausalLM, build_config

    tokenizer = tokenizer_of_style(style, out_dir)
    shape = dict(
        vocab_size=max(512, len(tokenizer)),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    shape.update(overrides)
    torch.manual_seed(seed)
    if kind == "decoder":
        model = DecoderForCausalLM(build_config("decoder-tiny", **shape))
    else:
        config_class, model_class = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM),
            "olmo2": (Olmo2Config, Olmo2ForCausalLM),
            "phi3": (Phi3Config, Phi3ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
            "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
            "ministral3": (Ministral3Config, Ministral3ForCausalLM),
        }[kind]
        model = model_class(config_class(**shape))
        if kind in ("qwen3", "olmo2", "phi3", "gemma3"):
            # Norm weights start at 1 (Gemma's at 0, its norms scale by 1 + w): random ones show a swapped or
            # missing norm.
            centre = 0.0 if kind == "gemma3" else 1.0
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "norm" in name:
                        param.normal_(centre, 0.2)
    return finish_model(model, tokenizer, out_dir, train)


def save_preset_model(
    preset: str, out_dir: Path, style: str = "gpt-2", train: bool = False, **overrides
) -> Path:
    """A two-layer model of a toolkit `preset` (its widths), with a `style` tokenizer, saved to `out_dir`."""
    from transformers import AutoModelForCausalLM

    from tests.export.vllm_helpers import preset_config

    tokenizer = tokenizer_of_style(style, out_dir)
    torch.manual_seed(0)
    config = preset_config(preset, tokenizer, 2, **overrides)
    return finish_model(AutoModelForCausalLM.from_config(config), tokenizer, out_dir, train)


def finish_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: Path, train: bool
) -> Path:
    """Random biases (initialised to zero, they would hide a wrong mapping), optionally a brief training
    (peaked logits, as a trained model's, for quantization bounds), then `save_pretrained`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
    if train:
        train_briefly(model, tokenizer)
    model.eval().save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory) -> Path:
    return save_model("decoder", tmp_path_factory.mktemp("decoder"), train=True)


@pytest.fixture(scope="session")
def make_model():
    """`save_model` as a fixture (test modules cannot import conftest under --import-mode=importlib)."""
    return save_model


@pytest.fixture(scope="session")
def make_tokenizer():
    return train_tokenizer


@pytest.fixture(scope="session")
def chatml() -> str:
    return CHATML
