"""Multi-head self-attention and the attention pattern built from batch fields.

Einsum letters: B batch, T query length, S key length, E embed, H heads,
D head dim.

One mask covers every objective. A key j is visible from a query i when both
are in the same packed segment and either j <= i (causal) or j lies in the
segment's bidirectional prefix. Causal LM has no prefix; UL2's prefix LM and
GLM's Part A / Part B differ only in the prefix; padding is segment 0, which
no real token can see.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm import positions
from glm.config import ModelConfig
from glm.layers import compute_dtype, kernel_init, param


class AttentionInputs(NamedTuple):
  """Per-forward attention context, shared by every layer.

  bias: [B, 1, T, S] (no ALiBi) or [B, H, T, S] float32 added to the scaled
    scores: the ALiBi bias (or 0) where the query may attend the key, the
    float32 minimum elsewhere. Built once per forward so that no layer
    materialises a mask select or its gradient.
  rope: ((cos, sin), ...) tables; one pair for 1D RoPE, two for 2D, or None.
  """
  bias: jax.Array
  rope: tuple | None


def prefix_mask_from_len(prefix_len: jax.Array, length: int) -> jax.Array:
  """[B] prefix lengths -> [B, T] bool, True on the bidirectional prefix."""
  return jnp.arange(length)[None, :] < prefix_len[:, None]


def make_attention_mask(segment_ids: jax.Array,
                        prefix_mask: jax.Array | None) -> jax.Array:
  """[B, T] segment ids (0 = padding) and prefix flags -> [B, 1, T, T] bool."""
  length = segment_ids.shape[1]
  idx = jnp.arange(length)
  visible = idx[None, :] <= idx[:, None]  # [T, S] causal
  visible = jnp.broadcast_to(visible, (segment_ids.shape[0], length, length))
  if prefix_mask is not None:
    visible = visible | prefix_mask[:, None, :]
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (visible & same_segment)[:, None, :, :]


def attention_inputs(cfg: ModelConfig, batch: dict) -> AttentionInputs:
  """Builds mask, ALiBi bias and RoPE tables from a batch's fields.

  Batch fields: `tokens` [B, T] (required); optional `segment_ids` [B, T]
  (0 = padding, default all ones), `prefix_len` [B] or `prefix_mask` [B, T],
  `position_ids` [B, T] (default: 0.. per segment) and `block_position_ids`
  [B, T] (2D RoPE; default zeros).
  """
  tokens = batch['tokens']
  segment_ids = batch.get('segment_ids')
  position_ids = batch.get('position_ids')
  if position_ids is None:
    position_ids = positions.default_position_ids(tokens, segment_ids)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  prefix_mask = batch.get('prefix_mask')
  if prefix_mask is None and batch.get('prefix_len') is not None:
    prefix_mask = prefix_mask_from_len(batch['prefix_len'], tokens.shape[1])
  mask = make_attention_mask(segment_ids, prefix_mask)  # [B, 1, T, S]

  alibi = rope = None
  if cfg.position == 'alibi':
    alibi = positions.alibi_bias(position_ids, cfg.num_heads)  # [B, H, T, S]
  elif cfg.position == 'rope':
    rope = (positions.rope_angles(position_ids, cfg.rotary_dims,
                                  cfg.rope_base),)
  elif cfg.position == 'rope2d':
    half = cfg.dims_per_head // 2
    block_ids = batch.get('block_position_ids')
    if block_ids is None:
      block_ids = jnp.zeros_like(position_ids)
    rope = (positions.rope_angles(position_ids, half, cfg.rope_base),
            positions.rope_angles(block_ids, half, cfg.rope_base))
  # Every row sees at least its own key, so the float32 minimum is never the
  # row maximum and softmax gives masked keys exactly 0, as a select would.
  bias = jnp.where(mask, 0.0 if alibi is None else alibi,
                   jnp.finfo(jnp.float32).min)
  return AttentionInputs(bias.astype(jnp.float32), rope)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          ctx: AttentionInputs) -> jax.Array:
  """Softmax attention in float32. q, k, v: [B, T, H, D] -> [B, T, H, D].

  The products run head-major ([B, H, T, D]): with (B, H) as the leading
  batch dims of both operands XLA CPU calls its fast batched matmul, where
  the mixed layouts of 'bthd,bshd->bhts' fall back to a slower generic dot
  in the backward pass.
  """
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T, D]
  out = _attention(q, k, v, ctx.bias)
  return jnp.swapaxes(out, 1, 2)  # [B, T, H, D]


def _probs(q, k, bias):
  """Softmax probabilities [B, H, T, S] float32 of scaled scores + bias."""
  scores = jnp.einsum('bhtd,bhsd->bhts', q, k,
                      preferred_element_type=jnp.float32)
  # Masked keys: score + float32 min rounds to the float32 min (|score| is
  # far below its ulp), whose exp underflows to 0.
  return jax.nn.softmax(scores * q.shape[-1] ** -0.5 + bias, axis=-1)


@jax.custom_vjp
def _attention(q, k, v, bias):
  """Head-major attention: [B, H, T, D] x3, bias [B, 1|H, T, S] -> [B, H, T, D].

  Its own backward is the textbook softmax-attention gradient in four
  batched matmuls and one elementwise pass (dS = P * (dP - rowsum(dO * O))),
  reusing the saved probabilities; autodiff's version of the same forward
  ran ~1.4x slower on XLA CPU (extra passes over [B, H, T, S]).
  """
  return _attention_fwd(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
  probs = _probs(q, k, bias)
  out = jnp.einsum('bhts,bhsd->bhtd', probs.astype(v.dtype), v)
  return out, (q, k, v, bias, out, probs)


def _attention_bwd(res, d_out):
  q, k, v, bias, out, probs = res
  f32 = jnp.float32
  d_probs = jnp.einsum('bhtd,bhsd->bhts', d_out, v, preferred_element_type=f32)
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), -1, keepdims=True)
  d_scores = probs * (d_probs - delta)  # = d bias: [B, H, T, S]
  scale = q.shape[-1] ** -0.5
  ds = d_scores.astype(q.dtype)
  dq = jnp.einsum('bhts,bhsd->bhtd', ds, k, preferred_element_type=f32) * scale
  dk = jnp.einsum('bhts,bhtd->bhsd', ds, q, preferred_element_type=f32) * scale
  dv = jnp.einsum('bhts,bhtd->bhsd', probs.astype(v.dtype), d_out,
                  preferred_element_type=f32)
  # The bias is built from batch fields and never differentiated in training,
  # so this sum is dead code there; it keeps the VJP exact for any caller.
  d_bias = jnp.sum(d_scores, axis=1, keepdims=True) if bias.shape[1] == 1 \
      else d_scores
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          d_bias.astype(bias.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nn.Module):
  """Self-attention with separate q, k, v projections and an output one."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, ctx: AttentionInputs) -> jax.Array:
    cfg = self.cfg
    dt = compute_dtype(cfg)
    e, h, d = cfg.hidden, cfg.num_heads, cfg.dims_per_head

    def project(name: str, scaled: bool) -> jax.Array:
      w = param(self, name, kernel_init(cfg, scaled=scaled, in_axis=[0],
                                        out_axis=[1, 2]),
                (e, h, d), ('embed', 'heads', 'kv'))
      y = jnp.einsum('bte,ehd->bthd', x, w.astype(dt))
      if cfg.use_bias:
        y = y + param(self, f'{name}_bias', nn.initializers.zeros, (h, d),
                      ('heads', 'kv')).astype(dt)
      return nn.with_logical_constraint(y, ('batch', 'length', 'heads', 'kv'))

    q = project('query', scaled=False)
    k = project('key', scaled=False)
    v = project('value', scaled=True)
    if cfg.position == 'rope':
      q = positions.apply_rope(q, *ctx.rope[0])
      k = positions.apply_rope(k, *ctx.rope[0])
    elif cfg.position == 'rope2d':
      q = positions.apply_rope_2d(q, ctx.rope[0], ctx.rope[1])
      k = positions.apply_rope_2d(k, ctx.rope[0], ctx.rope[1])

    out = dot_product_attention(q, k, v, ctx)  # [B, T, H, D]
    wo = param(self, 'out', kernel_init(cfg, scaled=True, in_axis=[0, 1],
                                        out_axis=[2]),
               (h, d, e), ('heads', 'kv', 'embed'))
    y = jnp.einsum('bthd,hde->bte', out, wo.astype(dt))
    if cfg.use_bias:
      y = y + param(self, 'out_bias', nn.initializers.zeros, (e,),
                    ('embed',)).astype(dt)
    return y
