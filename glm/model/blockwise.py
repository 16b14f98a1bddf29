"""Blockwise attention in plain JAX: the `'blockwise'` implementation.

The semantics of `glm.model.attention.attention` (see `AttentionSpec`),
computed as a scan over blocks of keys with an online softmax, so no
[T, S] array ever exists: each step holds [B, H, T, Bk] scores for one key
block of Bk keys. The visibility mask and the ALiBi bias are built per block
from the spec's per-token arrays. The backward is its own (a custom VJP):
it recomputes each block's probabilities from the saved log-sum-exp instead
of keeping them, the memory trade every flash-attention kernel makes.

Letters: B batch, T queries, S keys, H heads, D head dim, N key blocks,
K keys per block. Softmax and accumulation are float32 whatever the input
dtype; matmul inputs keep theirs (bf16 under the 'mixed' policy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm.model import positions

# A finite stand-in for -inf: exp() of it minus any real score is 0, and it
# never turns into NaN the way inf - inf does.
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK_K = 512


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec, *,
                        block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """q [B, T, H, D], k, v [B, S, H, D] -> [B, T, H, D] in q's dtype."""
  s = k.shape[1]
  block_k = max(1, min(block_k, s))
  pad = -s % block_k
  if pad:  # padded keys are segment 0: no query sees them
    widen = lambda a, value=0: jnp.pad(
        a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
        constant_values=value)
    k, v = widen(k), widen(v)
    spec = spec.__class__(
        q_segment_ids=spec.q_segment_ids,
        kv_segment_ids=widen(spec.kv_segment_ids),
        q_slots=spec.q_slots, kv_slots=widen(spec.kv_slots),
        q_positions=spec.q_positions,
        kv_positions=widen(spec.kv_positions),
        kv_prefix=None if spec.kv_prefix is None else widen(spec.kv_prefix),
        alibi_slopes=spec.alibi_slopes, causal=spec.causal)
  qh = jnp.swapaxes(q, 1, 2)                                 # [B, H, T, D]
  kb, vb = (_blocks(jnp.swapaxes(a, 1, 2), block_k) for a in (k, v))
  out = _attention(qh, kb, vb, _kv_blocks(spec, block_k), spec)
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)             # [B, T, H, D]


def _blocks(a: jax.Array, block_k: int) -> jax.Array:
  """[B, H, S, D] -> [N, B, H, K, D]."""
  b, h, s, d = a.shape
  a = a.reshape(b, h, s // block_k, block_k, d)
  return jnp.moveaxis(a, 2, 0)


def _kv_blocks(spec, block_k: int) -> dict:
  """The spec's per-key arrays [B, S] cut into [N, B, K] blocks."""
  cut = lambda a: jnp.moveaxis(
      a.reshape(a.shape[0], a.shape[1] // block_k, block_k), 1, 0)
  fields = {'segment_ids': spec.kv_segment_ids, 'slots': spec.kv_slots,
            'positions': spec.kv_positions}
  if spec.kv_prefix is not None:
    fields['prefix'] = spec.kv_prefix
  return {name: cut(a) for name, a in fields.items()}


def _block_bias(spec, kv: dict) -> tuple[jax.Array, jax.Array | None]:
  """Visibility [B, 1, T, K] and ALiBi bias [B, H, T, K] (or None) of one
  key block (the rules of `glm.model.attention.attention_mask`)."""
  seg_q = spec.q_segment_ids[:, :, None]
  seg_kv = kv['segment_ids'][:, None, :]
  visible = (seg_q == seg_kv) & (seg_kv != 0)
  if spec.causal:
    order = kv['slots'][:, None, :] <= spec.q_slots[:, :, None]
    if 'prefix' in kv:
      order = order | kv['prefix'][:, None, :]
    visible = visible & order
  alibi = None
  if spec.alibi_slopes is not None:
    alibi = positions.alibi_bias(spec.q_positions, kv['positions'],
                                 spec.alibi_slopes)
  return visible[:, None], alibi


def _scores(q, k_j, spec, kv_j):
  """Masked float32 scores [B, H, T, K] of one block and the mask."""
  s = jnp.einsum('bhtd,bhkd->bhtk', q, k_j,
                 preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  visible, alibi = _block_bias(spec, kv_j)
  if alibi is not None:
    s = s + alibi
  return jnp.where(visible, s, _NEG), visible


@jax.custom_vjp
def _attention(q, kb, vb, kv, spec):
  return _forward(q, kb, vb, kv, spec)[0]


def _forward(q, kb, vb, kv, spec):
  """Online softmax over the key blocks. Returns the output [B, H, T, D]
  (float32) and the log-sum-exp [B, H, T] of each query's scores."""
  b, h, t, d = q.shape
  f32 = jnp.float32

  def step(carry, xs):
    m, l, acc = carry
    k_j, v_j, kv_j = xs
    s, visible = _scores(q, k_j, spec, kv_j)
    m_new = jnp.maximum(m, jnp.max(s, -1))
    p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
    rescale = jnp.exp(m - m_new)
    l = l * rescale + jnp.sum(p, -1)
    pv = jnp.einsum('bhtk,bhkd->bhtd', p.astype(v_j.dtype), v_j,
                    preferred_element_type=f32)
    return (m_new, l, acc * rescale[..., None] + pv), None

  init = (jnp.full((b, h, t), _NEG, f32), jnp.zeros((b, h, t), f32),
          jnp.zeros((b, h, t, d), f32))
  (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kv))
  seen = l > 0  # a padding query sees no key: output 0, finite
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _NEG)
  return out, lse


def _attention_fwd(q, kb, vb, kv, spec):
  out, lse = _forward(q, kb, vb, kv, spec)
  return out, (q, kb, vb, kv, spec, out, lse)


def _attention_bwd(res, d_out):
  """Per block: P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - delta),
  dQ += dS K, dK = dS^T Q (both times the softmax scale)."""
  q, kb, vb, kv, spec, out, lse = res
  f32 = jnp.float32
  scale = q.shape[-1] ** -0.5
  delta = jnp.sum(d_out.astype(f32) * out, -1)               # [B, H, T]
  d_out_m = d_out.astype(vb.dtype)

  def step(dq, xs):
    k_j, v_j, kv_j = xs
    s, visible = _scores(q, k_j, spec, kv_j)
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
    dv = jnp.einsum('bhtk,bhtd->bhkd', p.astype(v_j.dtype), d_out_m,
                    preferred_element_type=f32)
    dp = jnp.einsum('bhtd,bhkd->bhtk', d_out_m, v_j,
                    preferred_element_type=f32)
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    dq = dq + jnp.einsum('bhtk,bhkd->bhtd', ds, k_j,
                         preferred_element_type=f32) * scale
    dk = jnp.einsum('bhtk,bhtd->bhkd', ds, q,
                    preferred_element_type=f32) * scale
    return dq, (dk.astype(k_j.dtype), dv.astype(v_j.dtype))

  dq, (dkb, dvb) = jax.lax.scan(step, jnp.zeros(q.shape, f32), (kb, vb, kv))
  zero = lambda tree: jax.tree.map(
      lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
      if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a),
      tree)
  return dq.astype(q.dtype), dkb, dvb, zero(kv), zero(spec)


_attention.defvjp(_attention_fwd, _attention_bwd)
