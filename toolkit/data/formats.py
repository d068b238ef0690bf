"""Dataset formats: what a row may look like on disk, and the canonical row each one becomes.

A *kind* is the row shape a trainer takes (TRL's dataset formats):

    text        {"text": str}                                            pretraining (language modeling)
    messages    {"messages": [{"role", "content"}, ...]}                 SFT (conversational)
    preference  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]} DPO, ORPO, CPO, reward models
    unpaired    {"prompt": [msgs], "completion": [msgs], "label": bool}  KTO (one answer, good or bad)
    prompt      {"prompt": [msgs], **extra columns}                      GRPO / RL (reward functions read the extras)

An *input format* is a row shape found in the wild. Each feeds exactly one kind (`FORMATS` below):

    text        {"text"} (also each non-empty line of a .txt file)                         -> text
    alpaca      {"instruction", "output", "input"?, "system"?}                             -> messages
    sharegpt    {"conversations": [{"from": human|gpt|system|user|assistant, "value"}]}    -> messages
    messages    {"messages": [{"role": system|user|assistant, "content"}]}                 -> messages
    preference  {"prompt", "chosen", "rejected"}, each a string or a message list          -> preference
    unpaired    {"prompt", "completion", "label": true|false}                              -> unpaired
    prompt      {"prompt": string or message list, ...extra columns kept}                  -> prompt

Conversations never feed `text`: turning one into plain text needs the model's chat template, which the trainer
applies to `messages` rows itself (and with it the assistant-only loss mask). Pretrain on `text` rows, fine-tune
on `messages` rows.

Rules every conversation follows: an optional system message first, then user and assistant turns alternating,
starting with the user; SFT conversations end with the assistant, prompts end with the user. Contents are
non-empty strings. Message keys other than role and content are dropped, as are columns other than the
canonical ones, except for `prompt` rows, whose extra columns (answers, task names) reward functions need.

This module works on one row at a time and knows nothing of files; `toolkit.data.loading` adds the file:line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from toolkit.errors import nearest

KINDS = ("text", "messages", "preference", "unpaired", "prompt")
ROLES = ("system", "user", "assistant")

# ShareGPT speaker names -> chat roles. Datasets in the wild mix the original names with the chat ones.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
CHAT_ROLES = {role: role for role in ROLES}
_A_ROLE = {"system": "a system", "user": "a user", "assistant": "an assistant"}  # "a user message"

# How a value's type is named in messages: users write JSON, not Python.
_JSON_TYPES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}

Problems = list[str]
Message = dict[str, str]


def json_type(value: Any) -> str:
    """`a string`, `a list`, `null`… as a JSON user would name the type of `value`."""
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------------------
# Field checks: each appends what is wrong to `problems` and returns the value, or None when unusable.


def _string(row: Mapping, key: str, problems: Problems, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (value == "" and not required):
        if required:
            problems.append(f"missing '{key}'")
        return None
    if not isinstance(value, str):
        problems.append(f"'{key}' is {json_type(value)}; expected a string")
        return None
    if required and not value.strip():
        problems.append(f"'{key}' is empty")
        return None
    return value


def _message_list(
    value: Any, field: str, problems: Problems, *, role_key: str, content_key: str, roles: Mapping[str, str]
) -> list[Message] | None:
    """Read a list of `{role_key, content_key}` objects into chat messages, mapping speaker names through `roles`."""
    if not isinstance(value, list):
        problems.append(
            f"'{field}' is {json_type(value)}; expected a list of {{{role_key}, {content_key}}} objects"
        )
        return None
    if not value:
        problems.append(f"'{field}' is an empty list")
        return None
    messages: list[Message] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            problems.append(
                f"{where} is {json_type(item)}; expected an object with '{role_key}' and '{content_key}'"
            )
            continue
        speaker, content = item.get(role_key), item.get(content_key)
        role = roles.get(speaker) if isinstance(speaker, str) else None
        if speaker is None:
            problems.append(f"{where} has no '{role_key}'")
        elif role is None:
            guess = nearest(str(speaker), roles)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            problems.append(f"{where}.{role_key} is {speaker!r}; expected one of {', '.join(roles)}{hint}")
        if content is None:
            problems.append(f"{where} has no '{content_key}'")
        elif not isinstance(content, str):
            problems.append(f"{where}.{content_key} is {json_type(content)}; expected a string")
        elif not content.strip():
            problems.append(f"{where}.{content_key} is empty")
        if role is not None and isinstance(content, str):
            messages.append({"role": role, "content": content})
    return messages if len(messages) == len(value) else None


def _check_turns(messages: list[Message], field: str, problems: Problems, *, last: str) -> None:
    """System first if at all, then user/assistant alternating from the user, ending on `last`."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if message["role"] != expected:
            after = "first" if i == 0 else f"after the {turns[i - 1]['role']} message"
            problems.append(
                f"{field}[{i + offset}] is {_A_ROLE[message['role']]} message {after}; expected {expected} "
                "(a system message only comes first, then user and assistant alternate)"
            )
            return
    if not turns:
        after = "user and assistant turns" if last == "assistant" else "a user message"
        problems.append(f"'{field}' holds only a system message; expected {after} after it")
    elif turns[-1]["role"] != last:
        need = (
            "SFT needs the assistant's answer last" if last == "assistant" else "a prompt ends with the user"
        )
        problems.append(f"'{field}' ends with {_A_ROLE[turns[-1]['role']]} message; {need}")


def _conversation(value: Any, field: str, problems: Problems, *, last: str) -> list[Message] | None:
    messages = _message_list(value, field, problems, role_key="role", content_key="content", roles=CHAT_ROLES)
    if messages:
        _check_turns(messages, field, problems, last=last)
    return messages


def _prompt_messages(row: Mapping, problems: Problems) -> list[Message] | None:
    """A prompt given as a string is one user message; as a list, a conversation ending with the user."""
    value = row.get("prompt")
    if isinstance(value, str):
        prompt = _string(row, "prompt", problems)
        return [{"role": "user", "content": prompt}] if prompt is not None else None
    if value is None:
        problems.append("missing 'prompt'")
        return None
    return _conversation(value, "prompt", problems, last="user")


def _completion(row: Mapping, key: str, problems: Problems) -> list[Message] | None:
    """`chosen`/`rejected`/`completion`: a string is one assistant message; a list holds assistant messages only."""
    value = row.get(key)
    if isinstance(value, str) or value is None:
        text = _string(row, key, problems)
        return [{"role": "assistant", "content": text}] if text is not None else None
    messages = _message_list(value, key, problems, role_key="role", content_key="content", roles=CHAT_ROLES)
    if messages is None:
        return None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            problems.append(
                f"{key}[{i}] is {_A_ROLE[message['role']]} message; '{key}' holds the assistant's answer only"
            )
            return None
    return messages


# ---------------------------------------------------------------------------------------------------------------
# One converter per input format: raw row -> canonical row (partial when `problems` grew).


def _from_text(row: Mapping, problems: Problems) -> dict:
    return {"text": _string(row, "text", problems)}


def _from_alpaca(row: Mapping, problems: Problems) -> dict:
    instruction = _string(row, "instruction", problems)
    extra_input = _string(row, "input", problems, required=False)
    output = _string(row, "output", problems)
    system = _string(row, "system", problems, required=False)
    # Alpaca's own prompt puts the input under a separate "### Input:" header; in a chat it joins the instruction
    # in one user message, after a blank line.
    user = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _from_sharegpt(row: Mapping, problems: Problems) -> dict:
    messages = _message_list(
        row.get("conversations"),
        "conversations",
        problems,
        role_key="from",
        content_key="value",
        roles=SHAREGPT_ROLES,
    )
    if messages:
        _check_turns(messages, "conversations", problems, last="assistant")
    return {"messages": messages}


def _from_messages(row: Mapping, problems: Problems) -> dict:
    messages = _conversation(row.get("messages"), "messages", problems, last="assistant")
    _check_thoughts(messages or [], "messages", problems)
    return {"messages": messages}


def _check_thoughts(messages: list[Message], field: str, problems: Problems) -> None:
    """Answers written in the thought-token format (`toolkit.data.thoughts`) must be well formed: an unknown or
    unclosed tag would teach the model a broken format."""
    from toolkit.data.thoughts import has_thought, thought_problems

    for i, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, str) and has_thought(content):
            problems.extend(f"{field}[{i}].content: {p}" for p in thought_problems(content))


def _from_preference(row: Mapping, problems: Problems) -> dict:
    prompt = _prompt_messages(row, problems)
    chosen = _completion(row, "chosen", problems)
    rejected = _completion(row, "rejected", problems)
    if chosen is not None and chosen == rejected:
        problems.append("'chosen' and 'rejected' are the same; a preference pair needs two different answers")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _from_unpaired(row: Mapping, problems: Problems) -> dict:
    label = row.get("label")
    if label is None:
        problems.append("missing 'label'")
    elif not isinstance(label, bool):
        problems.append(f"'label' is {json_type(label)}; expected true (a good answer) or false (a bad one)")
        label = None
    return {
        "prompt": _prompt_messages(row, problems),
        "completion": _completion(row, "completion", problems),
        "label": label,
    }


def _from_prompt(row: Mapping, problems: Problems) -> dict:
    return {"prompt": _prompt_messages(row, problems), **{k: v for k, v in row.items() if k != "prompt"}}


@dataclass(frozen=True)
class InputFormat:
    kind: str  # the canonical row it becomes
    signature: tuple[str, ...]  # columns that, all present, identify it when the format is "auto"
    convert: Callable[[Mapping, Problems], dict]
    keeps_extra_columns: bool = False  # RL rows carry answers etc. to the reward functions


# Auto-detection tries these in order: preference and unpaired before prompt, since their rows also have a prompt.
FORMATS: dict[str, InputFormat] = {
    "preference": InputFormat("preference", ("chosen", "rejected"), _from_preference),
    "unpaired": InputFormat("unpaired", ("completion", "label"), _from_unpaired),
    "sharegpt": InputFormat("messages", ("conversations",), _from_sharegpt),
    "messages": InputFormat("messages", ("messages",), _from_messages),
    "alpaca": InputFormat("messages", ("instruction",), _from_alpaca),
    "prompt": InputFormat("prompt", ("prompt",), _from_prompt, keeps_extra_columns=True),
    "text": InputFormat("text", ("text",), _from_text),
}


def formats_for(kind: str) -> list[str]:
    """The input formats that feed `kind`."""
    return [name for name, fmt in FORMATS.items() if fmt.kind == kind]


def detect_format(columns: Iterable[str]) -> str | None:
    """The input format whose signature columns are all present, or None."""
    present = set(columns)
    return next((name for name, fmt in FORMATS.items() if present.issuperset(fmt.signature)), None)


def describe_formats(names: Iterable[str] | None = None) -> str:
    """`alpaca (instruction, …), sharegpt (conversations)` for messages that list what would be right."""
    return ", ".join(f"{name} ({', '.join(FORMATS[name].signature)})" for name in names or FORMATS)


def to_canonical(row: Mapping, format: str) -> tuple[dict, list[str]]:
    """Normalise one raw row of `format` into its kind's canonical row.

    Returns the row and every problem found in it (without a location; the caller adds file:line). The row is
    only meaningful when the problem list is empty.
    """
    problems: Problems = []
    return FORMATS[format].convert(row, problems), problems
