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


def z_loss_sum(logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Sum over counted tokens of logsumexp(logits)^2 (PaLM's z-loss), fp32.

  Padded-vocab logits are the float32 minimum and add nothing to the sum.
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(z) * loss_mask.astype(jnp.float32))
