"""Evaluation of trained models: checkable-task accuracy, perplexity (lm-eval tasks and win-rate build on these)."""

from eval.accuracy import generate_answers, task_accuracy
from eval.perplexity import perplexity

__all__ = ["generate_answers", "perplexity", "task_accuracy"]
