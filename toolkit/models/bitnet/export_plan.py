"""Export plan of `bitnet` (transformers' BitNet b1.58): llama.cpp's own `bitnet` graph, what runs and what not.

Its tensors are Llama's plus the two sub-norms (`attn_sub_norm` before the attention output, `ffn_sub_norm`
before the down projection), which llama.cpp names `blk.N.attn_sub_norm` / `blk.N.ffn_sub_norm`; RoPE is
NEOX-style in both, so q and k keep their rows. Read from llama.cpp's `src/models/bitnet.cpp` (the version
llama-cpp-python vendors), two differences decide what runs:
- its MLP activation is SiLU, where BitNet b1.58 (and transformers' default, `relu2`) squares a ReLU: a
  `relu2` model would run in llama.cpp as another function, so it is refused, naming `hidden_act`; a model
  trained with `hidden_act: silu` runs with the same logits;
- its output projection is always `token_embd`: an untied LM head is refused, naming `tie_word_embeddings`.
The ternary layers are written as TQ1_0/TQ2_0 (export/gguf.py), whose per-block scale holds BitNet's
per-tensor scale exactly, so the graph's optional per-tensor `.scale` tensors are not needed.
vLLM has no BitNet quantization (`quant_method: bitnet`), so there is no vLLM route.
"""

from toolkit.models.plans import (
    _EDGE_RULES,
    LLAMA_HPARAMS,
    ConfigCheck,
    ExportPlan,
    GGUFPlan,
    TensorRule,
    VLLMPlan,
    _block_rules,
    register_plan,
    rope_type,
)

BLOCK = "model.layers.{bid}"

BITNET_GGUF = GGUFPlan(
    arch="bitnet",
    hparams=LLAMA_HPARAMS,
    tensors=tuple(rule for rule in _EDGE_RULES if rule.target != "output.weight")
    + _block_rules(None, None, qkv_bias_optional=True)
    + (
        TensorRule(f"{BLOCK}.self_attn.attn_sub_norm.weight", "blk.{bid}.attn_sub_norm.weight"),
        TensorRule(f"{BLOCK}.mlp.ffn_sub_norm.weight", "blk.{bid}.ffn_sub_norm.weight"),
    ),
    checks=(
        ConfigCheck(rope_type, ("default",), "RoPE scaling (rope_parameters.rope_type)"),
        ConfigCheck(
            "hidden_act",
            ("silu",),
            "activation (hidden_act; llama.cpp's bitnet graph computes SiLU: train with model.config.hidden_act: "
            "silu for a GGUF)",
        ),
        ConfigCheck(
            "tie_word_embeddings",
            (True,),
            "untied LM head (tie_word_embeddings; llama.cpp's bitnet graph projects with token_embd)",
        ),
        ConfigCheck("attention_bias", (None, False), "attention biases (attention_bias)"),
    ),
    ignored=("model.layers.{bid}.self_attn.rotary_emb.inv_freq",),
)

register_plan(
    ExportPlan(
        "bitnet",
        gguf=BITNET_GGUF,
        vllm=VLLMPlan(blocker="its BitNet quantization (quant_method: bitnet), for which vLLM has no kernel"),
        notes=("hidden_act silu and tied embeddings: what llama.cpp's bitnet graph computes",),
    )
)
