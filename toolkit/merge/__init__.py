"""Model merging on mergekit: its configs and methods as they are, on Hub checkpoints and on every registered
architecture (described to mergekit from the architecture's own classes), plus what mergekit lacks: DFS
layer-path merging, checks before anything is written, a report of where every row came from, recipe stages,
and evolution of merge recipes (`toolkit evolve`).
"""
