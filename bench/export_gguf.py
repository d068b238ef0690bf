"""Our GGUF export against llama.cpp's own `convert_hf_to_gguf.py`, on one `decoder-125m` checkpoint.

    python bench/export_gguf.py [--llama-cpp-dir DIR] [--work DIR] [--tokens 128]

Measures, for f16 and q8_0: wall time and peak RSS of each converter (each runs in its own process, measured
from /proc VmHWM, Linux only), decode tokens/s of each resulting file in llama.cpp (same prompt, greedy, same
threads, best of 7 alternating rounds), and whether the two files hold the same tensor bytes.
Prints the ratios against the goals (time <= 0.8x, memory <= 1.0x, decode >= 0.98x). No assertions: timings
on a shared machine are figures to read, not tests.

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
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
convert.main()
"""
)


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
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    llama_cpp_dir = find_llama_cpp(args.llama_cpp_dir, args.work)
    ours_src, theirs_src = build_checkpoint(args.work)

    rows = []
    for quant in ("f16", "q8_0"):
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
    imports, _ = measure([sys.executable, "-c", HWM_PRELUDE + "import export.cli"], args.work)
    print(
        f"\nof our time, {imports:.1f} s is starting Python and importing export.cli (no torch, no transformers)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
