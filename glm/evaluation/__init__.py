"""Evaluation of a model during and after training.

  heldout  held-out loss overall, per task and per language (the trainer's
           `EVAL_EVERY` evaluations)
"""
