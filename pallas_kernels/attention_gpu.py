"""Fused attention kernels for NVIDIA GPUs: Pallas lowered through Triton.

Called through `glm.pallas_kernels.flash_attention(..., backend='gpu')`,
which pads T and S to the blocks and D to a power of two (Triton tiles must
be powers of two) and owns the custom VJP. Three kernels, all in the
[B, T, H, D] layout (a (None, block, None, D) BlockSpec picks one head):

  forward  grid (B, H, T/bq): a query block, a loop over the key blocks of
           its row of the block map, online softmax; writes out and the
           log-sum-exp [B, H, T].
  dq       grid (B, H, T/bq): the same loop, accumulating dS K.
  dk/dv    grid (B, H, S/bk): a key block, a loop over the query blocks of
           its column of the block map, accumulating dS^T Q and P^T dO.

Skipped tiles cost one scalar load: the loop body runs under `lax.cond` on
the block map (`common.block_map`). The tile's pattern comes from
`common.tile_scores`, shared with the TPU kernels and the reference.
fp32 inputs multiply in IEEE fp32 (precision HIGHEST, not TF32), so they
match the reference to float32 rounding; bf16 inputs multiply in bf16 with
fp32 accumulation.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from glm.pallas_kernels.common import NEG, Static, block_map, tile_scores
from glm.pallas_kernels.common import tile_dot as _dot

_Q_FIELDS = ('q_seg', 'q_slot', 'q_pos')
_KV_FIELDS = ('kv_seg', 'kv_slot', 'kv_pos', 'kv_pre')


def _compiler_params(d: int):
  return pltriton.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _q_info(refs, sl=slice(None)):
  """(seg, slot, pos) of a query block, as [bq, 1] columns."""
  return tuple(r[sl][:, None] for r in refs)


def _kv_info(refs, sl=slice(None)):
  """(seg, slot, pos, prefix) of a key block, as [1, bk] rows."""
  return tuple(r[sl][None, :] for r in refs)


def _forward_kernel(run_ref, q_ref, k_ref, v_ref, *refs, st: Static):
  q_refs, kv_refs = refs[0:3], refs[3:7]
  slope_ref, o_ref, lse_ref = refs[7:]
  bq, bk = st.block_q, st.block_k
  q = q_ref[...]                                          # [bq, D]
  q_info = _q_info(q_refs)
  slope = slope_ref[...]

  def visit(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]                 # [bk, D]
    s, visible = tile_scores(_dot(q, k, (1, 1)), q_info,
                             _kv_info(kv_refs, keys), slope, st)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    rescale = jnp.exp(m - m_new)
    l = l * rescale + jnp.sum(p, axis=1)
    acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
    return acc, m_new, l

  def body(j, carry):
    return lax.cond(run_ref[j] != 0, functools.partial(visit, j),
                    lambda c: c, carry)

  d = q.shape[1]
  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, k_ref.shape[0] // bk, body, init)
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)


def _specs(tp, sp, d, block, *, per_q: bool):
  """BlockSpecs for a grid (B, H, n) whose third axis walks query blocks
  (per_q) or key blocks; the other side is passed whole."""
  bq, bk = (block, sp) if per_q else (tp, block)
  qi = (lambda b_, h_, i: (b_, i, h_, 0)) if per_q else (
      lambda b_, h_, i: (b_, 0, h_, 0))
  ki = (lambda b_, h_, i: (b_, 0, h_, 0)) if per_q else (
      lambda b_, h_, i: (b_, i, h_, 0))
  return {
      'q': pl.BlockSpec((None, bq, None, d), qi),
      'kv': pl.BlockSpec((None, bk, None, d), ki),
      'q_tok': pl.BlockSpec((None, bq),
                            lambda b_, h_, i: (b_, qi(b_, h_, i)[1])),
      'kv_tok': pl.BlockSpec((None, bk),
                             lambda b_, h_, i: (b_, ki(b_, h_, i)[1])),
      'row': pl.BlockSpec((None, None, bq),
                          lambda b_, h_, i: (b_, h_, qi(b_, h_, i)[1])),
      'slope': pl.BlockSpec((None,), lambda b_, h_, i: (h_,)),
  }


def forward(q, k, v, pattern, st: Static):
  """Padded inputs -> (out [B, T, H, D], lse [B, H, T] float32)."""
  b, tp, h, d = q.shape
  sp = k.shape[1]
  run = block_map(pattern, st.block_q, st.block_k, causal=st.causal)
  sp_ = _specs(tp, sp, d, st.block_q, per_q=True)
  nk = sp // st.block_k
  in_specs = ([pl.BlockSpec((None, None, nk), lambda b_, h_, i: (b_, i, 0)),
               sp_['q'], sp_['kv'], sp_['kv']]
              + [sp_['q_tok']] * 3 + [sp_['kv_tok']] * 4 + [sp_['slope']])
  return pl.pallas_call(
      functools.partial(_forward_kernel, st=st),
      grid=(b, h, tp // st.block_q),
      in_specs=in_specs,
      out_specs=[sp_['q'], sp_['row']],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=_compiler_params(d),
      interpret=st.interpret,
      name='glm_flash_forward',
  )(run, q, k, v, *(pattern[n] for n in _Q_FIELDS),
    *(pattern[n] for n in _KV_FIELDS), pattern['slopes'])


def _dq_kernel(run_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, st: Static):
  q_refs, kv_refs = refs[0:3], refs[3:7]
  slope_ref, dq_ref = refs[7:]
  bk = st.block_k_bwd
  q, do = q_ref[...], do_ref[...]                         # [bq, D]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_info = _q_info(q_refs)
  slope = slope_ref[...]

  def visit(j, dq):
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s, visible = tile_scores(_dot(q, k, (1, 1)), q_info,
                             _kv_info(kv_refs, keys), slope, st)
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    ds = p * (_dot(do, v, (1, 1)) - delta)
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  def body(j, dq):
    return lax.cond(run_ref[j] != 0, functools.partial(visit, j),
                    lambda c: c, dq)

  dq = lax.fori_loop(0, k_ref.shape[0] // bk, body,
                     jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(run_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, st: Static):
  q_refs, kv_refs = refs[0:3], refs[3:7]
  slope_ref, dk_ref, dv_ref = refs[7:]
  bq = st.block_q_bwd
  k, v = k_ref[...], v_ref[...]                           # [bk, D]
  kv_info = _kv_info(kv_refs)
  slope = slope_ref[...]

  def visit(i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]               # [bq, D]
    s, visible = tile_scores(_dot(q, k, (1, 1)), _q_info(q_refs, rows),
                             kv_info, slope, st)
    p = jnp.where(visible, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
    ds = p * (_dot(do, v, (1, 1)) - delta_ref[rows][:, None])
    return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

  def body(i, carry):
    return lax.cond(run_ref[i] != 0, functools.partial(visit, i),
                    lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
  dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, pattern, out, lse, d_out, st: Static):
  """Padded inputs and cotangent -> dq, dk, dv."""
  b, tp, h, d = q.shape
  sp = k.shape[1]
  bq, bk = st.block_q_bwd, st.block_k_bwd
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32),
                     out.astype(jnp.float32))             # [B, H, T]
  run = block_map(pattern, bq, bk, causal=st.causal)      # [B, T/bq, S/bk]
  toks = ([pattern[n] for n in _Q_FIELDS] + [pattern[n] for n in _KV_FIELDS]
          + [pattern['slopes']])
  common = dict(compiler_params=_compiler_params(d), interpret=st.interpret)

  s_q = _specs(tp, sp, d, bq, per_q=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(b, h, tp // bq),
      in_specs=([pl.BlockSpec((None, None, sp // bk),
                              lambda b_, h_, i: (b_, i, 0)),
                 s_q['q'], s_q['kv'], s_q['kv'], s_q['q'], s_q['row'],
                 s_q['row']] + [s_q['q_tok']] * 3 + [s_q['kv_tok']] * 4
                + [s_q['slope']]),
      out_specs=s_q['q'],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name='glm_flash_dq', **common,
  )(run, q, k, v, d_out, lse, delta, *toks)

  s_k = _specs(tp, sp, d, bk, per_q=False)
  whole_row = pl.BlockSpec((None, None, tp), lambda b_, h_, i: (b_, h_, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(b, h, sp // bk),
      in_specs=([pl.BlockSpec((None, None, tp // bq),
                              lambda b_, h_, i: (b_, i, 0)),
                 s_k['q'], s_k['kv'], s_k['kv'], s_k['q'], whole_row,
                 whole_row] + [s_k['q_tok']] * 3 + [s_k['kv_tok']] * 4
                + [s_k['slope']]),
      out_specs=[s_k['kv'], s_k['kv']],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      name='glm_flash_dkv', **common,
  )(jnp.swapaxes(run, 1, 2), q, k, v, d_out, lse, delta, *toks)
  return dq, dk, dv
