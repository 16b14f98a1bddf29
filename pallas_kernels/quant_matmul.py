"""Weight-only quantised matmul: y = (x @ W_int) * scale, W held as int8 or as
int4 packed two to a byte, dequantised tile by tile inside the kernel.

  x      [M, K]  activations (float32 or bfloat16)
  q      [K, N]  int8 (bits=8), or [K/2, N] int8 (bits=4): byte r holds
                 row 2r in its low nibble and row 2r + 1 in its high one,
                 both two's complement in [-8, 7]
  scale  [N]     float32, one per output channel
  y      [M, N]  out_dtype; products accumulate in float32

For int4 the activations are split outside the kernel into their even and
odd columns (x[:, 0::2], x[:, 1::2], each [M, K/2], a cheap pass over the
activations), so that a tile is x_even @ low + x_odd @ high with no
interleaving of the unpacked weights in the kernel. The scale is applied to
the accumulated tile (it is per output column), never to the weights.

Backends: 'gpu' is a Triton kernel (grid over M x N tiles, a loop over K);
'tpu' is a Mosaic kernel (grid M x N x K, float32 VMEM accumulator). Both run
in interpret mode on CPU (`interpret=True`) and lower for their chip with
`jax.export` from any host. Inputs are zero-padded to whole tiles (padding
adds zero products) and the result is cut back. Inference only: there is no
VJP (quantised weights are not trained).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

EXPORT_CHECKS = (
    jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton'),)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes over M, N and K (K counts packed rows for int4)."""
  m: int
  n: int
  k: int

  @classmethod
  def default(cls, backend: str) -> 'Blocks':
    # Triton dots want every tile dim >= 16; Mosaic wants (8, 128) float
    # tiles and (32, 128) int8 ones.
    return cls(16, 64, 64) if backend == 'gpu' else cls(32, 128, 128)


def unpack_int4(q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int8 [..] bytes -> (low, high) int32 nibbles in [-8, 7]."""
  w = q.astype(jnp.int32)                  # sign-extended byte
  low = jax.lax.shift_right_arithmetic(jax.lax.shift_left(w, 28), 28)
  return low, jax.lax.shift_right_arithmetic(w, 4)


def quant_matmul_reference(x, q, scale, *, bits: int, out_dtype=None):
  """The same product in plain jnp: unpack, dequantise, one dot."""
  out_dtype = out_dtype or x.dtype
  if bits == 4:
    low, high = unpack_int4(q)
    w = jnp.stack([low, high], axis=1).reshape(-1, q.shape[1])  # [K, N]
  else:
    w = q.astype(jnp.int32)
  y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  return (y * scale.astype(jnp.float32)).astype(out_dtype)


def _split_x(x, bits):
  """The activation operands of the kernel: (x,) or (x_even, x_odd)."""
  if bits == 4:
    return x[:, 0::2], x[:, 1::2]
  return (x,)


def _tile_product(xs, q, bits):
  """sum over the operands of x_part @ w_part for one tile, float32."""
  if bits == 4:
    ws = unpack_int4(q)
  else:
    ws = (q.astype(jnp.int32),)
  acc = None
  for x, w in zip(xs, ws):
    part = jax.lax.dot(x, w.astype(x.dtype),
                       preferred_element_type=jnp.float32)
    acc = part if acc is None else acc + part
  return acc


# GPU (Triton) ---------------------------------------------------------------


def _gpu_kernel(*refs, bits, blocks, num_k):
  *x_refs, q_ref, s_ref, o_ref = refs
  bk = blocks.k

  def body(i, acc):
    ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
    xs = [r[:, ks] for r in x_refs]
    return acc + _tile_product(xs, q_ref[ks, :], bits)

  acc = jax.lax.fori_loop(0, num_k, body,
                          jnp.zeros((blocks.m, blocks.n), jnp.float32))
  o_ref[...] = (acc * s_ref[...]).astype(o_ref.dtype)


def _gpu_call(xs, q, scale, *, bits, blocks, out_dtype, interpret):
  m, kq = xs[0].shape
  n = q.shape[1]
  x_spec = pl.BlockSpec((blocks.m, kq), lambda i, j: (i, 0))
  return pl.pallas_call(
      functools.partial(_gpu_kernel, bits=bits, blocks=blocks,
                        num_k=kq // blocks.k),
      grid=(m // blocks.m, n // blocks.n),
      in_specs=[x_spec] * len(xs) + [
          pl.BlockSpec((kq, blocks.n), lambda i, j: (0, j)),
          pl.BlockSpec((1, blocks.n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((blocks.m, blocks.n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name='glm_quant_matmul',
  )(*xs, q, scale)


# TPU (Mosaic) ---------------------------------------------------------------


def _tpu_kernel(*refs, bits):
  *x_refs, q_ref, s_ref, o_ref, acc_ref = refs
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += _tile_product([r[...] for r in x_refs], q_ref[...], bits)

  @pl.when(k == pl.num_programs(2) - 1)
  def _finish():
    o_ref[...] = (acc_ref[...] * s_ref[...]).astype(o_ref.dtype)


def _tpu_call(xs, q, scale, *, bits, blocks, out_dtype, interpret):
  m, kq = xs[0].shape
  n = q.shape[1]
  x_spec = pl.BlockSpec((blocks.m, blocks.k), lambda i, j, k: (i, k))
  mode = (pltpu.force_tpu_interpret_mode() if interpret
          else contextlib.nullcontext())
  with mode:
    return pl.pallas_call(
        functools.partial(_tpu_kernel, bits=bits),
        grid=(m // blocks.m, n // blocks.n, kq // blocks.k),
        in_specs=[x_spec] * len(xs) + [
            pl.BlockSpec((blocks.k, blocks.n), lambda i, j, k: (k, j)),
            pl.BlockSpec((1, blocks.n), lambda i, j, k: (0, j))],
        out_specs=pl.BlockSpec((blocks.m, blocks.n), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((blocks.m, blocks.n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'arbitrary')),
        name='glm_quant_matmul',
    )(*xs, q, scale)


# Public ---------------------------------------------------------------------


def _pad_to(a, axis, multiple):
  extra = -a.shape[axis] % multiple
  if not extra:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def quant_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, bits: int,
                 out_dtype=None, backend: str = 'gpu',
                 blocks: Blocks | None = None,
                 interpret: bool = False) -> jax.Array:
  """(x @ dequantised q) [M, N]; see the module doc for the layouts."""
  if bits not in (4, 8):
    raise ValueError(f'bits={bits} must be 4 or 8.')
  if backend not in ('gpu', 'tpu'):
    raise ValueError(f"backend={backend!r} must be 'gpu' or 'tpu'.")
  if q.dtype != jnp.int8 or x.ndim != 2 or q.ndim != 2:
    raise ValueError(f'x [M, K] and int8 q [K(/2), N] expected, got '
                     f'{x.shape} and {q.dtype} {q.shape}.')
  m, k = x.shape
  n = q.shape[1]
  if k != q.shape[0] * (2 if bits == 4 else 1) or scale.shape != (n,):
    raise ValueError(f'x {x.shape}, q {q.shape} (bits={bits}) and scale '
                     f'{scale.shape} do not match.')
  out_dtype = out_dtype or x.dtype
  blocks = blocks or Blocks.default(backend)
  xs = [_pad_to(_pad_to(a, 0, blocks.m), 1, blocks.k)
        for a in _split_x(x, bits)]
  qp = _pad_to(_pad_to(q, 0, blocks.k), 1, blocks.n)
  sp = _pad_to(scale.astype(jnp.float32)[None, :], 1, blocks.n)
  call = _gpu_call if backend == 'gpu' else _tpu_call
  y = call(xs, qp, sp, bits=bits, blocks=blocks, out_dtype=out_dtype,
           interpret=interpret)
  return y[:m, :n]
