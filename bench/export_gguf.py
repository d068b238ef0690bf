"""Our GGUF export against llama.cpp's own `convert_hf_to_gguf.py`, on one `decoder-125m` checkpoint.

    python bench/export_gguf.py [--llama-cpp-dir DIR] [--work DIR] [--tokens 128] [--rows f16,q8_0,q4_k_m,families]

Measures, for f16 and q8_0: wall time and peak RSS of each converter (each runs in its own process, measured
from /proc VmHWM, Linux only), decode tokens/s of each resulting file in llama.cpp (same prompt, greedy, same
threads, best of 7 alternating rounds), and whether the two files hold the same tensor bytes.
Prints the ratios against the goals (time <= 0.8x, memory <= 1.0x, decode >= 0.98x). No assertions: timings
on a shared machine are figures to read, not tests.

For Q4_K_M: our one-pass export against `convert_hf_to_gguf.py` followed by llama.cpp's quantizer
(`llama_model_quantize`, what the `llama-quantize` tool runs, called through llama-cpp-python in its own
process), twice: from an f32 intermediate (the checkpoint's precision: the two files must hold the same bytes)
and from an f16 one (the usual route). Their time is the sum of both steps, their memory the larger peak, and
the disk figures are the most bytes the output folder held at once (sampled every 10 ms): theirs holds the
intermediate and the final file together. Goal: time <= 0.5x.

For each Hub family with an export plan (Llama 3.1 with its RoPE scaling, Qwen3, OLMo 2, Phi-3, SmolLM3,
Gemma 3): a ~125M model of transformers' own class with random weights, saved in bfloat16 as Hub checkpoints
are, and the toolkit's tokenizer; f16 from both converters, time and memory ratios, same tensors. Two
differences are expected there: Llama 3.1's `rope_freqs.weight` (ours from transformers' own frequencies in
float64, theirs in float32: 4.8e-7 apart), and Gemma 3's `token_embd.weight`, whose rows past the tokenizer
their converter drops (ours keeps one row per embedding row, with placeholder tokens).

`convert_hf_to_gguf.py` comes from llama-cpp-python's source distribution, which vendors llama.cpp: pass
`--llama-cpp-dir` (or set LLAMA_CPP_DIR) to a llama.cpp checkout, or let the bench `pip download` the sdist
of the installed llama-cpp-python into the work folder. Two adaptations let it read our checkpoint, both at
run time and outside its code: it reads a copy of config.json that names the checkpoint `LlamaForCausalLM`
(the tensors are Llama's, see toolkit/models/decoder/configuration_decoder.py), and its pre-tokenizer lookup
(a hash of token ids over known tokenizers, which refuses any newly trained one) is replaced by the name
`qwen2`, which is what the toolkit's tokenizer is (see CONVERT_WRAPPER).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from export.llama_cpp import decode_speeds

ROOT = Path(__file__).resolve().parents[1]

# Peak memory is the process's own VmHWM, written at exit: rusage's ru_maxrss also counts the launching
# process's memory from before exec (Linux carries the old address space's high-water mark over), which put
# the bench's own llama.cpp models into the converters' figures.
HWM_PRELUDE = """
import atexit, os
def _write_hwm():
    with open("/proc/self/status") as status, open(os.environ["FORGE_BENCH_HWM"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(_write_hwm)
"""
OURS = (
    HWM_PRELUDE
    + """
import runpy, sys
sys.argv[0] = "export.cli"
runpy.run_module("export.cli", run_name="__main__")
"""
)

# Runs their converter with the pre-tokenizer lookup answered by name, and their Llama vocabulary taken
# straight to byte-level BPE (it first tries SentencePiece, which needs the sentencepiece package and a
# tokenizer.model that a byte-level BPE checkpoint does not have): argv[1] is the llama.cpp folder.
CONVERT_WRAPPER = (
    HWM_PRELUDE
    + """
import sys
from pathlib import Path
llama_cpp_dir = Path(sys.argv.pop(1))
sys.path.insert(0, str(llama_cpp_dir))
sys.argv[0] = str(llama_cpp_dir / "convert_hf_to_gguf.py")
import importlib.util
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", sys.argv[0])
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)
from conversion import base, llama
from conversion import phi
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
phi.Phi3MiniModel.set_vocab = lambda self: self._set_vocab_gpt2()
convert.main()
"""
)


# llama.cpp's quantizer on a GGUF, as the llama-quantize tool runs it: argv[1] source, argv[2] output.
QUANTIZE = (
    HWM_PRELUDE
    + """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""
)


class DiskPeak:
    """The most bytes the files of `folder` held at once while the block ran, sampled every 10 ms."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak = folder, 0

    def sample(self) -> None:
        total = 0
        for item in self.folder.iterdir():
            try:
                total += item.stat().st_size
            except FileNotFoundError:  # renamed or removed between listing and stat
                pass
        self.peak = max(self.peak, total)

    def __enter__(self) -> DiskPeak:
        import threading

        self.stop = threading.Event()

        def poll() -> None:
            while not self.stop.wait(0.01):
                self.sample()

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()


def find_llama_cpp(explicit: str | None, work: Path) -> Path:
    """A folder holding convert_hf_to_gguf.py: given, from LLAMA_CPP_DIR, or unpacked from the sdist."""
    for candidate in (explicit, os.environ.get("LLAMA_CPP_DIR")):
        if candidate and (Path(candidate) / "convert_hf_to_gguf.py").exists():
            return Path(candidate)
    version = importlib.metadata.version("llama-cpp-python")
    vendored = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (vendored / "convert_hf_to_gguf.py").exists():
        sdist = work / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.exists():
            print(f"downloading the llama-cpp-python {version} sdist for convert_hf_to_gguf.py ...")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={version}", "-d", str(work)],
                check=True,
            )  # fmt: skip
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = (prefix + "convert_hf_to_gguf.py", prefix + "gguf-py/", prefix + "conversion/")
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(wanted)]
            archive.extractall(work, members=members, filter="data")
    return vendored


def build_checkpoint(work: Path) -> tuple[Path, Path]:
    """decoder-125m with random weights and a toolkit tokenizer; and a Llama-named view of it for llama.cpp."""
    import torch

    from toolkit.data.tokenizer import train_tokenizer
    from toolkit.models import DecoderForCausalLM, build_config

    ours = work / "decoder-125m"
    if not (ours / "model.safetensors").exists():
        tokenizer = train_tokenizer([str(ROOT / "data/corpus/valid.jsonl")], 32000, ours)
        torch.manual_seed(0)
        config = build_config("decoder-125m", eos_token_id=tokenizer.eos_token_id)
        DecoderForCausalLM(config).save_pretrained(ours)
    return ours, llama_view(ours, work / "decoder-125m-as-llama")


def llama_view(ours: Path, view: Path) -> Path:
    """`view`: the files of the decoder checkpoint `ours` (symlinks) under a config naming it Llama."""
    view.mkdir(exist_ok=True)
    for item in ours.iterdir():
        if item.name != "config.json" and not (view / item.name).exists():
            (view / item.name).symlink_to(item)
    config = json.loads((ours / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view


FAMILY_SHAPE = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    # Inside this vocabulary (Phi-3's pad and Llama 3's BOS/EOS defaults are not).
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}


def family_checkpoint(family: str, tokenizer_from: Path, work: Path) -> Path:
    """A ~125M model of `family` (transformers' own config and model class), bfloat16, random weights."""
    import shutil

    import torch
    import transformers

    folder = work / f"family-{family}"
    if (folder / "model.safetensors").exists():
        return folder
    config_class, model_class, extra = {
        "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
        "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
        "gemma3": (
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            # The attention scale of llama.cpp's gemma3 graph is 1/sqrt(head_dim), as in Gemma 3 1B.
            {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 512},
        ),
    }[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**FAMILY_SHAPE, **extra)
    model = getattr(transformers, model_class)(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def family_row(family: str, tokenizer_from: Path, llama_cpp_dir: Path, args: argparse.Namespace):
    """One family's f16 export by both converters: (family, ours (s, MiB), theirs (s, MiB), same tensors)."""
    folder = family_checkpoint(family, tokenizer_from, args.work)
    ours_out, theirs_out = args.work / f"ours-{family}-f16.gguf", args.work / f"theirs-{family}-f16.gguf"
    ours = measure(
        [sys.executable, "-c", OURS, "gguf", str(folder), "--quant", "f16",
         "--out", str(ours_out), "--force", "--no-verify"],
        args.work,
    )  # fmt: skip
    theirs = measure(
        [sys.executable, "-c", CONVERT_WRAPPER, str(llama_cpp_dir), str(folder),
         "--outtype", "f16", "--outfile", str(theirs_out)],
        args.work,
    )  # fmt: skip
    return family, ours, theirs, same_tensors(ours_out, theirs_out)


def measure(command: list[str], work: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of `command`, a Python process that writes its VmHWM at exit."""
    hwm = work / "hwm.txt"
    hwm.unlink(missing_ok=True)
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "FORGE_BENCH_HWM": str(hwm)}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, int(hwm.read_text()) / 1024  # VmHWM is in KiB


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types, shapes and bytes."""
    import gguf
    import numpy as np

    def tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], np.ndarray]]:
        reader = gguf.GGUFReader(path)
        return {t.name: (int(t.tensor_type), tuple(t.shape), t.data) for t in reader.tensors}

    ours, theirs = tensors(a), tensors(b)
    return ours.keys() == theirs.keys() and all(
        ours[k][:2] == theirs[k][:2] and np.array_equal(ours[k][2], theirs[k][2]) for k in ours
    )


def kquant_row(via: str, ours_src: Path, theirs_src: Path, llama_cpp_dir: Path, args: argparse.Namespace):
    """One Q4_K_M row: ours in one pass; theirs through an intermediate file of type `via`."""
    import shutil

    threads = os.cpu_count() or 1  # both quantize on every core, llama.cpp's default
    folders = {side: args.work / f"q4_k_m-{side}-{via}" for side in ("ours", "theirs")}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    ours_out, theirs_out = folders["ours"] / "ours.gguf", folders["theirs"] / "theirs.gguf"
    with DiskPeak(folders["ours"]) as ours_disk:
        seconds, memory = measure(
            [sys.executable, "-c", OURS, "gguf", str(ours_src), "--quant", "q4_k_m",
             "--out", str(ours_out), "--force", "--no-verify", "--threads", str(threads)],
            args.work,
        )  # fmt: skip
    intermediate = folders["theirs"] / f"intermediate-{via}.gguf"
    with DiskPeak(folders["theirs"]) as theirs_disk:
        convert_s, convert_mib = measure(
            [sys.executable, "-c", CONVERT_WRAPPER, str(llama_cpp_dir), str(theirs_src),
             "--outtype", via, "--outfile", str(intermediate)],
            args.work,
        )  # fmt: skip
        quantize_s, quantize_mib = measure(
            [sys.executable, "-c", QUANTIZE, str(intermediate), str(theirs_out), str(threads)], args.work
        )
    speed = tuple(decode_speeds([ours_out, theirs_out], args.tokens, args.threads))
    return (
        via,
        (seconds, memory, ours_disk.peak),
        (convert_s, quantize_s, max(convert_mib, quantize_mib), theirs_disk.peak),
        speed,
        same_tensors(ours_out, theirs_out),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-cpp-dir", default=None, help="folder with convert_hf_to_gguf.py")
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "forge-bench-gguf"
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per speed measurement")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads for decoding")
    parser.add_argument(
        "--rows",
        default="f16,q8_0,q4_k_m,families",
        help="which rows to measure (comma-separated: f16, q8_0, q4_k_m, families)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    llama_cpp_dir = find_llama_cpp(args.llama_cpp_dir, args.work)
    ours_src, theirs_src = build_checkpoint(args.work)

    rows = []
    wanted = args.rows.split(",")
    for quant in [q for q in ("f16", "q8_0") if q in wanted]:
        ours_out, theirs_out = args.work / f"ours-{quant}.gguf", args.work / f"theirs-{quant}.gguf"
        ours = measure(
            [sys.executable, "-c", OURS, "gguf", str(ours_src), "--quant", quant,
             "--out", str(ours_out), "--force", "--no-verify"],
            args.work,
        )  # fmt: skip
        theirs = measure(
            [sys.executable, "-c", CONVERT_WRAPPER, str(llama_cpp_dir), str(theirs_src),
             "--outtype", quant, "--outfile", str(theirs_out)],
            args.work,
        )  # fmt: skip
        speed = tuple(decode_speeds([ours_out, theirs_out], args.tokens, args.threads))
        rows.append((quant, ours, theirs, speed, same_tensors(ours_out, theirs_out)))

    print("\n| type | ours s | theirs s | time ratio (<= 0.8) | ours MiB | theirs MiB | memory ratio (<= 1.0) "
          "| ours tok/s | theirs tok/s | decode ratio (>= 0.98) | same tensors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for quant, (t_ours, m_ours), (t_theirs, m_theirs), (s_ours, s_theirs), same in rows:
        print(
            f"| {quant} | {t_ours:.1f} | {t_theirs:.1f} | {t_ours / t_theirs:.2f} | {m_ours:.0f} | {m_theirs:.0f} "
            f"| {m_ours / m_theirs:.2f} | {s_ours:.0f} | {s_theirs:.0f} | {s_ours / s_theirs:.2f} "
            f"| {'yes' if same else 'no'} |"
        )
    kquant_rows = [
        kquant_row(via, ours_src, theirs_src, llama_cpp_dir, args)
        for via in ("f32", "f16")
        if "q4_k_m" in wanted
    ]
    print(
        "\n| Q4_K_M | ours s | theirs s (convert + quantize) | time ratio (<= 0.5) | ours MiB | theirs MiB "
        "| memory ratio | ours peak disk MiB | theirs peak disk MiB | ours tok/s | theirs tok/s | same tensors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for via, (t_ours, m_ours, d_ours), (
        t_convert,
        t_quantize,
        m_theirs,
        d_theirs,
    ), speed, same in kquant_rows:
        t_theirs = t_convert + t_quantize
        print(
            f"| via {via} | {t_ours:.1f} | {t_theirs:.1f} ({t_convert:.1f} + {t_quantize:.1f}) "
            f"| {t_ours / t_theirs:.2f} | {m_ours:.0f} | {m_theirs:.0f} | {m_ours / m_theirs:.2f} "
            f"| {d_ours / 2**20:.0f} | {d_theirs / 2**20:.0f} | {speed[0]:.0f} | {speed[1]:.0f} "
            f"| {'yes' if same else 'no'} |"
        )
    families = ("llama3", "qwen3", "olmo2", "phi3", "smollm3", "gemma3")
    family_rows = [family_row(f, ours_src, llama_cpp_dir, args) for f in families if "families" in wanted]
    print(
        "\n| family (f16) | ours s | theirs s | time ratio | ours MiB | theirs MiB | memory ratio | same tensors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for family, (t_ours, m_ours), (t_theirs, m_theirs), same in family_rows:
        print(
            f"| {family} | {t_ours:.1f} | {t_theirs:.1f} | {t_ours / t_theirs:.2f} | {m_ours:.0f} | {m_theirs:.0f} "
            f"| {m_ours / m_theirs:.2f} | {'yes' if same else 'no'} |"
        )
    imports, _ = measure([sys.executable, "-c", HWM_PRELUDE + "import export.cli"], args.work)
    print(
        f"\nof our time, {imports:.1f} s is starting Python and importing export.cli (no torch, no transformers)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
