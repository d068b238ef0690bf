"""Export plan of `decoder`: its tensors and config fields are Llama's, so it becomes llama.cpp's `llama`.

Being Llama-shaped is the point of the architecture (see configuration_decoder.py): the plan is the native
Llama plan, registered under this model_type, and llama.cpp runs it with its own graph.
"""

from toolkit.models.plans import LLAMA_GGUF, ExportPlan, register_plan

register_plan(ExportPlan("decoder", gguf=LLAMA_GGUF))
