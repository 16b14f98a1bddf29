"""Greedy decoding for causal models.

The walking skeleton recomputes the forward pass over a fixed-size buffer at
every step (one compiled shape, no cache). It is exact and small-model fast;
a KV cache belongs with the serving work.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm.errors import UserError
from glm.model.config import ModelConfig
from glm.model.transformer import Transformer


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(cfg: ModelConfig, params: Any, buf: jax.Array,
            num_new: int, prompt_len: jax.Array) -> jax.Array:
  """buf [1, L] holds the prompt then zeros; fills num_new tokens greedily."""

  def step(i, buf):
    pos = prompt_len + i
    logits = Transformer(cfg).apply({'params': params}, {'tokens': buf})
    nxt = jnp.argmax(logits[0, pos - 1]).astype(buf.dtype)
    return buf.at[0, pos].set(nxt)

  return jax.lax.fori_loop(0, num_new, step, buf)


def greedy_generate(cfg: ModelConfig, params: Any, prompt: Sequence[int],
                    num_new: int, eos_id: int | None = None) -> list[int]:
  """Returns up to num_new greedily chosen tokens after `prompt`."""
  if not prompt:
    raise UserError('greedy_generate needs a non-empty prompt.')
  total = len(prompt) + num_new
  if total > cfg.max_len:
    raise UserError(f'prompt {len(prompt)} + {num_new} new tokens exceeds '
                     f'max_len={cfg.max_len}; shorten the prompt or ask for '
                     'fewer tokens.')
  buf = np.zeros((1, total), np.int32)
  buf[0, :len(prompt)] = prompt
  out = np.asarray(_greedy(cfg, params, jnp.asarray(buf), num_new,
                           jnp.int32(len(prompt))))[0, len(prompt):]
  new = [int(t) for t in out]
  if eos_id is not None and eos_id in new:
    new = new[:new.index(eos_id)]
  return new
