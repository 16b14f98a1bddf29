"""Losses, computed in float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glm.model.layers import EMBED_AXES, dense


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


def output_loss(x: jax.Array, w: jax.Array, targets: jax.Array,
                loss_mask: jax.Array, *, vocab_size: int, z_loss: float = 0.0,
                chunk_rows: int = 512) -> tuple[jax.Array, jax.Array]:
  """The output layer and its loss without [B, T, V] logits in memory.

  x [B, T, E] final hidden states, w [V, E] the output matrix (the tied
  embedding table, or lm_head transposed), targets [B, T], loss_mask [B, T].
  Returns (sum of masked token cross-entropies + z_loss * sum of masked
  logsumexp^2, number of counted tokens), both float32: the same values as
  `cross_entropy` + `z_loss_sum` on x @ w^T with padded-vocab rows
  (ids >= vocab_size) masked out.

  Rows go through in chunks of `chunk_rows` in a scan: each chunk's logits
  [n, V] live only inside the step. Since the loss is a sum, its gradients
  with respect to x and w are computed in the same pass and scaled by the
  incoming scalar in the backward (3 matmuls in all, as autodiff's).
  """
  b, t, e = x.shape
  rows = b * t
  n = min(chunk_rows, rows)
  pad = -rows % n
  xf = jnp.pad(x.reshape(rows, e), ((0, pad), (0, 0)))       # [N', E]
  tf = jnp.pad(targets.reshape(rows), (0, pad))              # [N']
  mf = jnp.pad(loss_mask.reshape(rows).astype(jnp.float32), (0, pad))
  total = _output_loss(xf.reshape(-1, n, e), w, tf.reshape(-1, n),
                       mf.reshape(-1, n), vocab_size, float(z_loss))
  return total, jnp.sum(loss_mask.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _output_loss(x, w, targets, mask, vocab_size, z_loss):
  return _output_loss_fwd(x, w, targets, mask, vocab_size, z_loss)[0]


def _output_loss_fwd(x, w, targets, mask, vocab_size, z_loss):
  """x [C, n, E] chunks, w [V, E], targets / mask [C, n]."""
  f32 = jnp.float32
  vocab = jnp.arange(w.shape[0], dtype=targets.dtype)

  def chunk(d_w, inp):
    xc, tc, mc = inp
    logits = dense('ne,ve->nv', xc, w, EMBED_AXES, dtype=w.dtype,
                   out_dtype=f32)  # [n, V]
    if vocab_size != w.shape[0]:
      logits = jnp.where(vocab < vocab_size, logits, jnp.finfo(f32).min)
    top = jnp.max(logits, -1, keepdims=True)
    ex = jnp.exp(logits - top)
    denom = jnp.sum(ex, -1, keepdims=True)
    lse = (top + jnp.log(denom))[:, 0]
    loss = jnp.sum((lse - _picked(logits, tc)) * mc + z_loss * mc * lse ** 2)
    # d loss / d logits = softmax * m (1 + 2 z lse) - one_hot * m.
    one_hot = (vocab == tc[:, None]).astype(f32)
    d = (ex / denom) * (mc * (1 + 2 * z_loss * lse))[:, None] - one_hot * (
        mc[:, None])
    dt = w.dtype
    d_x = jnp.einsum('nv,ve->ne', d.astype(dt), w, preferred_element_type=f32)
    # (x^T d)^T: see glm.model.layers.tied_logits for why not d^T x.
    d_w = d_w + jnp.einsum('ne,nv->ev', xc, d.astype(dt),
                           preferred_element_type=f32).T
    return d_w, (loss, d_x)

  d_w, (loss, d_x) = jax.lax.scan(
      chunk, jnp.zeros(w.shape, f32), (x, targets, mask))
  return jnp.sum(loss), (d_x.astype(x.dtype), d_w.astype(w.dtype))


def _output_loss_bwd(vocab_size, z_loss, res, g):
  del vocab_size, z_loss
  d_x, d_w = res
  return (g * d_x).astype(d_x.dtype), (g * d_w).astype(d_w.dtype), None, None


_output_loss.defvjp(_output_loss_fwd, _output_loss_bwd)
