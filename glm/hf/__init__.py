"""Hugging Face interop.

  bloom  BLOOM weights and configs <-> glm checkpoints (`glm convert`)
"""
