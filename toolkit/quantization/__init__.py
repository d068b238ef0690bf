"""Quantization that changes how a model trains: BitNet b1.58 ternary quantization-aware training
(`model.quantization: {method: bitnet}`). Post-training formats (GGUF types, 4-bit QLoRA bases) live with
their consumers (export/, transformers' BitsAndBytesConfig)."""
