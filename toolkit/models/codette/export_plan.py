"""Export plan of `codette`: llama.cpp's `starcoder2` graph for GGUF, transformers' `Starcoder2ForCausalLM`
for vLLM.

GGUF: llama.cpp's `starcoder2` graph is this block: LayerNorm with bias before attention and MLP, separate
q/k/v projections with NEOX RoPE (HF's rotate-half layout, so no row permutation), a biased output
projection, sequential residuals, a non-gated GELU MLP (ffn_up, ffn_down) and a biased final norm, the output
projection falling back to token_embd when tied. Its GELU is the tanh approximation (`ggml_gelu`), hence the
activation check. Its loader requires the biases of attn_output, ffn_up and ffn_down (q/k/v ones are
optional): a model built with `bias=False` gets zeros there, which compute exactly what no bias does.

vLLM: the folder is rewritten into `Starcoder2ForCausalLM`, which vLLM runs natively. Tensor names are
already Starcoder2's (see modeling_codette.py); only config keys are renamed. Starcoder2's `use_bias` covers
the same six linear layers as our `bias` and its LayerNorms always carry a bias, so both settings map as they
are. Our one dropout rate feeds both of Starcoder2's (residual, embedding); the dropout inside our MLP has no
Starcoder2 counterpart, which matters only to training the exported folder further, never to its outputs.
The model also follows the attention interface, so a remote-code folder served by vLLM's Transformers backend
works too.
"""

from toolkit.models.plans import (
    LAYER_NORM_EPS,
    ROPE_HPARAMS,
    ConfigCheck,
    ExportPlan,
    GGUFPlan,
    TensorRule,
    VLLMPlan,
    register_plan,
    rope_type,
)

_BLOCK = "model.layers.{bid}"


def _hidden(config: dict) -> tuple[int, ...]:
    return (config["hidden_size"],)


def _intermediate(config: dict) -> tuple[int, ...]:
    return (config["intermediate_size"],)


STARCODER2_GGUF = GGUFPlan(
    arch="starcoder2",
    # The RoPE graphs' keys with a LayerNorm epsilon; llama.cpp's starcoder2 loader reads exactly these.
    hparams=ROPE_HPARAMS + (LAYER_NORM_EPS,),
    tensors=(
        TensorRule("model.embed_tokens.weight", "token_embd.weight"),
        TensorRule(f"{_BLOCK}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
        TensorRule(f"{_BLOCK}.input_layernorm.bias", "blk.{bid}.attn_norm.bias"),
        TensorRule(f"{_BLOCK}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight"),
        TensorRule(f"{_BLOCK}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight"),
        TensorRule(f"{_BLOCK}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight"),
        TensorRule(f"{_BLOCK}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias", optional=True),
        TensorRule(f"{_BLOCK}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias", optional=True),
        TensorRule(f"{_BLOCK}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias", optional=True),
        TensorRule(f"{_BLOCK}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
        TensorRule(f"{_BLOCK}.self_attn.o_proj.bias", "blk.{bid}.attn_output.bias", zeros=_hidden),
        TensorRule(f"{_BLOCK}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
        TensorRule(f"{_BLOCK}.post_attention_layernorm.bias", "blk.{bid}.ffn_norm.bias"),
        TensorRule(f"{_BLOCK}.mlp.c_fc.weight", "blk.{bid}.ffn_up.weight"),
        TensorRule(f"{_BLOCK}.mlp.c_fc.bias", "blk.{bid}.ffn_up.bias", zeros=_intermediate),
        TensorRule(f"{_BLOCK}.mlp.c_proj.weight", "blk.{bid}.ffn_down.weight"),
        TensorRule(f"{_BLOCK}.mlp.c_proj.bias", "blk.{bid}.ffn_down.bias", zeros=_hidden),
        TensorRule("model.norm.weight", "output_norm.weight"),
        TensorRule("model.norm.bias", "output_norm.bias"),
        # Absent when tied: llama.cpp then reads token_embd as the output projection.
        TensorRule("lm_head.weight", "output.weight", optional=True),
    ),
    checks=(
        ConfigCheck("hidden_act", ("gelu_pytorch_tanh", "gelu_new"), "activation (hidden_act)"),
        ConfigCheck(rope_type, ("default",), "RoPE scaling (rope_parameters.rope_type)"),
        # The graph rotates every dimension of the head (n_rot == head_dim is asserted).
        ConfigCheck(
            "rope_parameters.partial_rotary_factor",
            (None, 1.0),
            "partial rotary (rope_parameters.partial_rotary_factor)",
        ),
    ),
)

register_plan(
    ExportPlan(
        "codette",
        gguf=STARCODER2_GGUF,
        vllm=VLLMPlan(
            architecture="Starcoder2ForCausalLM",
            model_type="starcoder2",
            config_keys={
                "layer_norm_eps": "norm_epsilon",
                "bias": "use_bias",
                "dropout": ("residual_dropout", "embedding_dropout"),
            },
            remote_code=True,
        ),
    )
)
