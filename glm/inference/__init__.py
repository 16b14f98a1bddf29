"""Inference on trained models.

  scoring   `glm score`: per-token log-probabilities of sequences
  decoding  greedy continuation (the end-of-run sample)
"""
