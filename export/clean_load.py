"""Load an exported HF folder the way a machine without forge-toolkit would, and record what it computes.

Run as a script in a fresh interpreter (`python -I export/clean_load.py REQUEST.json`) by `export/verify_hf.py`;
never imported. An import hook makes `toolkit`, `export` and `eval` unimportable, so the folder must stand on
its own: transformers' native class, or its own modelling files through `trust_remote_code=True`. Imports
only the standard library, torch, transformers and (for adapters) peft.

A model that is not a language model (request kind "outputs") is loaded with AutoModel and run on the saved
inputs of the request; its output tensors are saved instead.

The request names the folder, the prompts and the conversation; the result (token ids, logits at every
position, a greedy continuation, the class that was loaded, the checkpoint names transformers did not match)
is saved with `torch.save` to the request's `out` path for the parent process to compare with the source model.

How vLLM's Transformers backend runs a remote-code folder is checked by vLLM itself (`export/verify_vllm.py`,
with the vLLM environment), not emulated here.
"""

import importlib.abc
import json
import sys

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


def main(request_path: str) -> None:
    sys.meta_path.insert(0, BlockProject())
    request = json.loads(open(request_path, encoding="utf-8").read())

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = request["folder"]
    remote = request["remote_code"]
    if request.get("kind") == "outputs":
        outputs_of(request)
        return
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
    torch.save(
        {
            "loading_problems": loading_problems(info),
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


def outputs_of(request: dict) -> None:
    """A model that is not a language model: loaded with AutoModel, run on the request's saved inputs; every
    tensor of its output saved."""
    import torch
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        request["folder"],
        dtype=torch.float32,
        trust_remote_code=request["remote_code"],
        output_loading_info=True,
    )
    loaded = type(model)
    inputs = torch.load(request["inputs"], weights_only=True)
    with torch.no_grad():
        out = model.eval()(**inputs)
    torch.save(
        {
            "loading_problems": loading_problems(info),
            "outputs": {name: value for name, value in out.items() if isinstance(value, torch.Tensor)},
            "loaded_class": f"{loaded.__module__}.{loaded.__qualname__}",
            "project_importable": project_importable(),
        },
        request["out"],
    )


if __name__ == "__main__":
    main(sys.argv[1])
