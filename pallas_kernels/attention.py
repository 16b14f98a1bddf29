"""Fused attention with the pattern computed in the kernel: the public API.

`flash_attention(q, k, v, ...)` is softmax attention whose mask and ALiBi
bias are never materialised: the kernels read per-token arrays (segment ids,
slots, prefix flags, positions) and the per-head ALiBi slopes, and build
each [block_q, block_k] tile of the pattern in registers / VMEM:

  key j is visible from query i  <=>  seg_q[i] == seg_kv[j] != 0  and
      (not causal  or  slot_kv[j] <= slot_q[i]  or  prefix_kv[j])
  score[h, i, j] = sm_scale * q_i . k_j  -  slope_h * |pos_q[i] - pos_kv[j]|

(the rules of `glm.model.attention.AttentionSpec`; `sm_scale` scales q.k only,
never the ALiBi term). Softmax runs online in float32 and the forward saves
the log-sum-exp; the backward is two kernels, dq (a query block against its
key blocks) and dk/dv (a key block against its query blocks), behind a
`custom_vjp`. Before any kernel runs, XLA reduces the per-token arrays to a
[B, n_q_blocks, n_k_blocks] table of tiles that can hold a visible key
(`block_map`); tiles it rules out are skipped, not computed (causal upper
triangles, other packed sequences, padding).

Backends (`backend=`):
  'gpu'  Pallas lowered through Triton (`pallas_kernels/attention_gpu.py`).
         Why Triton and not Mosaic GPU or tokamax: Mosaic GPU targets Hopper
         only, and these kernels must run on A100-class GPUs too; the Triton
         lowering still ships in the pinned jax even though upstream moved its
         Triton *ops* (not the lowering) to tokamax, and tokamax is neither a
         dependency here nor able to take an ALiBi bias on every backend (its
         TPU path rejects any bias). Owning the kernel is the only way to get
         in-kernel ALiBi plus per-example prefixes on both chips.
  'tpu'  Pallas lowered through Mosaic (`pallas_kernels/attention_tpu.py`).
`interpret=True` runs either on CPU (tests; TPU via
`pltpu.force_tpu_interpret_mode`, re-entered in the backward).

Letters: B batch, T queries, S keys, H heads, D head dim.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from glm.pallas_kernels import attention_gpu, attention_tpu
from glm.pallas_kernels.common import (NEG, BlockSizes, Static, block_map,
                                       tile_scores)

BACKENDS = ('gpu', 'tpu')
# What `jax.export` must be told to accept a Triton kernel's custom call
# (Mosaic's TPU and GPU calls are on its stable list already).
EXPORT_CHECKS = (
    jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton'),)
def flash_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_slots=None,
                    kv_slots=None, kv_prefix=None, q_positions=None,
                    kv_positions=None, alibi_slopes=None, causal=True,
                    sm_scale=None, backend='gpu', block_sizes=None,
                    interpret=False):
  """q [B, T, H, D], k, v [B, S, H, D] -> [B, T, H, D] in q's dtype.

  Segment ids [B, T] / [B, S] int32 (0 = padding); slots [B, T] / [B, S]
  int32 (default arange; causality is kv_slot <= q_slot); kv_prefix [B, S]
  bool (keys every query of the same segment sees); ALiBi from
  alibi_slopes [H] float32 and positions [B, T] / [B, S] int32 (default: the
  slots). Gradients flow to q, k and v; the pattern arrays and the slopes get
  none. Outputs of queries that see no key are 0.
  """
  options = {name: value for name, value in locals().items()
             if name not in ('q', 'k', 'v')}
  q, k, v, pattern, st, crop = _prepare(q, k, v, **options)
  return crop(_flash(q, k, v, pattern, st))


def _prepare(q, k, v, *, q_segment_ids, kv_segment_ids, q_slots, kv_slots,
             kv_prefix, q_positions, kv_positions, alibi_slopes, causal,
             sm_scale, backend, block_sizes, interpret):
  """Checks the arguments (eager ValueErrors), fills defaults and pads to
  the tiling. Returns the padded q, k, v, the pattern arrays, the Static
  and a function that crops a padded output back to [B, T, H, D]."""
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not one of {BACKENDS}.')
  b, t, h, d = _check_shapes(q, k, v)
  s = k.shape[1]
  ints = {'q_segment_ids': (q_segment_ids, (b, t)),
          'kv_segment_ids': (kv_segment_ids, (b, s)),
          'q_slots': (q_slots, (b, t)), 'kv_slots': (kv_slots, (b, s)),
          'q_positions': (q_positions, (b, t)),
          'kv_positions': (kv_positions, (b, s)),
          'kv_prefix': (kv_prefix, (b, s))}
  for name, (a, shape) in ints.items():
    if a is not None and tuple(a.shape) != shape:
      raise ValueError(f'{name} has shape {tuple(a.shape)}; q {q.shape} and '
                       f'k {k.shape} need {shape}.')
  if alibi_slopes is not None and tuple(alibi_slopes.shape) != (h,):
    raise ValueError(f'alibi_slopes has shape {tuple(alibi_slopes.shape)}; '
                     f'{h} heads need ({h},).')
  blocks = block_sizes or BlockSizes.default(backend)
  blocks.check(backend)
  arange = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  q_slots = arange(t) if q_slots is None else q_slots
  kv_slots = arange(s) if kv_slots is None else kv_slots
  pattern = {
      'q_seg': q_segment_ids, 'q_slot': q_slots,
      'q_pos': q_slots if q_positions is None else q_positions,
      'kv_seg': kv_segment_ids, 'kv_slot': kv_slots,
      'kv_pos': kv_slots if kv_positions is None else kv_positions,
      'kv_pre': (jnp.zeros((b, s), jnp.int32) if kv_prefix is None
                 else kv_prefix),
  }
  pattern = {name: a.astype(jnp.int32) for name, a in pattern.items()}
  pattern['slopes'] = (jnp.zeros((h,), jnp.float32) if alibi_slopes is None
                       else jnp.asarray(alibi_slopes, jnp.float32))
  bq, bk, bq2, bk2, tp, sp = _tiling(backend, blocks, t, s)
  st = Static(backend=backend, causal=bool(causal),
              sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale),
              has_alibi=alibi_slopes is not None,
              has_prefix=kv_prefix is not None, block_q=bq, block_k=bk,
              block_q_bwd=bq2, block_k_bwd=bk2, interpret=bool(interpret))
  dp = _padded_head_dim(backend, d)
  q, k, v, pattern = _pad(q, k, v, pattern, tp, sp, dp)
  return q, k, v, pattern, st, lambda out: out[:, :t, :, :d]


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q {q.shape}, k {k.shape}, v {v.shape}: expected '
                     '[B, T, H, D] and [B, S, H, D] twice.')
  b, t, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f'q {q.shape} and k {k.shape}, v {v.shape} do not '
                     'match: expected [B, T, H, D] and [B, S, H, D] twice.')
  if not 1 <= d <= 256:
    raise ValueError(f'head dim {d} (q {q.shape}) is outside 1..256.')
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f'q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} '
                     'differ: cast them to one.')
  return b, t, h, d


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _tiling(backend, blocks, t, s):
  """Blocks for these lengths and the padded lengths (multiples of both the
  forward and the backward blocks)."""
  if backend == 'gpu':  # one smaller power-of-two block for short inputs
    fit = lambda blk, n: min(blk, max(16, 1 << (n - 1).bit_length()))
  else:
    fit = lambda blk, n: min(blk, _round_up(n, 8 if blk % 128 else 128))
  bq, bq2 = fit(blocks.block_q, t), fit(blocks.block_q_bwd, t)
  bk, bk2 = fit(blocks.block_k, s), fit(blocks.block_k_bwd, s)
  tp = _round_up(t, np.lcm(bq, bq2))
  sp = _round_up(s, np.lcm(bk, bk2))
  return bq, bk, bq2, bk2, tp, sp


def _padded_head_dim(backend, d):
  """Triton tiles must be powers of two: D pads to one (>= 16) with zeros,
  which change neither q.k nor the first D output columns."""
  return max(16, 1 << (d - 1).bit_length()) if backend == 'gpu' else d


def _pad(q, k, v, pattern, tp, sp, dp):
  """Pads T, S (segment 0: invisible) and D (zeros)."""
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  seq = lambda a, n: jnp.pad(a, [(0, 0), (0, n)] + [(0, 0)] * (a.ndim - 2))
  q = jnp.pad(seq(q, tp - t), [(0, 0)] * 3 + [(0, dp - d)])
  k, v = (jnp.pad(seq(a, sp - s), [(0, 0)] * 3 + [(0, dp - d)])
          for a in (k, v))
  padded = {name: seq(a, (tp - t) if name.startswith('q') else (sp - s))
            for name, a in pattern.items() if name != 'slopes'}
  padded['slopes'] = pattern['slopes']
  return q, k, v, padded


# ---------------------------------------------------------------- reference


def _reference_scores(q, k, pattern, st: Static):
  """[B, H, T, S] masked float32 scores and the visibility, materialised."""
  prec = jax.lax.Precision.HIGHEST
  s = jnp.einsum('bthd,bshd->bhts', q, k, precision=prec,
                 preferred_element_type=jnp.float32)
  col = lambda a: a[:, None, :, None]   # [B, 1, T, 1]
  row = lambda a: a[:, None, None, :]   # [B, 1, 1, S]
  q_info = tuple(col(pattern[n]) for n in ('q_seg', 'q_slot', 'q_pos'))
  kv_info = tuple(row(pattern[n])
                  for n in ('kv_seg', 'kv_slot', 'kv_pos', 'kv_pre'))
  slope = pattern['slopes'][None, :, None, None]
  return tile_scores(s, q_info, kv_info, slope, st)


def mha_forward_reference(q, k, v, pattern, st: Static):
  """The forward kernels' contract in plain jnp: out [B, T, H, D] (q's
  dtype) and the log-sum-exp [B, H, T] (NEG for queries that see nothing)."""
  s, visible = _reference_scores(q, k, pattern, st)
  m = jnp.max(s, -1, keepdims=True)
  p = jnp.where(visible, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, -1, keepdims=True)
  seen = l > 0
  p = p / jnp.where(seen, l, 1.0)
  out = jnp.einsum('bhts,bshd->bthd', p.astype(v.dtype), v,
                   precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)[..., 0]
  return out.astype(q.dtype), lse


def mha_backward_reference(q, k, v, pattern, st: Static, out, lse, d_out):
  """The backward kernels' contract in plain jnp: dq, dk, dv."""
  f32, prec = jnp.float32, jax.lax.Precision.HIGHEST
  s, visible = _reference_scores(q, k, pattern, st)
  p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)  # [B, H, T, S]
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(f32), out.astype(f32))
  dp = jnp.einsum('bthd,bshd->bhts', d_out.astype(f32), v.astype(f32),
                  precision=prec)
  ds = p * (dp - delta[..., None]) * st.sm_scale
  dq = jnp.einsum('bhts,bshd->bthd', ds, k.astype(f32), precision=prec)
  dk = jnp.einsum('bhts,bthd->bshd', ds, q.astype(f32), precision=prec)
  dv = jnp.einsum('bhts,bthd->bshd', p, d_out.astype(f32), precision=prec)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def flash_attention_reference(q, k, v, **options):
  """`flash_attention`'s semantics with the pattern materialised (plain jnp,
  differentiable by autodiff): the yardstick for the kernels. Takes the
  same keyword arguments (backend and blocks only shape the padding)."""
  q, k, v, pattern, st, crop = _prepare(
      q, k, v, **{**_DEFAULTS, **options})
  return crop(mha_forward_reference(q, k, v, pattern, st)[0])


_DEFAULTS = {name: p.default for name, p in
             inspect.signature(flash_attention).parameters.items()
             if p.kind == p.KEYWORD_ONLY and name not in
             ('q_segment_ids', 'kv_segment_ids')}


# ------------------------------------------------------------- custom VJP


def _backend(st: Static):
  return attention_gpu if st.backend == 'gpu' else attention_tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, pattern, st):
  return _backend(st).forward(q, k, v, pattern, st)[0]


def _flash_fwd(q, k, v, pattern, st):
  out, lse = _backend(st).forward(q, k, v, pattern, st)
  return out, (q, k, v, pattern, out, lse)


def _flash_bwd(st, res, d_out):
  q, k, v, pattern, out, lse = res
  dq, dk, dv = _backend(st).backward(q, k, v, pattern, out, lse, d_out, st)
  no_grad = {name: (jnp.zeros_like(a) if name == 'slopes' else
                    np.zeros(a.shape, jax.dtypes.float0))
             for name, a in pattern.items()}
  return dq, dk, dv, no_grad


_flash.defvjp(_flash_fwd, _flash_bwd)
