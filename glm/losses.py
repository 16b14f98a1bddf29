"""Losses, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[targets]: [B, T, V] float32, [B, T] -> [B, T].

  Its own backward, softmax - one_hot, is one fused pass over the logits
  (autodiff of log_softmax + take_along_axis makes several, plus a scatter).
  With vocab-parallel logits the target logit is a masked sum, a reduction
  over the vocab axis, so the full vocabulary is never gathered.
  """
  return _token_nll_fwd(logits, targets)[0]


def _picked(logits, targets):
  """logits[..., target]: a gather on one device; a masked sum over the
  vocab axis when a mesh splits it (`tensor` > 1), so that each device
  reduces its own shard (the masked sum costs an extra pass on one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  split = not mesh.empty and dict(mesh.shape).get('tensor', 1) > 1
  if not split:
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), -1)


def _token_nll_fwd(logits, targets):
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - _picked(logits, targets), (logits, targets, lse)


def _token_nll_bwd(res, g):
  logits, targets, lse = res
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  one_hot = (vocab == targets[..., None]).astype(logits.dtype)
  d_logits = (jnp.exp(logits - lse[..., None]) - one_hot) * g[..., None]
  return d_logits, None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked token cross-entropy.

  logits [B, T, V] (any dtype), targets [B, T] int, loss_mask [B, T].
  Returns (sum of token losses, number of counted tokens), both float32.
  """
  nll = token_nll(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def z_loss_sum(logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Sum over counted tokens of logsumexp(logits)^2 (PaLM's z-loss), fp32.

  Padded-vocab logits are the float32 minimum and add nothing to the sum.
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(z) * loss_mask.astype(jnp.float32))
