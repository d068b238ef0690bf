"""Size and decode speed of a BitNet model's ternary GGUF against f16 and q8_0 of the same model, in llama.cpp.

    python bench/bitnet.py [--presets decoder-tiny,decoder-125m] [--tokens 128] [--threads 2]

Each preset is built with random weights, its attention and MLP layers made BitNet layers
(toolkit.quantization.bitnet), saved, and exported to f32, f16, q8_0, tq2_0 and tq1_0 (every file holds the
same ternary layers; embeddings and head are float16 in the TQ files). Printed: bytes of each file and its
ratio to f32 and f16, and greedy decode tokens/s (best of alternating rounds, export.llama_cpp.decode_speeds) with
the ratio to f16. Goals (the issue's): TQ2_0 at least 2x the decode speed of f16 and at least 6x smaller than
f32 for the tiny preset. No assertions: timings on a shared machine are figures to read.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from export_gguf import ROOT  # bench/ is on sys.path

from export.llama_cpp import decode_speeds

TYPES = ("f32", "f16", "q8_0", "tq2_0", "tq1_0")


def bitnet_checkpoint(preset: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.data.tokenizer import train_tokenizer
    from toolkit.models import build_config, register_auto_classes
    from toolkit.quantization.bitnet import to_bitnet

    register_auto_classes()
    tokenizer = train_tokenizer([str(ROOT / "data/corpus/valid.jsonl")], 4096, folder)
    torch.manual_seed(0)
    config = build_config(preset, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    to_bitnet(model)
    model.save_pretrained(folder)
    return folder


def main() -> None:
    from export.gguf import export_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="decoder-tiny,decoder-125m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            folder = bitnet_checkpoint(preset, Path(tmp) / preset)
            files = [export_gguf(folder, q, folder / f"{q}.gguf", verify=False).path for q in TYPES]
            speeds = decode_speeds(files, args.tokens, args.threads)
            sizes = [f.stat().st_size for f in files]
            print(f"\n{preset} (BitNet layers, random weights), {args.threads} threads, {args.tokens} tokens")
            print(f"{'type':<7} {'MB':>8} {'f32/size':>9} {'f16/size':>9} {'tok/s':>8} {'vs f16':>7}")
            for quant, size, speed in zip(TYPES, sizes, speeds, strict=True):
                print(
                    f"{quant:<7} {size / 1e6:>8.2f} {sizes[0] / size:>8.2f}x {sizes[1] / size:>8.2f}x "
                    f"{speed:>8.1f} {speed / speeds[1]:>6.2f}x"
                )


if __name__ == "__main__":
    main()
