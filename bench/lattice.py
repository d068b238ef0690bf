"""Forward + backward time of the lattice's batched cells against the cell-by-cell loop, at the seed's size.

    python bench/lattice.py [--height 15 --width 15 --depth 11] [--batch 8] [--threads N]

Both run the same model (`lattice-15x15x11`'s cells: 2,475 gMLP cells of 32 numbers of state and width
2 x 128; the 4096-d adapter is left out, as it is the same for both) from a batch of random input surfaces
through every layer, then backward from the sum of the last layer's states: the batched form
(`LatticeLayer.forward`, one set of einsums per layer, what trains) and the reference loop
(`LatticeLayer.forward_per_cell`, one small matrix product after another per cell). One run each after a
warm-up; printed: seconds and the ratio. Figures to read, no assertions.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModel

from toolkit.models import build_config, register_auto_classes


def timed(model: torch.nn.Module, surface: torch.Tensor, per_cell: bool) -> float:
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    states = model.propagate(surface, per_cell=per_cell)
    states[-1].sum().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--height", type=int, default=15)
    parser.add_argument("--width", type=int, default=15)
    parser.add_argument("--depth", type=int, default=11)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_auto_classes()
    torch.manual_seed(0)
    config = build_config(
        "lattice-15x15x11",
        teacher_dim=8,
        adapter_hidden=None,
        height=args.height,
        width=args.width,
        depth=args.depth,
    )
    model = AutoModel.from_config(config).train()
    surface = torch.randn(args.batch, config.cells_per_layer)
    small = torch.randn(args.batch, config.cells_per_layer)
    timed(model, small, per_cell=False)  # warm-up: first-call allocations
    batched = timed(model, surface, per_cell=False)
    looped = timed(model, surface, per_cell=True)
    print(
        f"lattice {config.height}x{config.width}x{config.depth} ({config.cells:,} cells, "
        f"{config.parameters_per_cell:,} parameters each), batch {args.batch}, {torch.get_num_threads()} threads"
    )
    print("| form | forward + backward s | ratio to the loop |")
    print("|---|---|---|")
    print(f"| batched (einsum per layer) | {batched:.3f} | {batched / looped:.4f} |")
    print(f"| cell-by-cell loop | {looped:.3f} | 1.0 |")
    print(f"\nthe batched cells take {looped / batched:.0f}x less time")


if __name__ == "__main__":
    main()
