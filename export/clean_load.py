"""Load an exported HF folder the way a machine without forge-toolkit would, and record what it computes.

Run as a script in a fresh interpreter (`python -I export/clean_load.py REQUEST.json`) by `export/verify_hf.py`;
never imported. An import hook makes `toolkit`, `export` and `eval` unimportable, so the folder must stand on
its own: transformers' native class, or its own modelling files through `trust_remote_code=True`. Imports
only the standard library, torch, transformers and (for adapters) peft.

The request names the folder, the prompts and the conversation; the result (token ids, logits at every
position, a greedy continuation, the class that was loaded, the checkpoint names transformers did not match)
is saved with `torch.save` to the request's `out` path for the parent process to compare with the source model.

With `transformers_backend` set, the folder also runs the way vLLM's Transformers backend runs it (see
`backend_logits`), with a CPU attention function in the place of vLLM's paged attention.
"""

import importlib.abc
import inspect
import itertools
import json
import sys
from pathlib import Path

BLOCKED = ("toolkit", "export", "eval")


class BlockProject(importlib.abc.MetaPathFinder):
    """Refuses the project's packages, whether installed (editable or not) or reachable from sys.path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{fullname} is blocked: the export must load without forge-toolkit")
        return None


def project_importable() -> bool:
    try:
        __import__("toolkit")
    except ImportError:
        return False
    return True


def loading_problems(info: dict) -> list[str]:
    """Checkpoint names the loaded class did not match one to one: vLLM's loaders refuse a name they do not
    know and leave a parameter the checkpoint lacks uninitialised, where transformers only warns."""
    problems = [f"missing: {name}" for name in sorted(info.get("missing_keys") or ())]
    problems += [f"unexpected: {name}" for name in sorted(info.get("unexpected_keys") or ())]
    problems += [f"shape mismatch: {item}" for item in sorted(map(str, info.get("mismatched_keys") or ()))]
    return problems + [f"error: {message}" for message in info.get("error_msgs") or ()]


DECODE_STEPS = 4  # tokens of each prompt that the Transformers-backend check feeds one step at a time
# The backend check computes in float64, as does its reference: packing prompts and decoding step by step sum
# in another order than one forward per prompt, which in float32 alone moves a trained model's logits by ~1e-5,
# as much as a small mistake would; in float64 only a mistake shows.
BACKEND_DTYPE = "float64"


class AttentionLayer:
    """One layer's share of vLLM's attention state: head counts, the default scale, the keys and values each
    sequence has cached so far (vLLM's paged KV cache), and, through `step`, where each sequence of the current
    step lies in the packed row (vLLM's attention metadata; shared by every layer)."""

    def __init__(self, heads: int, kv_heads: int, head_size: int, sequences: int, step: dict) -> None:
        import torch

        self.heads, self.kv_heads, self.head_size = heads, kv_heads, head_size
        self.scale = head_size**-0.5  # until the model passes its own `scaling`, as vLLM does
        empty = torch.empty(kv_heads, 0, head_size)
        self.cache = [(empty, empty) for _ in range(sequences)]
        self.step = step


def packed_causal_attention(
    module, query, key, value, attention_mask, scaling=None, attention_instances=None, **kwargs
):
    """Stands in for vLLM's attention function (`ALL_ATTENTION_FUNCTIONS["vllm"]`) with vLLM's contract: the
    layer is found by `module.layer_idx` in `attention_instances`, a keyword only the model's `**kwargs` can
    bring here; query, key and value arrive as [1, heads, tokens, head_dim] with key/value at their own head
    count and are flattened to [tokens, heads * head_dim]; the mask is ignored, since the attention layer knows
    where each sequence lies in the packed row and what it has cached; new keys and values join the cache; the
    output goes back flat, for the model to reshape."""
    import torch

    if attention_instances is None:
        raise RuntimeError(
            f"{type(module).__name__} received no `attention_instances`: the model does not pass its keyword "
            "arguments down to the attention function"
        )
    layer = attention_instances[module.layer_idx]
    tokens = query.shape[-2]
    query, key, value = (x.transpose(1, 2).reshape(tokens, -1) for x in (query, key, value))
    heads, kv_heads, size = layer.heads, layer.kv_heads, layer.head_size
    if key.shape[-1] != kv_heads * size or query.shape[-1] != heads * size:
        raise RuntimeError(
            f"attention of layer {module.layer_idx} receives {query.shape[-1] // size} query and "
            f"{key.shape[-1] // size} key/value heads; vLLM allocates {heads} and {kv_heads} "
            "(repeat key/value inside the attention function, not before it)"
        )
    scale = layer.scale if scaling is None else float(scaling)
    out = torch.empty_like(query)
    for sequence, start, end in layer.step["spans"]:
        q, k, v = (
            x[start:end].view(end - start, n, size).transpose(0, 1)
            for x, n in ((query, heads), (key, kv_heads), (value, kv_heads))
        )
        cached_k, cached_v = layer.cache[sequence]
        k, v = torch.cat([cached_k.to(k.dtype), k], dim=1), torch.cat([cached_v.to(v.dtype), v], dim=1)
        layer.cache[sequence] = (k, v)
        past = k.shape[1] - (end - start)
        visible = torch.arange(k.shape[1])[None, :] <= (past + torch.arange(end - start))[:, None]
        k, v = (x.repeat_interleave(heads // kv_heads, dim=0) for x in (k, v))
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        out[start:end] = attended.transpose(0, 1).reshape(end - start, -1)
    return out, None


def backend_model(folder: str, remote: bool) -> tuple:
    """The folder's base model and LM head as vLLM's Transformers backend builds them: `AutoModel` from the
    config with `_attn_implementation = "vllm"`; a decoder (`get_decoder()`) whose forward takes `input_ids`,
    `inputs_embeds` and `position_ids`; checkpoint names mapped as the backend maps them
    (`<base_model_prefix>.` to the base model, `lm_head.` to its own head, tied to the input embedding when the
    config says so) and loaded strictly; the embedding as wide as `vocab_size`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AttentionInterface, AutoConfig, AutoModel

    AttentionInterface.register("vllm", packed_causal_attention)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    text = config.get_text_config()
    text._attn_implementation = "vllm"
    base = AutoModel.from_config(config, dtype=getattr(torch, BACKEND_DTYPE), trust_remote_code=remote).eval()
    base.set_input_embeddings(base.get_input_embeddings())  # the backend swaps in its own embedding
    # The backend compiles the decoder with these arguments marked dynamic, and refuses a forward without them.
    decoder = type(base.get_decoder())
    missing = {"input_ids", "inputs_embeds", "position_ids"} - set(
        inspect.signature(decoder.forward).parameters
    )
    if missing:
        raise RuntimeError(f"{decoder.__name__}.forward lacks {', '.join(sorted(missing))}")

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    prefix = base.base_model_prefix
    children = {
        name
        for name, _ in itertools.chain(
            base.named_children(), base.named_parameters(recurse=False), base.named_buffers(recurse=False)
        )
    }
    state, head = {}, tensors.pop("lm_head.weight", None)
    for name, tensor in tensors.items():
        if prefix and name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        if name.split(".")[0] not in children:
            raise RuntimeError(f"checkpoint tensor {name!r} has no place in {type(base).__name__}")
        state[name] = tensor
    base.load_state_dict(state, strict=True)
    embedding = base.get_input_embeddings().weight
    if embedding.shape[0] != text.vocab_size:
        raise RuntimeError(f"embedding has {embedding.shape[0]} rows; config.vocab_size is {text.vocab_size}")
    tied = getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    if tied:
        head = embedding
    elif head is None:
        raise RuntimeError(
            "the checkpoint has no lm_head.weight and the config does not tie it to the embedding"
        )
    return base, head.to(embedding.dtype), text


def backend_logits(folder: str, rows: list[list[int]], remote: bool) -> list:
    """Logits at every position of each row when the folder runs as vLLM's Transformers backend runs it
    (`backend_model`): first every row but its last `DECODE_STEPS` tokens packed into one sequence with
    positions restarting at each row (prefill), then one token of each unfinished row per step at its true
    position (decode, against the cached keys and values); each call with `use_cache=False`,
    `return_dict=False` and `attention_instances`."""
    import torch

    base, head, text = backend_model(folder, remote)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    size = getattr(text, "head_dim", None) or text.hidden_size // heads
    step: dict = {}
    instances = {
        index: AttentionLayer(heads, kv_heads, size, len(rows), step)
        for index in range(text.num_hidden_layers)
    }
    prefill = [max(1, len(row) - DECODE_STEPS) for row in rows]
    # Each step: (row, its positions in this step); the prefill step, then one decode step per kept-back token.
    steps = [[(index, range(prefill[index])) for index in range(len(rows))]]
    for offset in range(DECODE_STEPS):
        decoding = [
            (i, range(p + offset, p + offset + 1)) for i, p in enumerate(prefill) if p + offset < len(rows[i])
        ]
        steps += [decoding] if decoding else []
    logits: list[list] = [[] for _ in rows]
    for chunks in steps:
        ends = list(itertools.accumulate(len(positions) for _, positions in chunks))
        step["spans"] = [
            (index, end - len(positions), end) for (index, positions), end in zip(chunks, ends, strict=True)
        ]
        input_ids = torch.tensor([rows[index][p] for index, positions in chunks for p in positions])[None]
        position_ids = torch.tensor([p for _, positions in chunks for p in positions])[None]
        with torch.no_grad():
            outputs = base(
                input_ids=input_ids,
                use_cache=False,
                position_ids=position_ids,
                attention_instances=instances,
                return_dict=False,
            )
            packed = outputs[0][0] @ head.T
        for index, start, end in step["spans"]:
            logits[index].append(packed[start:end])
    return [torch.cat(parts) for parts in logits]


def main(request_path: str) -> None:
    sys.meta_path.insert(0, BlockProject())
    request = json.loads(open(request_path, encoding="utf-8").read())

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = request["folder"]
    remote = request["remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(request.get("tokenizer") or folder, trust_remote_code=remote)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=remote, output_loading_info=True
    )
    loaded = type(model)
    if request.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, request["adapter"])
    model.eval()

    ids = [tokenizer(prompt)["input_ids"] for prompt in request["prompts"]]
    chat = tokenizer.apply_chat_template(request["conversation"], add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([row])).logits[0] for row in ids]
        greedy = model.generate(
            input_ids=torch.tensor([chat_ids]),
            attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=request["greedy_tokens"],
            min_new_tokens=request["greedy_tokens"],
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(chat_ids) :].tolist()
    backend, backend_error = None, None
    if request.get("transformers_backend"):
        try:
            backend = backend_logits(folder, ids, remote)
        except Exception as error:  # reported as a failed check, with the reason
            backend_error = f"{type(error).__name__}: {error}"
    torch.save(
        {
            "loading_problems": loading_problems(info),
            "backend_logits": backend,
            "backend_error": backend_error,
            "ids": ids,
            "chat": chat,
            "chat_ids": chat_ids,
            "logits": logits,
            "greedy": greedy,
            "loaded_class": f"{loaded.__module__}.{loaded.__qualname__}",
            "project_importable": project_importable(),
            "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
        },
        request["out"],
    )


if __name__ == "__main__":
    main(sys.argv[1])
