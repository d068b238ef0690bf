"""Configuration of `lattice`: a teacher model's text embeddings, compressed by an adapter onto a
`height` x `width` input surface, carried through `depth` layers of gMLP cells (each cell reads the 3 x 3
neighbourhood of the layer before it), and read out as an output surface of the same size; a decoder maps a
surface back to the teacher's embedding space.

Sizes: each cell holds `cell_dim` numbers of state and a gMLP of width 2 x `cell_hidden` (see
modeling_lattice.py for its parameters); the adapter is a stack of Linear + GELU + LayerNorm through
`adapter_hidden` widths ("hierarchical": wide first, then narrowing to the surface), or one Linear when empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class LatticeConfig(PreTrainedConfig):
    """Hyper-parameters of a `lattice` model; defaults are the `lattice-tiny` preset."""

    model_type = "lattice"
    # See DecoderConfig: remote-code folders carry their auto_map.
    auto_map: ClassVar[Mapping[str, str]] = MappingProxyType({})

    teacher_dim: int = 64  # the width of the teacher's embeddings (4096 for Llama-3-8B)
    height: int = 4
    width: int = 4
    depth: int = 3  # layers of cells between the input and the output surface
    cell_dim: int = 32  # state each cell passes on (the seed's "memory 32")
    cell_hidden: int = 64  # each half of a cell's gMLP (the seed's "hidden 128")
    neighbourhood: int = 3  # a cell reads the k x k cells around it in the layer before (k odd)
    adapter_hidden: list[int] | None = None  # widths between teacher_dim and the surface; None: one Linear
    decoder_hidden: list[int] | None = None  # widths between the surface and teacher_dim; None: one Linear
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # Loss weights (the seed's): the adapter's reconstruction of the question, the propagation's consistency
    # from layer to layer, and the answer's similarity to the teacher's answer embedding.
    reconstruction_weight: float = 0.3
    consistency_weight: float = 0.3
    dialogue_weight: float = 0.4

    @property
    def cells_per_layer(self) -> int:
        return self.height * self.width

    @property
    def cells(self) -> int:
        return self.cells_per_layer * self.depth

    @property
    def neighbours(self) -> int:
        return self.neighbourhood * self.neighbourhood

    @property
    def parameters_per_cell(self) -> int:
        """A cell's own parameters (see LatticeCells): its gMLP, its norms and its memory token."""
        d, h, tokens = self.cell_dim, self.cell_hidden, self.neighbours + 1
        return (
            2 * d  # input norm
            + d * 2 * h
            + 2 * h  # channel projection up (u and v)
            + 2 * h  # the gate's norm
            + tokens * tokens
            + tokens  # spatial projection over the neighbourhood and the memory token
            + h * d
            + d  # channel projection down
            + d  # the memory token
        )

    def shape_summary(self) -> str:
        """The shape in a few words (README's architecture table)."""
        return (
            f"{self.height}x{self.width}x{self.depth} cells ({self.parameters_per_cell:,} parameters each), "
            f"{self.teacher_dim}-d teacher"
        )

    def describe_parameters(self, total: int) -> list[str]:
        """Lines `toolkit arch info` prints under the totals: the cells, per cell and in all, and the rest."""
        in_cells = self.cells * self.parameters_per_cell
        return [
            f"lattice {self.height} x {self.width} x {self.depth} = {self.cells:,} cells of "
            f"{self.parameters_per_cell:,} parameters: {in_cells:,} in the cells",
            f"adapter, decoder and surfaces: {total - in_cells:,} ({self.teacher_dim}-d teacher embeddings, "
            f"adapter widths {[self.teacher_dim, *(self.adapter_hidden or []), self.cells_per_layer]})",
        ]

    def validate_architecture(self):
        """Reject shapes the model cannot run (called by `@strict` validation)."""
        for name in ("teacher_dim", "height", "width", "depth", "cell_dim", "cell_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be odd (a cell in the middle), not {self.neighbourhood}")


__all__ = ["LatticeConfig"]
