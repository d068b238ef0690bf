"""Model architectures and their presets: the table every command reads.

Importing this package imports no modelling code (nor torch): each architecture names its classes by import
path, and the model classes below (`DecoderForCausalLM`, ...) are imported on first access, which also
registers every architecture with the Auto classes. In your own code, call `register_auto_classes()` before
`AutoModelForCausalLM.from_pretrained` on a folder of a toolkit architecture (or export it with
`toolkit export vllm --form remote-code`, which needs no toolkit at all).
"""

from toolkit.models.registry import (
    ARCHITECTURES,
    PRESETS,
    Architecture,
    Preset,
    build_config,
    count_parameters,
    get_preset,
    lazy_classes,
    memory_estimate,
    register_architecture,
    register_auto_classes,
)

register_architecture(
    Architecture(
        name="decoder",
        config="toolkit.models.decoder.configuration_decoder:DecoderConfig",
        base_model="toolkit.models.decoder.modeling_decoder:DecoderModel",
        causal_lm="toolkit.models.decoder.modeling_decoder:DecoderForCausalLM",
        sequence_classification="toolkit.models.decoder.modeling_decoder:DecoderForSequenceClassification",
        adapter_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        plan_module="toolkit.models.decoder.export_plan",
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        description="Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention",
    ),
    [
        Preset("decoder-tiny", "decoder", {}, "for tests and the CPU demo"),
        # GPT-2-small's width and depth with Llama's block: the classic 125M comparison point.
        Preset(
            "decoder-125m",
            "decoder",
            dict(
                vocab_size=32000,
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=12,
                max_position_embeddings=2048,
            ),
            "GPT-2-small scale",
        ),
        # TinyLlama-1.1B's shape: a known-good 1B point with 4 KV heads.
        Preset(
            "decoder-1b",
            "decoder",
            dict(
                vocab_size=32000,
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=22,
                num_attention_heads=32,
                num_key_value_heads=4,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            "TinyLlama-1.1B shape",
        ),
    ],
)

register_architecture(
    Architecture(
        name="prometheus",
        config="toolkit.models.prometheus.configuration_prometheus:PrometheusConfig",
        base_model="toolkit.models.prometheus.modeling_prometheus:PrometheusModel",
        causal_lm="toolkit.models.prometheus.modeling_prometheus:PrometheusForCausalLM",
        sequence_classification="toolkit.models.prometheus.modeling_prometheus:PrometheusForSequenceClassification",
        adapter_targets=("qkv_proj", "o_proj", "up_proj", "down_proj"),
        plan_module="toolkit.models.prometheus.export_plan",
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        description="GPT-2-style decoder: learned positions, pre-norm LayerNorm, GELU MLP, biased attention",
    ),
    [
        Preset("prometheus-tiny", "prometheus", {}, "for tests and the CPU demo"),
        # The project's published configuration: GPT-2 small's shape with a 512-token context (≈124M).
        Preset(
            "prometheus-125m",
            "prometheus",
            dict(
                vocab_size=50257,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=512,
                dropout=0.1,
                attention_dropout=0.1,
            ),
            "GPT-2 small shape, 512 context",
        ),
    ],
)

register_architecture(
    Architecture(
        name="codette",
        config="toolkit.models.codette.configuration_codette:CodetteConfig",
        base_model="toolkit.models.codette.modeling_codette:CodetteModel",
        causal_lm="toolkit.models.codette.modeling_codette:CodetteForCausalLM",
        sequence_classification="toolkit.models.codette.modeling_codette:CodetteForSequenceClassification",
        adapter_targets=("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
        plan_module="toolkit.models.codette.export_plan",
        residual_writers=("self_attn.o_proj", "mlp.c_proj"),
        description="RoPE decoder: pre-norm LayerNorm, biased multi-head attention, 4x GELU MLP, tied embeddings",
    ),
    [
        Preset("codette-tiny", "codette", {}, "for tests and the CPU demo"),
        # The project's published configurations: a 32768 vocabulary, 2048 context, dropout 0.1 and a 4x MLP
        # around these widths and depths. Its size labels do not match these shapes; `quoted` keeps its figures
        # beside the count computed here.
        *(
            Preset(
                f"codette-{size}",
                "codette",
                dict(
                    vocab_size=32768,
                    hidden_size=width,
                    intermediate_size=4 * width,
                    num_hidden_layers=layers,
                    num_attention_heads=heads,
                    max_position_embeddings=2048,
                    dropout=0.1,
                    attention_dropout=0.1,
                ),
                f"published '{size}' shape",
                quoted=f"project: {quoted}",
            )
            for size, width, layers, heads, quoted in (
                ("small", 1024, 18, 16, "1.3B, 5.2 GB fp32"),
                ("medium", 2048, 24, 32, "2.7B, 10.8 GB fp32"),
                ("large", 3072, 32, 48, "5.3B, 21.2 GB fp32"),
            )
        ),
    ],
)
# transformers' own BitNet b1.58 model, trained ternary from the start (toolkit/models/bitnet/).
register_architecture(
    Architecture(
        name="bitnet",
        config="transformers:BitNetConfig",
        base_model="transformers:BitNetModel",
        causal_lm="transformers:BitNetForCausalLM",
        sequence_classification="toolkit.models.bitnet.modeling_bitnet:BitNetForSequenceClassification",
        adapter_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        plan_module="toolkit.models.bitnet.export_plan",
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        description="BitNet b1.58 (transformers' BitNetForCausalLM): ternary linear layers, sub-norms, squared ReLU",
    ),
    [
        # decoder-tiny's shape in BitNet's layout; tied embeddings as BitNet b1.58 2B4T (and llama.cpp) has them.
        Preset(
            "bitnet-tiny",
            "bitnet",
            dict(
                vocab_size=4096,
                hidden_size=256,
                intermediate_size=768,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                tie_word_embeddings=True,
                bos_token_id=None,
                eos_token_id=None,
            ),
            "for tests and the CPU demo",
        ),
        Preset(
            "bitnet-125m",
            "bitnet",
            dict(
                vocab_size=32000,
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=12,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=None,
                eos_token_id=None,
            ),
            "GPT-2-small scale",
        ),
        # microsoft/bitnet-b1.58-2B-4T's published shape (BitNetConfig's defaults, tied, 4096 context).
        Preset(
            "bitnet-2b",
            "bitnet",
            dict(max_position_embeddings=4096, tie_word_embeddings=True),
            "BitNet b1.58 2B4T shape",
            quoted="2B",
        ),
    ],
)

# Agent Forge's three Cognate specialisations, as config deltas on cognate-tiny. Reasoning: more recursion and
# one more refinement step; memory: a larger memory behind a short attention window, its gates starting on the
# memory side; speed: one latent update per cycle, half the refinement steps and an earlier halt.
COGNATE_SPECIALISATIONS = {
    "reasoning": dict(h_cycles=3, l_cycles=3, supervision_steps=3),
    "memory": dict(memory_dim=48, sliding_window=16, memory_gate_bias=-2.0),
    "speed": dict(h_cycles=1, l_cycles=1, supervision_steps=1, halt_threshold=0.3),
}
# The same on cognate-25m, whose base runs 4 refinement steps and a 256-token window.
COGNATE_25M_SPECIALISATIONS = {
    "reasoning": dict(h_cycles=3, l_cycles=3, supervision_steps=6),
    "memory": dict(memory_dim=64, sliding_window=64, memory_gate_bias=-2.0),
    "speed": dict(h_cycles=1, l_cycles=1, supervision_steps=2, halt_threshold=0.3),
}
COGNATE_25M = dict(
    vocab_size=32000,
    hidden_size=320,
    intermediate_size=864,
    num_hidden_layers=8,
    num_attention_heads=8,
    max_position_embeddings=2048,
    sliding_window=256,
    memory_heads=8,
    memory_dim=40,
    h_cycles=2,
    l_cycles=3,
    supervision_steps=4,
    halting="adaptive",
)

# TRM-style recursion with a Titans MAG memory and ACT halting (toolkit/models/cognate/).
register_architecture(
    Architecture(
        name="cognate",
        config="toolkit.models.cognate.configuration_cognate:CognateConfig",
        base_model="toolkit.models.cognate.modeling_cognate:CognateModel",
        causal_lm="toolkit.models.cognate.modeling_cognate:CognateForCausalLM",
        sequence_classification="toolkit.models.cognate.modeling_cognate:CognateForSequenceClassification",
        # PEFT's "all-linear" set: the memory's projections share the attention's names; its rates, the MAG
        # gate and the halting head are adapted too.
        adapter_targets=(
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "rates",
            "memory_gate",
            "halt_head",
        ),
        plan_module="toolkit.models.cognate.export_plan",
        # No DFS merge: a block's input is a sum of streams, so a layer scale does not fold into weights.
        residual_writers=(),
        description="recursive refinement (TRM) with a gated long-term memory (Titans MAG) and ACT halting",
    ),
    [
        Preset("cognate-tiny", "cognate", {}, "for tests and the CPU demo"),
        # The seed's size: ~25M parameters, 8 blocks, a 32000 vocabulary.
        Preset("cognate-25m", "cognate", COGNATE_25M, "the seed's ~25M, 8 blocks"),
        *(
            Preset(f"cognate-tiny-{name}", "cognate", delta, f"cognate-tiny, {name} specialisation")
            for name, delta in COGNATE_SPECIALISATIONS.items()
        ),
        *(
            Preset(
                f"cognate-25m-{name}",
                "cognate",
                {**COGNATE_25M, **delta},
                f"cognate-25m, {name} specialisation",
            )
            for name, delta in COGNATE_25M_SPECIALISATIONS.items()
        ),
    ],
)

# A teacher's embeddings through a 3D lattice of gMLP cells (toolkit/models/lattice/): not a language model.
register_architecture(
    Architecture(
        name="lattice",
        config="toolkit.models.lattice.configuration_lattice:LatticeConfig",
        base_model="toolkit.models.lattice.modeling_lattice:LatticeModel",
        causal_lm=None,
        description="teacher embeddings -> adapter -> lattice of gMLP cells -> answer embedding",
        plan_module="toolkit.models.lattice.export_plan",
    ),
    [
        Preset("lattice-tiny", "lattice", {}, "4x4x3 cells over 64-d embeddings, for tests and the CPU demo"),
        # The seed's: 15 x 15 surfaces, 11 layers (2,475 cells), Llama-3-8B's 4096-d embeddings; the adapter's
        # widths give its ~45.9M parameters.
        Preset(
            "lattice-15x15x11",
            "lattice",
            dict(
                teacher_dim=4096,
                height=15,
                width=15,
                depth=11,
                cell_dim=32,
                cell_hidden=128,
                adapter_hidden=[8192, 1472],
            ),
            "the seed's 15x15x11 lattice for Llama-3-8B embeddings",
        ),
    ],
)

# The model classes, importable from here; each is loaded on first access, with the Auto classes registered.
__getattr__ = lazy_classes(
    __name__,
    {
        f"{name}{suffix}": f"{name.lower()}.{'configuration' if suffix == 'Config' else 'modeling'}_{name.lower()}"
        for name in ("Decoder", "Prometheus", "Codette")
        for suffix in ("Config", "Model", "ForCausalLM")
    },
)

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Architecture",
    "Preset",
    "build_config",
    "count_parameters",
    "get_preset",
    "memory_estimate",
    "register_architecture",
    "register_auto_classes",
]
