"""Export plan of `cognate`: no GGUF and no vLLM, each for a stated reason; the Hub remote-code folder is its
export (transformers runs the copied modelling files).

Why not llama.cpp: its graphs make one pass through the blocks per token with one KV cache per block, and
compute attention and feed-forward layers only. A cognate token runs the block stack
supervision_steps x h_cycles x (l_cycles + 1) times with the same weights, each application on a different
sum of streams (x + y + z, then y + z) and with its own keys; and every block carries a long-term memory, a
per-head matrix rewritten at each token by a momentum gradient step, which no llama.cpp graph computes.
Unrolling a fixed number of steps does not help: the unrolled blocks still read sums of three streams and
the memory recurrence, neither of which a llama.cpp graph (or a plain decoder checkpoint) can express.

Why not vLLM: its Transformers backend gives each attention module, one per `num_hidden_layers` entry, one
paged KV cache (an `Attention` instance attached to the module) and expects the module to run once per
token. A cognate block's attention runs many times per token on different inputs, so those calls would
write one another's keys into the same slots; and the memory's per-sequence recurrent state has no place in
vLLM's cache (it keeps recurrent state only for its own Mamba-style layers).
"""

from toolkit.models.plans import ExportPlan, VLLMPlan, register_plan

register_plan(
    ExportPlan(
        "cognate",
        gguf_blocker=(
            "its block stack runs supervision_steps x h_cycles x (l_cycles + 1) times per token on sums of "
            "streams, with a memory recurrence in every block; llama.cpp's graphs run each block once per token"
        ),
        vllm=VLLMPlan(
            blocker=(
                "its Transformers backend keeps one KV cache per attention module, written once per token, "
                "while cognate's attention runs many times per token and its memory state has no place in "
                "vLLM's cache; the Hub remote-code folder runs it in transformers"
            )
        ),
    )
)
