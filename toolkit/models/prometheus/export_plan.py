"""Export plan of `prometheus`: llama.cpp's `gpt2` graph for GGUF, transformers' `GPT2LMHeadModel` for vLLM.

GGUF: llama.cpp's `gpt2` graph is this block (learned positions, pre-norm LayerNorm with biases, fused
biased q/k/v, tanh-GELU MLP, tied output). Our projections are `nn.Linear`, already the [out, in] layout
llama.cpp wants, so every tensor is copied as it is; only the names change.

vLLM: the folder is rewritten into `GPT2LMHeadModel`, which vLLM runs natively. Config keys take GPT-2's
names, tensor names GPT-2's layout (`transformer.h.{i}.attn.c_attn`, ...), and the four projection weights
are transposed into `Conv1D`'s [in, out] storage. The model also follows the attention interface, so a
remote-code folder served by vLLM's Transformers backend works too.
"""

from toolkit.models.plans import (
    LAYER_NORM_EPS,
    SHAPE_HPARAMS,
    ConfigCheck,
    ExportPlan,
    GGUFPlan,
    TensorRule,
    VLLMPlan,
    register_plan,
)

_BLOCK = "model.layers.{bid}"

GPT2_GGUF = GGUFPlan(
    arch="gpt2",
    # The shape keys with a LayerNorm epsilon; llama.cpp's gpt2 loader reads exactly these.
    hparams=SHAPE_HPARAMS + (LAYER_NORM_EPS,),
    tensors=(
        TensorRule("model.embed_tokens.weight", "token_embd.weight"),
        TensorRule("model.embed_positions.weight", "position_embd.weight"),
        TensorRule(f"{_BLOCK}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
        TensorRule(f"{_BLOCK}.input_layernorm.bias", "blk.{bid}.attn_norm.bias"),
        TensorRule(f"{_BLOCK}.self_attn.qkv_proj.weight", "blk.{bid}.attn_qkv.weight"),
        TensorRule(f"{_BLOCK}.self_attn.qkv_proj.bias", "blk.{bid}.attn_qkv.bias"),
        TensorRule(f"{_BLOCK}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
        TensorRule(f"{_BLOCK}.self_attn.o_proj.bias", "blk.{bid}.attn_output.bias"),
        TensorRule(f"{_BLOCK}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
        TensorRule(f"{_BLOCK}.post_attention_layernorm.bias", "blk.{bid}.ffn_norm.bias"),
        TensorRule(f"{_BLOCK}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
        TensorRule(f"{_BLOCK}.mlp.up_proj.bias", "blk.{bid}.ffn_up.bias"),
        TensorRule(f"{_BLOCK}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
        TensorRule(f"{_BLOCK}.mlp.down_proj.bias", "blk.{bid}.ffn_down.bias"),
        TensorRule("model.norm.weight", "output_norm.weight"),
        TensorRule("model.norm.bias", "output_norm.bias"),
        # Absent when tied: llama.cpp then reads token_embd as the output projection.
        TensorRule("lm_head.weight", "output.weight", optional=True),
    ),
    # llama.cpp's gpt2 graph has one GELU, the tanh approximation.
    checks=(ConfigCheck("hidden_act", ("gelu_new", "gelu_pytorch_tanh"), "activation (hidden_act)"),),
)

# Applied in order to full tensor names: the block prefix first, then the parts inside a block.
GPT2_RENAMES: tuple[tuple[str, str], ...] = (
    (r"model\.layers\.", "transformer.h."),
    (r"\.input_layernorm\.", ".ln_1."),
    (r"\.self_attn\.qkv_proj\.", ".attn.c_attn."),
    (r"\.self_attn\.o_proj\.", ".attn.c_proj."),
    (r"\.post_attention_layernorm\.", ".ln_2."),
    (r"\.mlp\.up_proj\.", ".mlp.c_fc."),
    (r"\.mlp\.down_proj\.", ".mlp.c_proj."),
    (r"model\.embed_tokens\.", "transformer.wte."),
    (r"model\.embed_positions\.", "transformer.wpe."),
    (r"model\.norm\.", "transformer.ln_f."),
)

register_plan(
    ExportPlan(
        "prometheus",
        gguf=GPT2_GGUF,
        vllm=VLLMPlan(
            architecture="GPT2LMHeadModel",
            model_type="gpt2",
            config_keys={
                "hidden_size": "n_embd",
                "num_hidden_layers": "n_layer",
                "num_attention_heads": "n_head",
                "max_position_embeddings": "n_positions",
                "intermediate_size": "n_inner",
                "hidden_act": "activation_function",
                "dropout": "resid_pdrop",
                "attention_dropout": "attn_pdrop",
                "layer_norm_eps": "layer_norm_epsilon",
            },
            tensor_renames=GPT2_RENAMES,
            tensor_transforms=((r"\.(c_attn|c_proj|c_fc)\.weight$", "transpose"),),
            remote_code=True,
        ),
    )
)
