"""Experiments over many runs.

  sweep      `glm sweep`: a grid of gin variants, one `glm train` workdir each
  results    the variants' numbers as rows, mean +- std over seeds, results.md
  plot       loss curves, metric per axis, loss vs compute (matplotlib PNGs)
  sweep_cli  the `glm sweep` and `glm plot` commands
"""
