"""Fused attention kernels for TPUs: Pallas lowered through Mosaic.

Called through `glm.pallas_kernels.flash_attention(..., backend='tpu')`,
which pads T and S to the blocks and owns the custom VJP. The kernels work in
[B, H, T, D] (heads next to batch, so a (None, None, block, D) BlockSpec is
an (8, 128)-tiled slab); every grid is (B, H, outer blocks, inner blocks)
with the inner axis 'arbitrary', carrying the online-softmax state or the
gradient sums in VMEM scratch across it:

  forward  (B, H, T/bq, S/bk): m, l, acc scratch; writes out and the
           log-sum-exp [B, H, T, 1] at the last key block.
  dq       (B, H, T/bq, S/bk): dq scratch.
  dk/dv    (B, H, S/bk, T/bq): dk, dv scratch.

The block map (`common.block_map`, flattened) is a scalar-prefetch
operand in SMEM; a tile it rules out is skipped with `pl.when`. The pattern
arrays travel packed: (seg, slot, pos) per query as [B, T, 3] (blocks
(bq, 3)) and (seg, slot, pos, prefix) per key as [B, 4, S] (blocks (4, bk)),
so each tile's mask and ALiBi bias come from `common.tile_scores` without
a [T, S] array. Per-head slopes sit in SMEM. The running max and sum are
kept 128 lanes wide, as Mosaic lays out row statistics.

Interpret mode (`st.interpret`) wraps every call, forward and backward, in
`pltpu.force_tpu_interpret_mode()`: the backward is traced after the
forward's context has closed.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glm.pallas_kernels.common import NEG, Static, block_map, tile_scores
from glm.pallas_kernels.common import tile_dot as _dot

LANES = 128


def _mode(st: Static):
  return (pltpu.force_tpu_interpret_mode() if st.interpret
          else contextlib.nullcontext())


def _tile(st, q, k, qi_ref, kvi_ref, slopes_ref):
  """Scores and visibility of the current tile."""
  q_info = tuple(qi_ref[:, c:c + 1] for c in range(3))      # [bq, 1] each
  kv_info = tuple(kvi_ref[c:c + 1, :] for c in range(4))    # [1, bk] each
  return tile_scores(_dot(q, k, (1, 1)), q_info, kv_info,
                     slopes_ref[pl.program_id(1)], st)


def _run(run_ref, i, j, n_i, n_j):
  return run_ref[(pl.program_id(0) * n_i + i) * n_j + j] != 0


def _forward_kernel(run_ref, q_ref, k_ref, v_ref, qi_ref, kvi_ref, slopes_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, st: Static):
  i, j = pl.program_id(2), pl.program_id(3)
  n_i, n_j = pl.num_programs(2), pl.num_programs(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(_run(run_ref, i, j, n_i, n_j))
  def _visit():
    v = v_ref[...]
    s, visible = _tile(st, q_ref[...], k_ref[...], qi_ref, kvi_ref,
                       slopes_ref)                        # [bq, bk]
    m_prev = m_scr[...]                                   # [bq, LANES]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new[:, :1]), 0.0)
    rescale = jnp.exp(m_prev - m_new)
    l_scr[...] = l_scr[...] * rescale + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = (acc_scr[...] * rescale[:, :1]
                    + _dot(p.astype(v.dtype), v, (1, 0)))
    m_scr[...] = m_new

  @pl.when(j == n_j - 1)
  def _finish():
    l, m = l_scr[...][:, :1], m_scr[...][:, :1]           # [bq, 1]
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scr[...] / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), NEG)


def _packed(pattern):
  """[B, T, 3] query fields and [B, 4, S] key fields."""
  q_info = jnp.stack([pattern[n] for n in ('q_seg', 'q_slot', 'q_pos')], -1)
  kv_info = jnp.stack([pattern[n] for n in
                       ('kv_seg', 'kv_slot', 'kv_pos', 'kv_pre')], 1)
  return q_info, kv_info


def _specs(bq, bk, d, *, q_outer: bool):
  """BlockSpecs for a grid (B, H, outer, inner) over query blocks then key
  blocks (q_outer) or key blocks then query blocks."""
  def qk(fn):  # index maps see (b, h, outer, inner, run_ref)
    if q_outer:
      return lambda b, h, o, n, _: fn(b, h, o, n)
    return lambda b, h, o, n, _: fn(b, h, n, o)
  return {
      'q': pl.BlockSpec((None, None, bq, d), qk(lambda b, h, i, j:
                                                (b, h, i, 0))),
      'kv': pl.BlockSpec((None, None, bk, d), qk(lambda b, h, i, j:
                                                 (b, h, j, 0))),
      'q_info': pl.BlockSpec((None, bq, 3), qk(lambda b, h, i, j: (b, i, 0))),
      'kv_info': pl.BlockSpec((None, 4, bk), qk(lambda b, h, i, j:
                                                (b, 0, j))),
      'row': pl.BlockSpec((None, None, bq, 1), qk(lambda b, h, i, j:
                                                  (b, h, i, 0))),
      'slopes': pl.BlockSpec(memory_space=pltpu.SMEM),
  }


def _params():
  return pltpu.CompilerParams(dimension_semantics=(
      'parallel', 'parallel', 'parallel', 'arbitrary'))


def forward(q, k, v, pattern, st: Static):
  """Padded [B, T, H, D] inputs -> (out [B, T, H, D], lse [B, H, T, 1])."""
  b, tp, h, d = q.shape
  sp = k.shape[1]
  bq, bk = st.block_q, st.block_k
  run = block_map(pattern, bq, bk, causal=st.causal).reshape(-1)
  sp_ = _specs(bq, bk, d, q_outer=True)
  qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T|S, D]
  grid = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, h, tp // bq, sp // bk),
      in_specs=[sp_['q'], sp_['kv'], sp_['kv'], sp_['q_info'],
                sp_['kv_info'], sp_['slopes']],
      out_specs=[sp_['q'], sp_['row']],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  with _mode(st):
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, st=st), grid_spec=grid,
        out_shape=[jax.ShapeDtypeStruct(qh.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32)],
        compiler_params=_params(), name='glm_flash_forward',
    )(run, qh, kh, vh, *_packed(pattern), pattern['slopes'])
  return jnp.swapaxes(out, 1, 2), lse


def _dq_kernel(run_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qi_ref, kvi_ref, slopes_ref, dq_ref, dq_scr, *, st: Static):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(_run(run_ref, i, j, pl.num_programs(2), pl.num_programs(3)))
  def _visit():
    k, do = k_ref[...], do_ref[...]
    s, visible = _tile(st, q_ref[...], k, qi_ref, kvi_ref, slopes_ref)
    p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
    ds = p * (_dot(do, v_ref[...], (1, 1)) - delta_ref[...])
    dq_scr[...] += _dot(ds.astype(k.dtype), k, (1, 0))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * st.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(run_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                qi_ref, kvi_ref, slopes_ref, dk_ref, dv_ref, dk_scr, dv_scr,
                *, st: Static):
  j, i = pl.program_id(2), pl.program_id(3)   # key block outer, query inner

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(_run(run_ref, j, i, pl.num_programs(2), pl.num_programs(3)))
  def _visit():
    q, do = q_ref[...], do_ref[...]
    s, visible = _tile(st, q, k_ref[...], qi_ref, kvi_ref, slopes_ref)
    p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
    dv_scr[...] += _dot(p.astype(do.dtype), do, (0, 0))
    ds = p * (_dot(do, v_ref[...], (1, 1)) - delta_ref[...])
    dk_scr[...] += _dot(ds.astype(q.dtype), q, (0, 0))

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, pattern, out, lse, d_out, st: Static):
  """Padded inputs and cotangent -> dq, dk, dv (all [B, T|S, H, D])."""
  b, tp, h, d = q.shape
  sp = k.shape[1]
  bq, bk = st.block_q_bwd, st.block_k_bwd
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32),
                     out.astype(jnp.float32))[..., None]  # [B, H, T, 1]
  run = block_map(pattern, bq, bk, causal=st.causal)      # [B, T/bq, S/bk]
  qh, kh, vh, doh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v, d_out))
  q_info, kv_info = _packed(pattern)
  operands = (qh, kh, vh, doh, lse, delta, q_info, kv_info, pattern['slopes'])

  def specs(sp_):
    return [sp_['q'], sp_['kv'], sp_['kv'], sp_['q'], sp_['row'], sp_['row'],
            sp_['q_info'], sp_['kv_info'], sp_['slopes']]

  s_q = _specs(bq, bk, d, q_outer=True)
  s_k = _specs(bq, bk, d, q_outer=False)
  with _mode(st):
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, tp // bq, sp // bk),
            in_specs=specs(s_q), out_specs=s_q['q'],
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_params(), name='glm_flash_dq',
    )(run.reshape(-1), *operands)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, sp // bk, tp // bq),
            in_specs=specs(s_k), out_specs=[s_k['kv'], s_k['kv']],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype)] * 2,
        compiler_params=_params(), name='glm_flash_dkv',
    )(jnp.swapaxes(run, 1, 2).reshape(-1), *operands)
  return tuple(jnp.swapaxes(a, 1, 2) for a in (dq, dk, dv))
