"""The recipe runner: `toolkit train RECIPE` and `accelerate launch -m toolkit.train RECIPE` run the same code."""

from toolkit.train.runner import StageResult, run

__all__ = ["StageResult", "run"]
