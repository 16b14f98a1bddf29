"""Losses, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked token cross-entropy.

  logits [B, T, V] (any dtype), targets [B, T] int, loss_mask [B, T].
  Returns (sum of token losses, number of counted tokens), both float32.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)
