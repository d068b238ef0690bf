"""`toolkit chat`: talk to a model folder in the terminal, through its own chat template.

Each line read is one user turn (or each `--prompt`); the reply is greedy unless `--temperature` is given. A
model with thought tokens thinks before it answers: its thought is hidden unless `--show-thoughts`, and only
the answer goes into the conversation's history (as the model was trained: thoughts are never in a prompt).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO


def load(folder: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a model folder: weights from safetensors only, remote code only when asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import register_auto_classes

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(
        folder, use_safetensors=True, trust_remote_code=trust_remote_code
    ).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
) -> str:
    """The model's next turn after `messages`, thoughts included when it has thought tokens."""
    import torch

    from toolkit.data.thoughts import decode_with_thoughts, has_thought_tokens
    from toolkit.data.tokenizer import end_of_turn_ids

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    new = output[0, batch["input_ids"].shape[1] :].tolist()
    if has_thought_tokens(tokenizer):
        return decode_with_thoughts(tokenizer, new).strip()
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def chat(
    model: Any,
    tokenizer: Any,
    turns: Iterable[str],
    out: TextIO = sys.stdout,
    show_thoughts: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    history: bool = True,
) -> None:
    """Answer each turn, printing the replies (`thinking: ...` first with `show_thoughts`)."""
    from toolkit.data.thoughts import has_thought_tokens, split_thought

    thinking = has_thought_tokens(tokenizer)
    messages: list[dict[str, str]] = []
    for turn in turns:
        turn = turn.strip()
        if not turn:
            continue
        asked = [*messages, {"role": "user", "content": turn}]
        text = reply(model, tokenizer, asked, max_new_tokens, temperature)
        answer = split_thought(text).answer if thinking else text
        if thinking and show_thoughts:
            print(f"thinking: {split_thought(text).thought}", file=out)
        print(answer, file=out, flush=True)
        if history:
            messages = [*asked, {"role": "assistant", "content": answer}]
