"""Export plan of `lattice`: no GGUF and no vLLM, each for a stated reason; the Hub remote-code folder is its
export (transformers runs the copied modelling files).

Why not llama.cpp or vLLM: both run language models, token by token, with a vocabulary, a KV cache and logits
over it. A lattice maps one embedding vector to another: no tokens, no sequence, no logits, no generation. Its
cells are a grid of per-cell gMLPs that no llama.cpp graph describes, and vLLM serves generative (or pooling)
transformers over token ids, not a model whose input is a teacher's embedding.
"""

from toolkit.models.plans import ExportPlan, VLLMPlan, register_plan

register_plan(
    ExportPlan(
        "lattice",
        gguf_blocker=(
            "it maps a teacher's embedding vector to another through a grid of per-cell gMLPs: no tokens, no "
            "vocabulary, no logits, while llama.cpp's graphs are token-by-token language models"
        ),
        vllm=VLLMPlan(
            blocker=(
                "vLLM serves language models over token ids; a lattice takes and returns embedding vectors, "
                "with no tokens to generate; the Hub remote-code folder runs it in transformers"
            )
        ),
    )
)
