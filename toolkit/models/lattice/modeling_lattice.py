"""The `lattice` model: a teacher's text embedding -> adapter -> input surface -> `depth` layers of gMLP cells
-> output surface -> decoder back to the teacher's embedding space.

A cell at (layer l, row i, column j) holds `cell_dim` numbers. It reads the k x k cells around (i, j) in layer
l - 1 (zeros past the border) plus its own learnt memory token, k*k + 1 tokens of `cell_dim`, and runs one gMLP
block on them (Liu et al., 2021, "Pay Attention to MLPs"): a per-token LayerNorm, a channel projection up to
2 x `cell_hidden` with GELU, split into u and v; v normalised and mixed across the tokens by a learnt
(k*k + 1) x (k*k + 1) spatial projection (weights start at 0, bias at 1: the gate starts open); u * v projected
back to `cell_dim`. The cell's new state is its own previous state plus the mean of the block's token outputs.
Every cell has its own weights. The input surface (one number per cell of a `height` x `width` grid, from the
adapter) enters layer 0 through a per-cell projection; the output surface is a per-cell read-out of the last
layer.

All cells of a layer run in one batched op: their weights are stacked along a cell axis and applied with
`einsum`, so a layer costs a few large kernels, not `height * width` small ones (bench/lattice.py measures
it against a per-cell loop; tests/toolkit/models/test_lattice.py checks the two agree to 1e-6).

The loss (`LatticeOutput`): `reconstruction_weight` x (1 - cos(decoder(input surface), question)), how much
of the teacher's question the surface keeps; `consistency_weight` x the mean relative squared change of the
cell states from one layer to the next, which keeps the propagation stable; and `dialogue_weight` x
(1 - cos(decoder(output surface), answer)), how close the lattice's answer lands to the teacher's embedding of
the answer. Each part is returned and logged (`pop_loss_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_lattice import LatticeConfig


@dataclass
class LatticeOutput(ModelOutput):
    """The loss and its parts (with `answer_embeddings`), the two surfaces, the predicted answer embedding and,
    with `output_layers`, every layer's cell states (batch, height, width, cell_dim)."""

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    consistency_loss: torch.Tensor | None = None
    dialogue_loss: torch.Tensor | None = None
    input_surface: torch.Tensor | None = None
    output_surface: torch.Tensor | None = None
    predicted_embedding: torch.Tensor | None = None
    layer_states: tuple[torch.Tensor, ...] | None = None


def _stack(widths: list[int], eps: float) -> nn.Sequential:
    """Linear layers through `widths`, GELU and LayerNorm between them (none after the last)."""
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        modules.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            modules += [nn.GELU(), nn.LayerNorm(b, eps=eps)]
    return nn.Sequential(*modules)


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis with a weight and bias per cell (broadcast over the token axis)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight + bias


def neighbourhoods(states: torch.Tensor, k: int) -> torch.Tensor:
    """(batch, height, width, dim) -> (batch, height * width, k * k, dim): each cell's k x k neighbours, row
    by row, zeros past the border; the cell itself is token k * k // 2."""
    batch, height, width, dim = states.shape
    r = k // 2
    padded = F.pad(states, (0, 0, r, r, r, r))
    views = [padded[:, dy : dy + height, dx : dx + width] for dy in range(k) for dx in range(k)]
    return torch.stack(views, dim=3).reshape(batch, height * width, k * k, dim)


class LatticeLayer(GradientCheckpointingLayer):
    """One layer of `height * width` gMLP cells, each with its own weights (stacked on the first axis)."""

    def __init__(self, config: LatticeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        cells, d, h, tokens = (
            config.cells_per_layer,
            config.cell_dim,
            config.cell_hidden,
            config.neighbours + 1,
        )
        self.norm_weight = nn.Parameter(torch.ones(cells, 1, d))
        self.norm_bias = nn.Parameter(torch.zeros(cells, 1, d))
        self.up_weight = nn.Parameter(torch.empty(cells, d, 2 * h))
        self.up_bias = nn.Parameter(torch.zeros(cells, 1, 2 * h))
        self.gate_norm_weight = nn.Parameter(torch.ones(cells, 1, h))
        self.gate_norm_bias = nn.Parameter(torch.zeros(cells, 1, h))
        self.spatial_weight = nn.Parameter(torch.zeros(cells, tokens, tokens))
        self.spatial_bias = nn.Parameter(torch.ones(cells, tokens, 1))
        self.down_weight = nn.Parameter(torch.empty(cells, h, d))
        self.down_bias = nn.Parameter(torch.zeros(cells, 1, d))
        self.memory = nn.Parameter(torch.empty(cells, 1, d))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, height, width, cell_dim) of layer l - 1 -> the same of this layer."""
        config, eps = self.config, self.config.layer_norm_eps
        batch, height, width, d = states.shape
        around = neighbourhoods(states, config.neighbourhood)  # (B, C, K, d)
        tokens = torch.cat([around, self.memory.expand(batch, -1, -1, -1)], dim=2)  # (B, C, T, d)
        x = _norm(tokens, self.norm_weight, self.norm_bias, eps)
        hidden = F.gelu(torch.einsum("bctd,cdf->bctf", x, self.up_weight) + self.up_bias)
        u, v = hidden.chunk(2, dim=-1)
        v = _norm(v, self.gate_norm_weight, self.gate_norm_bias, eps)
        v = torch.einsum("cts,bcsh->bcth", self.spatial_weight, v) + self.spatial_bias
        out = torch.einsum("bcth,chd->bctd", u * v, self.down_weight) + self.down_bias
        own = around[:, :, config.neighbours // 2]
        return (own + out.mean(dim=2)).reshape(batch, height, width, d)

    def forward_per_cell(self, states: torch.Tensor) -> torch.Tensor:
        """The same layer written cell by cell and neighbour by neighbour, with plain matrix products: the
        reference the batched `forward` is tested against (and bench/lattice.py times). Not used to train."""
        config, eps = self.config, self.config.layer_norm_eps
        batch, height, width, d = states.shape
        r = config.neighbourhood // 2
        rows = []
        for i in range(height):
            row = []
            for j in range(width):
                c = i * width + j
                tokens = []
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        y, x = i + dy, j + dx
                        inside = 0 <= y < height and 0 <= x < width
                        tokens.append(states[:, y, x] if inside else states.new_zeros(batch, d))
                tokens.append(self.memory[c, 0].expand(batch, d))
                t = torch.stack(tokens, dim=1)  # (B, T, d)
                x_ = F.layer_norm(t, (d,), eps=eps) * self.norm_weight[c] + self.norm_bias[c]
                hidden = F.gelu(x_ @ self.up_weight[c] + self.up_bias[c])
                u, v = hidden.chunk(2, dim=-1)
                v = F.layer_norm(v, v.shape[-1:], eps=eps) * self.gate_norm_weight[c] + self.gate_norm_bias[c]
                v = self.spatial_weight[c] @ v + self.spatial_bias[c]
                out = (u * v) @ self.down_weight[c] + self.down_bias[c]
                row.append(states[:, i, j] + out.mean(dim=1))
            rows.append(torch.stack(row, dim=1))
        return torch.stack(rows, dim=1)


class LatticePreTrainedModel(PreTrainedModel):
    """Capabilities declared to transformers and Accelerate."""

    config: LatticeConfig
    config_class = LatticeConfig
    base_model_prefix = "lattice"
    main_input_name = "question_embeddings"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LatticeLayer"]

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """Four fixed question embeddings (what an export is verified on: the model takes no token ids)."""
        generator = torch.Generator().manual_seed(0)
        return {"question_embeddings": torch.randn(4, self.config.teacher_dim, generator=generator)}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LatticeLayer):
            init.normal_(module.up_weight, mean=0.0, std=std)
            init.normal_(module.down_weight, mean=0.0, std=std)
            init.normal_(module.memory, mean=0.0, std=std)
            init.ones_(module.norm_weight)
            init.zeros_(module.norm_bias)
            init.zeros_(module.up_bias)
            init.ones_(module.gate_norm_weight)
            init.zeros_(module.gate_norm_bias)
            init.zeros_(module.spatial_weight)  # gMLP: the spatial gate starts as the identity (1 x u)
            init.ones_(module.spatial_bias)
            init.zeros_(module.down_bias)
        elif isinstance(module, LatticeModel):
            init.normal_(module.input_weight, mean=0.0, std=1.0)
            init.zeros_(module.input_bias)
            init.normal_(module.read_weight, mean=0.0, std=std)
            init.zeros_(module.read_bias)


class LatticeModel(LatticePreTrainedModel):
    """Adapter, lattice and decoder; `forward(question_embeddings, answer_embeddings=None)`."""

    LOSS_PARTS = ("reconstruction_loss", "consistency_loss", "dialogue_loss")

    def __init__(self, config: LatticeConfig) -> None:
        super().__init__(config)
        cells, d, eps = config.cells_per_layer, config.cell_dim, config.layer_norm_eps
        self.adapter = _stack([config.teacher_dim, *(config.adapter_hidden or []), cells], eps)
        self.input_weight = nn.Parameter(torch.empty(cells, d))
        self.input_bias = nn.Parameter(torch.zeros(cells, d))
        self.layers = nn.ModuleList(LatticeLayer(config, i) for i in range(config.depth))
        self.read_weight = nn.Parameter(torch.empty(cells, d))
        self.read_bias = nn.Parameter(torch.zeros(cells))
        self.decoder = _stack([cells, *(config.decoder_hidden or []), config.teacher_dim], eps)
        self.gradient_checkpointing = False
        self._loss_sums: dict[str, float] = {}
        self._loss_count = 0
        self.post_init()

    def propagate(self, surface: torch.Tensor, per_cell: bool = False) -> list[torch.Tensor]:
        """An input surface (batch, cells) through every layer: the states of the input layer and each layer
        (`per_cell`: through the cell-by-cell reference of each layer instead of the batched form)."""
        config = self.config
        states = surface[..., None] * self.input_weight + self.input_bias  # (B, C, d)
        states = states.reshape(-1, config.height, config.width, config.cell_dim)
        layers = [states]
        for layer in self.layers:
            states = layer.forward_per_cell(states) if per_cell else layer(states)
            layers.append(states)
        return layers

    def read_out(self, states: torch.Tensor) -> torch.Tensor:
        """The last layer's states (batch, height, width, cell_dim) -> the output surface (batch, cells)."""
        flat = states.reshape(states.shape[0], -1, self.config.cell_dim)
        return (flat * self.read_weight).sum(-1) + self.read_bias

    def forward(
        self,
        question_embeddings: torch.Tensor,
        answer_embeddings: torch.Tensor | None = None,
        output_layers: bool = False,
        **kwargs,
    ) -> LatticeOutput:
        config = self.config
        surface = self.adapter(question_embeddings)
        layers = self.propagate(surface)
        output_surface = self.read_out(layers[-1])
        predicted = self.decoder(output_surface)
        out = LatticeOutput(
            input_surface=surface,
            output_surface=output_surface,
            predicted_embedding=predicted,
            layer_states=tuple(layers) if output_layers else None,
        )
        if answer_embeddings is not None:
            reconstructed = self.decoder(surface)
            out.reconstruction_loss = (
                1 - F.cosine_similarity(reconstructed, question_embeddings, dim=-1)
            ).mean()
            changes = [
                (after - before).pow(2).mean() / (before.pow(2).mean() + 1e-6)
                for before, after in zip(layers, layers[1:], strict=False)
            ]
            out.consistency_loss = torch.stack(changes).mean()
            out.dialogue_loss = (1 - F.cosine_similarity(predicted, answer_embeddings, dim=-1)).mean()
            out.loss = (
                config.reconstruction_weight * out.reconstruction_loss
                + config.consistency_weight * out.consistency_loss
                + config.dialogue_weight * out.dialogue_loss
            )
            if self.training:
                for name in self.LOSS_PARTS:
                    self._loss_sums[name] = self._loss_sums.get(name, 0.0) + float(
                        getattr(out, name).detach()
                    )
                self._loss_count += 1
        return out

    def pop_loss_parts(self) -> dict[str, float]:
        """The mean of each loss part over the training forward passes since the last call (for the log)."""
        if not self._loss_count:
            return {}
        means = {name: total / self._loss_count for name, total in self._loss_sums.items()}
        self._loss_sums, self._loss_count = {}, 0
        return means


__all__ = ["LatticeModel", "LatticeOutput", "LatticePreTrainedModel"]
