"""Position encodings: ALiBi, rotary (1D and GLM's 2D), and default position ids.

Shapes use: B batch, T query length, S key length, H heads, D head dim,
R rotary dims (an even number <= D).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
  """BLOOM / Megatron ALiBi slopes for any head count, as float32 [H].

  For a power of two n: start = 2^(-8/n), slope_i = start^i for i = 1..n.
  Otherwise, with c = 2^floor(log2 n): the c slopes of the rule for c, then
  the odd-indexed slopes of the rule for 2c, (2^(-8/(2c)))^k for k = 1, 3, ...
  until n slopes.
  """
  def power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** i for i in range(1, n + 1)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = power_of_two_slopes(closest)
  if closest != num_heads:
    slopes += power_of_two_slopes(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, dtype=np.float32)


def alibi_bias(q_positions: jax.Array, kv_positions: jax.Array,
               slopes: jax.Array) -> jax.Array:
  """ALiBi bias [B, H, T, S] in float32: -slope_h * |q_pos - kv_pos|.

  q_positions [B, T], kv_positions [B, S], slopes [H]. Under a causal mask
  this is slope_h * (pos_j - pos_i), BLOOM's bias up to a per-row constant
  that the softmax ignores; keys a prefix lets a query see ahead of itself
  get the same penalty as keys behind it.
  """
  dist = jnp.abs(q_positions.astype(jnp.float32)[:, :, None]
                 - kv_positions.astype(jnp.float32)[:, None, :])  # [B, T, S]
  slopes = jnp.asarray(slopes, jnp.float32)
  return -slopes[None, :, None, None] * dist[:, None, :, :]


def default_position_ids(tokens: jax.Array,
                         segment_ids: jax.Array | None) -> jax.Array:
  """Positions 0..T-1 per row, restarting at every new segment when packed."""
  batch, length = tokens.shape
  idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if segment_ids is None:
    return idx
  starts = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  # Index of the most recent segment start at or before each token.
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def rope_angles(position_ids: jax.Array, rotary_dims: int,
                base: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, R] for rotate-half RoPE over R dims (float32)."""
  inv_freq = 1.0 / (base ** (np.arange(0, rotary_dims, 2, dtype=np.float64)
                             / rotary_dims))
  inv_freq = jnp.asarray(inv_freq, jnp.float32)  # [R/2]
  angles = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [B,T,R/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, R]
  return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the first R dims of x [B, T, H, D] (rotate-half / NeoX style).

  cos, sin: [B, T, R]. Dims R..D pass through unchanged. Computed in float32.
  """
  rot = cos.shape[-1]
  xf = x.astype(jnp.float32)
  x_rot, x_pass = xf[..., :rot], xf[..., rot:]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, R]
  x_rot = x_rot * cos + _rotate_half(x_rot) * sin
  return jnp.concatenate([x_rot, x_pass], axis=-1).astype(x.dtype)


def apply_rope_2d(x: jax.Array, pos_angles: tuple[jax.Array, jax.Array],
                  block_angles: tuple[jax.Array, jax.Array]) -> jax.Array:
  """GLM 2D RoPE on x [B, T, H, D]: first half of D by the position id,
  second half by the block position id, each a full rotate-half over D/2."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate(
      [apply_rope(x1, *pos_angles), apply_rope(x2, *block_angles)], axis=-1)
