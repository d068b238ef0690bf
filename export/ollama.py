"""Ollama packaging: the verified GGUF plus a Modelfile, ready for `ollama create NAME -f DIR/Modelfile`.

Current Ollama renders the chat template stored in the GGUF (`tokenizer.chat_template`). Older versions,
or a Modelfile that forces Go templates, use the Modelfile's `TEMPLATE`: for ChatML-shaped templates (the
toolkit's own) we write the Go-template equivalent, after checking that it renders a probe conversation to
the same text as the jinja template does. A template of another shape gets no `TEMPLATE` line (rather than
a wrong one) and the result says so. Stop parameters list every token that ends an assistant turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.gguf import ExportResult, export_gguf
from export.source import resolve_source
from toolkit.errors import ExportError
from toolkit.io import write_text

# Go-template ChatML, over Ollama's `.Messages` (role/content pairs, the Modelfile SYSTEM included as the
# first system message), ending with the assistant header as jinja's add_generation_prompt does.
CHATML_GO_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"

PROBE = [
    {"role": "system", "content": "S1"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """Render the subset of Go's text/template that this module emits: `range .Messages`, `end`, `.Role`,
    `.Content`, and the `{{-`/`-}}` whitespace trimming.

    Ollama is a Go program and cannot be run here; this interpreter exists only so that the emitted
    template is checked against the jinja rendering. Anything outside the subset is an error.
    """
    parts: list[tuple[str, str]] = []  # ("text", s) or ("action", s)
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position : match.start()]
        if trim_next:
            text = text.lstrip()
        if match[1]:
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", match[2]))
        trim_next, position = bool(match[3]), match.end()
    tail = template[position:]
    parts.append(("text", tail.lstrip() if trim_next else tail))

    def run(items: list[tuple[str, str]], scope: dict[str, str]) -> str:
        out, i = [], 0
        while i < len(items):
            kind, value = items[i]
            if kind == "text":
                out.append(value)
            elif value == "range .Messages":
                end, depth = i + 1, 0
                while not (items[end] == ("action", "end") and depth == 0):
                    depth += {"end": -1}.get(items[end][1], 0) if items[end][0] == "action" else 0
                    depth += items[end][0] == "action" and items[end][1].startswith("range")
                    end += 1
                    if end >= len(items):
                        raise ValueError("range without end")
                body = items[i + 1 : end]
                out.extend(run(body, {"Role": m["role"], "Content": m["content"]}) for m in messages)
                i = end
            elif value in (".Role", ".Content"):
                out.append(scope[value[1:]])
            else:
                raise ValueError(f"Go-template action {value!r} is outside the supported subset")
            i += 1
        return "".join(out)

    return run(parts, {})


def go_template_for(tokenizer: Any) -> str | None:
    """The Go template equivalent to the tokenizer's chat template, or None when there is none we can prove."""
    if not isinstance(tokenizer.chat_template, str):
        return None
    jinja = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    return CHATML_GO_TEMPLATE if render_go_template(CHATML_GO_TEMPLATE, PROBE) == jinja else None


def gguf_context_length(path: Path) -> int:
    """The context length the GGUF declares (what llama.cpp, and so Ollama, will run)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    return int(reader.fields[f"{arch}.context_length"].contents())


def _quote(text: str) -> str:
    if '"""' in text:
        raise ExportError('the SYSTEM prompt cannot contain """ (the Modelfile string delimiter)')
    return f'"""{text}"""'


def modelfile_text(
    gguf_name: str, stops: list[str], num_ctx: int, template: str | None, system: str | None
) -> str:
    """The Modelfile: FROM, TEMPLATE (when proven equivalent), stops, num_ctx, SYSTEM (when given)."""
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"


@dataclass
class OllamaResult:
    """What `export_ollama` wrote."""

    modelfile: Path
    gguf: ExportResult
    stops: list[str]
    template_written: bool
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.gguf.ok


def export_ollama(
    src: str | Path,
    out_dir: str | Path,
    quant: str = "q8_0",
    *,
    system: str | None = None,
    force: bool = False,
    verify: bool = True,
    n_threads: int | None = None,
) -> OllamaResult:
    """Write `<out_dir>/<name>-<quant>.gguf` (verified unless told not) and `<out_dir>/Modelfile`."""
    from transformers import AutoTokenizer

    from toolkit.data.tokenizer import end_of_turn_tokens, folder_eos_ids

    out_dir = Path(out_dir)
    modelfile = out_dir / "Modelfile"
    if modelfile.exists() and not force:
        raise ExportError(f"{modelfile} exists; pass --force to replace it")
    source = resolve_source(src)  # once: a LoRA run is merged here, and the GGUF is written from it
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
        stops = end_of_turn_tokens(tokenizer, folder_eos_ids(source.folder))
        template = go_template_for(tokenizer)
        out_dir.mkdir(parents=True, exist_ok=True)
        gguf_path = out_dir / f"{source.name}-{quant}.gguf"
        result = export_gguf(source, quant, gguf_path, force=force, verify=verify, n_threads=n_threads)
    finally:
        source.cleanup()
    write_text(
        modelfile, modelfile_text(gguf_path.name, stops, gguf_context_length(gguf_path), template, system)
    )
    notes = (
        []
        if template
        else [
            "the chat template is not ChatML-shaped: no Go TEMPLATE written; Ollama versions that read "
            "tokenizer.chat_template from the GGUF render it, older ones need a TEMPLATE written by hand"
        ]
    )
    return OllamaResult(modelfile, result, stops, template is not None, notes)
