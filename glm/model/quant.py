"""Weight-only INT8 / INT4 quantisation, GLM-130B's scheme.

The four weight matrices of every block (q, k, v; attention output; MLP in;
MLP out) are quantised symmetrically per output channel:

  scale[o] = max_i |W[i, o]| / Q      Q = 127 (INT8) or 7 (INT4), float32
  W_int    = round(W / scale)         round half to even, in [-Q, Q]
  W       ~= W_int * scale

i runs over the contracted dims (the input), o over the output dims, so a
`query` kernel [E, H, D] has scales [H, D] and the attention `out` kernel
[H, D, E] has scales [E]. Embeddings, norms, biases and the output layer
stay float. INT4 packs two values per byte along the last contracted dim:
byte r holds index 2r in its low nibble and 2r + 1 in its high nibble (so
that dim must be even). A quantised model (`ModelConfig.quant_bits` 8 or 4)
declares each such kernel as an int8 param of its original name (the packed
shape for INT4) and a float32 `<name>_scale`, both with the kernel's logical
axes, so checkpoints, sharding rules and `glm plan` see ordinary params.

`dense` dequantises inside the product: the weight's integers enter the
matmul in the compute dtype (exact: |W_int| <= 127) and the float32 scale
multiplies the float32-accumulated output columns, so activations stay in
the policy's dtype. `ModelConfig.quant_matmul_impl` picks plain XLA or the
Pallas kernel (`glm.pallas_kernels.quant_matmul`).

Why not qwix: qwix's weight-only rules quantise a whole Flax model by
intercepting its dots, but its absmax bound is 127.5 / 7.5 (a different
grid from GLM-130B's 127 / 7), it stores INT4 unpacked (one value per
int8 / native int4 array, no two-per-byte layout in a checkpoint), and its
quantised params replace ours with its own wrapper types, so the logical
axes and our plain-array checkpoints would not carry over. The scheme is a
dozen lines; it is written here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from glm.pallas_kernels import quant_matmul

QMAX = {8: 127, 4: 7}
# The kernels quantised, by param name (attention, then MLP): how many of
# their leading dims are contracted (the input).
CONTRACT = {'query': 1, 'key': 1, 'value': 1, 'out': 2, 'wi': 1, 'wo': 1}


class Quantized(NamedTuple):
  """A quantised kernel as `dense` receives it (never a pytree leaf)."""
  q: jax.Array          # int8, the kernel's dims (last contracted one halved)
  scale: jax.Array      # float32, the kernel's output dims
  bits: int
  impl: str


def quantize(w: np.ndarray, bits: int, contract: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """float kernel [*C, *O] (`contract` = len(C)) -> (int8 q, float32 scale
  [*O]); for INT4 q is packed along C's last dim."""
  if bits not in QMAX:
    raise ValueError(f'bits={bits} must be 8 or 4.')
  w = np.asarray(w, np.float32)
  qmax = QMAX[bits]
  scale = np.max(np.abs(w), axis=tuple(range(contract))) / qmax  # [*O]
  safe = np.where(scale > 0, scale, 1.0)          # an all-zero column
  q = np.clip(np.rint(w / safe), -qmax, qmax).astype(np.int8)
  if bits == 4:
    q = pack_int4(q, contract - 1)
  return q, scale.astype(np.float32)


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
  """int8 values in [-8, 7] -> bytes, two along `axis` (even length)."""
  if q.shape[axis] % 2:
    raise ValueError(f'INT4 packs pairs along axis {axis}; its size '
                     f'{q.shape[axis]} is odd.')
  low = np.take(q, np.arange(0, q.shape[axis], 2), axis=axis)
  high = np.take(q, np.arange(1, q.shape[axis], 2), axis=axis)
  packed = (low.astype(np.uint8) & 0x0F) | (high.astype(np.uint8) << 4)
  return packed.astype(np.uint8).view(np.int8)


def unpack_int4(p: jax.Array, axis: int) -> jax.Array:
  """Bytes -> int8 values, the inverse of `pack_int4` (jnp or numpy)."""
  w = jnp.asarray(p).astype(jnp.int32)
  low = jax.lax.shift_right_arithmetic(jax.lax.shift_left(w, 28), 28)
  high = jax.lax.shift_right_arithmetic(w, 4)
  both = jnp.stack([low, high], axis=axis + 1)
  shape = list(p.shape)
  shape[axis] *= 2
  return both.reshape(shape).astype(jnp.int8)


def dequantize(q: Any, scale: Any, bits: int, contract: int) -> jax.Array:
  """The float32 kernel a quantised one stands for."""
  w = unpack_int4(q, contract - 1) if bits == 4 else jnp.asarray(q)
  return w.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)


def packed_shape(shape: tuple[int, ...], bits: int,
                 contract: int) -> tuple[int, ...]:
  shape = list(shape)
  if bits == 4:
    shape[contract - 1] //= 2
  return tuple(shape)


def quantized_dense(eqn: str, x: jax.Array, w: Quantized, *, dtype,
                    out_dtype=None) -> jax.Array:
  """`dense` for a quantised kernel: one [M, K] x [K, N] product of the
  flattened operands (dequantised in the matmul), then the output dims
  arranged as `eqn` asks."""
  operands, out = eqn.split('->')
  x_letters, w_letters = operands.split(',')
  contracted = ''.join(c for c in w_letters if c not in out)
  n_c = len(contracted)
  if (w_letters[:n_c] != contracted or x_letters[-n_c:] != contracted):
    raise ValueError(f'dense {eqn!r}: a quantised kernel needs its '
                     'contracted dims first and last in the activation.')
  out_dtype = out_dtype or dtype
  batch_shape = x.shape[:-n_c]
  k = int(np.prod(x.shape[-n_c:]))
  n = int(np.prod(w.scale.shape))
  x2 = x.reshape(-1, k).astype(dtype)                       # [M, K]
  q2 = w.q.reshape(-1, n)                                   # [K(/2), N]
  y = matmul(x2, q2, w.scale.reshape(n), bits=w.bits, impl=w.impl,
             out_dtype=out_dtype)                           # [M, N]
  y = y.reshape(batch_shape + w.scale.shape)
  return jnp.einsum(f'{x_letters[:-n_c]}{w_letters[n_c:]}->{out}', y)


def matmul(x, q, scale, *, bits: int, impl: str, out_dtype):
  """[M, K] x int8 [K(/2), N] * scale [N] through `impl`: 'xla' (plain
  jnp), 'pallas' (the kernel of the lowering platform, interpreted on
  CPU) or 'auto' (the kernel on GPU and TPU, plain jnp elsewhere)."""
  if impl == 'xla':
    return quant_matmul.quant_matmul_reference(x, q, scale, bits=bits,
                                               out_dtype=out_dtype)

  def on(backend, interpret=False):
    return lambda x_, q_, s_: quant_matmul.quant_matmul(
        x_, q_, s_, bits=bits, out_dtype=out_dtype, backend=backend,
        interpret=interpret)

  def plain(x_, q_, s_):
    return quant_matmul.quant_matmul_reference(x_, q_, s_, bits=bits,
                                               out_dtype=out_dtype)

  default = on('gpu', interpret=True) if impl == 'pallas' else plain
  return jax.lax.platform_dependent(
      x, q, scale, cuda=on('gpu'), rocm=on('gpu'), tpu=on('tpu'),
      default=default)
