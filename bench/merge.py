"""`toolkit merge` against `mergekit-yaml` on the same decoder-125m inputs, and seconds per evolution generation.

    python bench/merge.py [--work DIR] [--evolve-run runs/evomerge]

Inputs: decoder-125m with random weights (a base) and two variants of it (the base plus noise, as fine-tunes
are), 3 x 500 MB in float32. mergekit reads them through a Llama-named view of the same files (the decoder's
tensors are Llama's), so it plans with its own llama.json while `toolkit merge` plans with the decoder's own
declaration: same method, same tensors, two routes. Each command runs in its own process; wall time and peak
RSS (VmHWM at exit) are printed for linear and TIES, with the ratio ours/theirs (goal <= 1.0 on both: the
toolkit adds checks and a report, no copies of the weights), and whether the outputs hold the same tensors.

With `--evolve-run` (a finished `recipes/evomerge.yaml` run), a 2-generation evolution over its three
specialists with the recipe's fitness, and the seconds each generation took. No assertions: timings on a
shared machine are figures to read, not tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml
from export_gguf import HWM_PRELUDE, ROOT, build_checkpoint, llama_view, measure  # bench/ is on sys.path

OURS = HWM_PRELUDE + "\nimport sys\nfrom toolkit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
THEIRS = HWM_PRELUDE + "\nimport sys\nfrom mergekit.scripts.run_yaml import main\nmain(sys.argv[1:])\n"


def variants(work: Path) -> list[tuple[Path, Path]]:
    """[(ours, llama view)] for the base and two noisy variants of it."""
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.models import register_auto_classes

    register_auto_classes()
    base = build_checkpoint(work)
    folders = [base]
    for i in (1, 2):
        ours = work / f"variant-{i}"
        if not (ours / "model.safetensors").exists():
            model = AutoModelForCausalLM.from_pretrained(base[0])
            generator = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.01 * torch.randn(param.shape, generator=generator))
            model.save_pretrained(ours)
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                if (base[0] / name).exists():
                    (ours / name).write_bytes((base[0] / name).read_bytes())
        folders.append((ours, llama_view(ours, work / f"variant-{i}-as-llama")))
    return folders


def config(method: str, folders: list[Path]) -> dict:
    base, a, b = (str(f) for f in folders)
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        }
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "dtype": "float32",
    }


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def read(folder: Path) -> dict:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
        return out

    mine, theirs = read(a), read(b)
    return set(mine) == set(theirs) and all((mine[k] == theirs[k]).all() for k in mine)


def evolve_seconds(run: Path, work: Path) -> list[float]:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    stage = next(s for s in recipe["stages"] if s["method"] == "evolve")
    options = dict(stage["evolve"], generations=2)
    options["models"] = [str(run / m / "final") for m in options["models"]]
    options["base_model"] = str(run / options["base_model"] / "final")
    path = work / "evolve.yaml"
    path.write_text(yaml.safe_dump(options))
    out = work / "evolve"
    import shutil
    import subprocess

    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "evolve", str(path), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return [h["seconds"] for h in json.loads((out / "evolve.json").read_text())["history"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--evolve-run", help="a finished recipes/evomerge.yaml run folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        folders = variants(work)
        print(
            f"{'method':<8} {'toolkit merge':>22} {'mergekit-yaml':>22} {'time ratio':>11} {'memory ratio':>13}  same tensors"
        )
        for method in ("linear", "ties"):
            ours_config, theirs_config = work / f"{method}.yaml", work / f"{method}-llama.yaml"
            ours_config.write_text(yaml.safe_dump(config(method, [f[0] for f in folders])))
            theirs_config.write_text(yaml.safe_dump(config(method, [f[1] for f in folders])))
            ours_out, theirs_out = work / f"out-{method}", work / f"out-{method}-mergekit"
            ours = measure(
                [sys.executable, "-c", OURS, "merge", str(ours_config), "--out", str(ours_out)], work
            )
            theirs = measure([sys.executable, "-c", THEIRS, str(theirs_config), str(theirs_out)], work)
            print(
                f"{method:<8} {ours[0]:>9.1f} s {ours[1]:>7.0f} MiB {theirs[0]:>9.1f} s {theirs[1]:>7.0f} MiB "
                f"{ours[0] / theirs[0]:>10.2f}x {ours[1] / theirs[1]:>12.2f}x  {same_tensors(ours_out, theirs_out)}"
            )
        if args.evolve_run:
            seconds = evolve_seconds(Path(args.evolve_run), work)
            print(f"\nevolution on {args.evolve_run}'s specialists: seconds per generation {seconds}")


if __name__ == "__main__":
    main()
