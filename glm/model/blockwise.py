"""Blockwise attention in plain JAX: the `'blockwise'` implementation.

The semantics of `glm.model.attention.attention` (see `AttentionSpec`),
computed tile by tile, so no [T, S] array ever exists: queries are cut into
blocks of Bq and keys into blocks of Bk, and for each query block a scan over
the key blocks runs an online softmax on [B, H, Bq, Bk] tiles. The
visibility mask and the ALiBi bias are built per tile from the spec's
per-token arrays. A tile that no query of the batch can see into (the causal
upper triangle, other packed sequences, padding: the block map of
`glm.pallas_kernels.common.block_map`, any-reduced over the batch) is
skipped with `lax.cond`, as the Pallas kernels skip it.

The backward is its own (a custom VJP): per query block it recomputes each
visible tile's probabilities from the saved log-sum-exp instead of keeping
them, accumulates dq for the block and adds each tile's dk / dv into
key-block accumulators carried across the query blocks.

Letters: B batch, T queries, S keys, H heads, D head dim, M query blocks,
N key blocks, Q queries per block, K keys per block. Softmax and
accumulation are float32 whatever the input dtype; matmul inputs keep theirs
(bf16 under the 'mixed' policy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glm.model import positions
from glm.pallas_kernels.common import NEG, block_map

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec, *,
                        block_q: int = DEFAULT_BLOCK_Q,
                        block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """q [B, T, H, D], k, v [B, S, H, D] -> [B, T, H, D] in q's dtype."""
  t, s = q.shape[1], k.shape[1]
  block_q, block_k = max(1, min(block_q, t)), max(1, min(block_k, s))
  tp, sp = -(-t // block_q) * block_q, -(-s // block_k) * block_k
  pad = lambda a, n: jnp.pad(a, [(0, 0), (0, n)] + [(0, 0)] * (a.ndim - 2))
  # Padded queries and keys are segment 0: nobody sees them.
  qf = {'segment_ids': spec.q_segment_ids, 'slots': spec.q_slots,
        'positions': spec.q_positions}
  kf = {'segment_ids': spec.kv_segment_ids, 'slots': spec.kv_slots,
        'positions': spec.kv_positions}
  if spec.kv_prefix is not None:
    kf['prefix'] = spec.kv_prefix
  qf = {n: pad(a, tp - t) for n, a in qf.items()}
  kf = {n: pad(a, sp - s) for n, a in kf.items()}
  run = block_map(
      {'q_seg': qf['segment_ids'], 'q_slot': qf['slots'],
       'kv_seg': kf['segment_ids'], 'kv_slot': kf['slots'],
       'kv_pre': kf.get('prefix', jnp.zeros_like(kf['slots']))},
      block_q, block_k, causal=spec.causal)
  run = jnp.any(run != 0, axis=0)                            # [M, N]
  qb = _blocks(jnp.swapaxes(pad(q, tp - t), 1, 2), block_q)  # [M,B,H,Q,D]
  kb, vb = (_blocks(jnp.swapaxes(pad(a, sp - s), 1, 2), block_k)
            for a in (k, v))                                 # [N,B,H,K,D]
  cut = lambda a, n: jnp.moveaxis(a.reshape(a.shape[0], -1, n), 1, 0)
  qf = {n: cut(a, block_q) for n, a in qf.items()}           # [M, B, Q]
  kf = {n: cut(a, block_k) for n, a in kf.items()}           # [N, B, K]
  static = (spec.causal, spec.alibi_slopes is not None)
  slopes = (jnp.zeros((q.shape[2],), jnp.float32)
            if spec.alibi_slopes is None else spec.alibi_slopes)
  out = _attention(qb, kb, vb, qf, kf, slopes, run, static)  # [M,B,H,Q,D]
  out = jnp.moveaxis(out, 0, 2)                              # [B,H,M,Q,D]
  out = out.reshape(q.shape[0], q.shape[2], tp, q.shape[3])[:, :, :t]
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)             # [B, T, H, D]


def _blocks(a: jax.Array, block: int) -> jax.Array:
  """[B, H, L, D] -> [L / block, B, H, block, D]."""
  b, h, n, d = a.shape
  return jnp.moveaxis(a.reshape(b, h, n // block, block, d), 2, 0)


def _scores(q_i, k_j, qf_i, kf_j, slopes, static):
  """Masked float32 scores [B, H, Q, K] of one tile and its visibility
  (the rules of `glm.model.attention.attention_mask`)."""
  causal, alibi = static
  s = jnp.einsum('bhqd,bhkd->bhqk', q_i, k_j,
                 preferred_element_type=jnp.float32) * q_i.shape[-1] ** -0.5
  if alibi:
    s = s + positions.alibi_bias(qf_i['positions'], kf_j['positions'],
                                 slopes)
  seg_q = qf_i['segment_ids'][:, :, None]
  seg_k = kf_j['segment_ids'][:, None, :]
  visible = (seg_q == seg_k) & (seg_k != 0)
  if causal:
    order = kf_j['slots'][:, None, :] <= qf_i['slots'][:, :, None]
    if 'prefix' in kf_j:
      order = order | kf_j['prefix'][:, None, :]
    visible = visible & order
  visible = visible[:, None]                                 # [B, 1, Q, K]
  return jnp.where(visible, s, NEG), visible


def _forward_block(q_i, qf_i, run_i, kb, vb, kf, slopes, static):
  """One query block against every key block: out [B, H, Q, D] (float32)
  and the log-sum-exp [B, H, Q]."""
  b, h, nq, d = q_i.shape
  f32 = jnp.float32

  def visit(carry, k_j, v_j, kf_j):
    m, l, acc = carry
    s, visible = _scores(q_i, k_j, qf_i, kf_j, slopes, static)
    m_new = jnp.maximum(m, jnp.max(s, -1))
    p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
    rescale = jnp.exp(m - m_new)
    pv = jnp.einsum('bhqk,bhkd->bhqd', p.astype(v_j.dtype), v_j,
                    preferred_element_type=f32)
    return m_new, l * rescale + jnp.sum(p, -1), acc * rescale[..., None] + pv

  def step(carry, xs):
    k_j, v_j, kf_j, run_ij = xs
    carry = jax.lax.cond(run_ij, lambda c: visit(c, k_j, v_j, kf_j),
                         lambda c: c, carry)
    return carry, None

  init = (jnp.full((b, h, nq), NEG, f32), jnp.zeros((b, h, nq), f32),
          jnp.zeros((b, h, nq, d), f32))
  (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kf, run_i))
  seen = l > 0  # a padding query sees no key: output 0, finite
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
  return out, lse


def _forward(qb, kb, vb, qf, kf, slopes, run, static):
  return jax.lax.map(
      lambda xs: _forward_block(*xs, kb, vb, kf, slopes, static),
      (qb, qf, run))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(qb, kb, vb, qf, kf, slopes, run, static):
  return _forward(qb, kb, vb, qf, kf, slopes, run, static)[0]


def _attention_fwd(qb, kb, vb, qf, kf, slopes, run, static):
  out, lse = _forward(qb, kb, vb, qf, kf, slopes, run, static)
  return out, (qb, kb, vb, qf, kf, slopes, run, out, lse)


def _attention_bwd(static, res, d_out):
  """Per visible tile: P = exp(S - lse), dV += P^T dO,
  dS = P (dO V^T - delta), dQ += dS K, dK += dS^T Q (times the scale)."""
  qb, kb, vb, qf, kf, slopes, run, out, lse = res
  f32 = jnp.float32
  scale = qb.shape[-1] ** -0.5
  delta = jnp.sum(d_out.astype(f32) * out, -1)               # [M,B,H,Q]

  def per_query_block(dkv, xs):
    q_i, qf_i, run_i, do_i, lse_i, delta_i = xs
    do_i = do_i.astype(vb.dtype)

    def visit(carry, j):
      dq, dk, dv = carry
      k_j, v_j = kb[j], vb[j]
      kf_j = jax.tree.map(lambda a: a[j], kf)
      s, visible = _scores(q_i, k_j, qf_i, kf_j, slopes, static)
      p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)
      dv = dv.at[j].add(jnp.einsum('bhqk,bhqd->bhkd', p.astype(v_j.dtype),
                                   do_i, preferred_element_type=f32))
      dp = jnp.einsum('bhqd,bhkd->bhqk', do_i, v_j,
                      preferred_element_type=f32)
      ds = (p * (dp - delta_i[..., None])).astype(q_i.dtype)
      dq = dq + jnp.einsum('bhqk,bhkd->bhqd', ds, k_j,
                           preferred_element_type=f32) * scale
      dk = dk.at[j].add(jnp.einsum('bhqk,bhqd->bhkd', ds, q_i,
                                   preferred_element_type=f32) * scale)
      return dq, dk, dv

    def step(carry, j):
      return jax.lax.cond(run_i[j], lambda c: visit(c, j), lambda c: c,
                          carry), None

    (dq, dk, dv), _ = jax.lax.scan(
        step, (jnp.zeros(q_i.shape, f32),) + dkv, jnp.arange(kb.shape[0]))
    return (dk, dv), dq.astype(q_i.dtype)

  zeros = jnp.zeros(kb.shape, f32)
  (dk, dv), dq = jax.lax.scan(per_query_block, (zeros, zeros),
                              (qb, qf, run, d_out, lse, delta))
  no_grad = lambda tree: jax.tree.map(
      lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
      if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a),
      tree)
  return (dq, dk.astype(kb.dtype), dv.astype(vb.dtype), no_grad(qf),
          no_grad(kf), jnp.zeros_like(slopes), no_grad(run))


_attention.defvjp(_attention_fwd, _attention_bwd)
