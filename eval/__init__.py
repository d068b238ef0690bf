"""Evaluation of trained models: checkable-task accuracy, perplexity (lm-eval tasks and win-rate build on these).

`eval.stages` registers the `eval:` section of recipe stages, `eval.cli` the `toolkit eval` command (entry
points in pyproject.toml); importing the package itself imports nothing heavy.
"""
