"""What the attention kernels of both backends share: block sizes, the
static description of a call, the tile-skipping map and the in-tile pattern
(the semantics are in `glm.pallas_kernels.attention`)."""

from __future__ import annotations

import dataclasses

from jax import lax
import jax.numpy as jnp
import numpy as np

# A finite stand-in for -inf (no inf - inf = NaN in the online softmax).
NEG = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: forward (block_q x block_k) and backward (the dq and the
  dk/dv kernels both use block_q_bwd x block_k_bwd).

  GPU: powers of two >= 16. TPU: block_q a multiple of 8, block_k a
  multiple of 128 (Mosaic's (8, 128) tiling). Sequences shorter than a block
  use one smaller block; longer ones are padded to a multiple.
  """
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int

  @classmethod
  def default(cls, backend: str) -> 'BlockSizes':
    if backend == 'gpu':  # 64 x 64 tiles: fits A100 and H100 shared memory
      return cls(64, 64, 64, 64)  # for D <= 128 in fp32 and bf16.
    return cls(128, 128, 128, 128)

  def check(self, backend: str) -> None:
    for name, value in dataclasses.asdict(self).items():
      if backend == 'gpu' and (value < 16 or value & (value - 1)):
        raise ValueError(f'BlockSizes.{name}={value}: the gpu backend needs '
                         'a power of two >= 16.')
      if backend == 'tpu':
        mult = 128 if name.startswith('block_k') else 8
        if value < mult or value % mult:
          raise ValueError(f'BlockSizes.{name}={value}: the tpu backend '
                           f'needs a multiple of {mult}.')


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about one call (hashable: a custom_vjp nondiff arg)."""
  backend: str
  causal: bool
  sm_scale: float
  has_alibi: bool
  has_prefix: bool
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  interpret: bool


def block_map(pattern: dict, block_q: int, block_k: int, *,
              causal: bool) -> jax.Array:
  """[B, T/block_q, S/block_k] int32: 1 where the tile may hold a visible
  key (a conservative test on per-block ranges; the kernel still masks
  every element), 0 where it cannot and is skipped."""
  big = jnp.iinfo(jnp.int32).max

  def ranges(seg, slot, blk):
    b, n = seg.shape
    seg, slot = seg.reshape(b, n // blk, blk), slot.reshape(b, n // blk, blk)
    live = seg != 0
    return (jnp.min(jnp.where(live, seg, big), -1),
            jnp.max(jnp.where(live, seg, 0), -1),
            jnp.min(jnp.where(live, slot, big), -1),
            jnp.max(jnp.where(live, slot, -big), -1), live)

  q_lo, q_hi, _, q_slot_hi, _ = ranges(pattern['q_seg'], pattern['q_slot'],
                                       block_q)
  k_lo, k_hi, k_slot_lo, _, k_live = ranges(
      pattern['kv_seg'], pattern['kv_slot'], block_k)
  run = ((q_lo[:, :, None] <= k_hi[:, None, :])
         & (k_lo[:, None, :] <= q_hi[:, :, None]))
  if causal:
    order = k_slot_lo[:, None, :] <= q_slot_hi[:, :, None]
    b, s = pattern['kv_pre'].shape
    pre = pattern['kv_pre'].reshape(b, s // block_k, block_k) != 0
    order = order | jnp.any(pre & k_live, -1)[:, None, :]
    run = run & order
  return run.astype(jnp.int32)


def tile_scores(s, q_info, kv_info, slope, st: Static):
  """One tile's float32 scores from the raw q.k products s [bq, bk]:
  scaled, ALiBi-biased, masked to NEG. q_info: (seg, slot, pos) [bq, 1];
  kv_info: (seg, slot, pos, prefix) [1, bk]; slope: the head's, a scalar.
  Returns (scores, visible). Shared by both backends' kernels."""
  q_seg, q_slot, q_pos = q_info
  kv_seg, kv_slot, kv_pos, kv_pre = kv_info
  s = s * st.sm_scale
  if st.has_alibi:
    s = s - slope * jnp.abs(q_pos - kv_pos).astype(jnp.float32)
  visible = (q_seg == kv_seg) & (kv_seg != 0)
  if st.causal:
    order = kv_slot <= q_slot
    if st.has_prefix:
      order = order | (kv_pre != 0)
    visible = visible & order
  return jnp.where(visible, s, NEG), visible


def tile_dot(a, b, contract):
  """A 2-D tile product with fp32 accumulation, contract = (a_dim, b_dim):
  fp32 inputs multiply in IEEE fp32 (HIGHEST: not TF32 on GPUs, not bf16
  passes on TPUs), bf16 inputs natively. Shared by both backends' kernels."""
  prec = (lax.Precision.HIGHEST if a.dtype == jnp.float32
          else lax.Precision.DEFAULT)
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=prec, preferred_element_type=jnp.float32)
