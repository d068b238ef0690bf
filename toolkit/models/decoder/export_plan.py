"""Export plan of `decoder`: its tensors and config fields are Llama's, so it becomes llama.cpp's `llama`.

Being Llama-shaped is the point of the architecture (see configuration_decoder.py): the GGUF plan is the native
Llama plan, registered under this model_type, and llama.cpp runs it with its own graph. For vLLM the folder is
rewritten into transformers' `LlamaForCausalLM` (same names, nothing to rename), which vLLM runs natively; the
model also follows the attention interface, so a remote-code folder served by vLLM's Transformers backend works.
"""

from toolkit.models.plans import LLAMA_GGUF, ExportPlan, VLLMPlan, register_plan

register_plan(
    ExportPlan(
        "decoder",
        gguf=LLAMA_GGUF,
        vllm=VLLMPlan(architecture="LlamaForCausalLM", model_type="llama", remote_code=True),
    )
)
