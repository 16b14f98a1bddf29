"""Greedy decoding for causal models: `greedy_generate`, the end-of-run
sample's entry, on the KV-cache path of `glm.inference.generate`."""

from __future__ import annotations

from typing import Any, Sequence

from glm.model.config import ModelConfig
from glm.inference import generate as generate_lib


def greedy_generate(cfg: ModelConfig, params: Any, prompt: Sequence[int],
                    num_new: int, eos_id: int | None = None) -> list[int]:
  """Returns up to num_new greedily chosen tokens after `prompt` (cut
  before the first eos)."""
  return generate_lib.generate(cfg, params, [list(prompt)],
                               max_new_tokens=num_new, eos_id=eos_id)[0]
