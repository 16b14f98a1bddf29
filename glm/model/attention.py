"""Attention: a description of the pattern, one entry point, the XLA path.

Einsum letters: B batch, T query length, S key length, E embed, H heads,
D head dim.

The pattern is described, not materialised. An `AttentionSpec` holds small
per-token arrays from which any implementation computes, block by block,
which keys a query sees and the ALiBi bias:

  key j is visible from query i  <=>  seg_q[i] == seg_kv[j] != 0  and
      (not causal  or  slot_kv[j] <= slot_q[i]  or  prefix_kv[j])
  bias[h, i, j] = -slope_h * |pos_q[i] - pos_kv[j]|   (ALiBi; else 0)

Causality is by slot (the token's index in its row), not by position id:
GLM's Part B repeats its mask's position. Segment 0 is padding, which no
query sees; a padding query sees nothing, and its output is finite and
unspecified. Causal LM has no prefix; UL2's inputs and GLM's Part A are the
prefix. T may differ from S (a query block against a longer key cache).

`attention(q, k, v, spec, impl=...)` chooses the implementation
(`ModelConfig.attention_impl`):
  'xla'        builds the float32 [B, H|1, T, S] bias from the spec and runs
               softmax attention with a hand-written backward; the reference
               every other path is tested against.
  'blockwise'  a scan over key blocks with online softmax, never a [T, S]
               array (glm/model/blockwise.py).
  'pallas'     the fused GPU / TPU kernels of `glm.pallas_kernels`
               (interpret mode on CPU), shard-mapped under a mesh
               (glm/model/fused.py).
  'auto'       the kernel on GPU / TPU, the faster XLA path on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm.model.config import ModelConfig
from glm.model.layers import dense, kernel, kernel_init, param, precision
from glm.model import blockwise
from glm.model import fused
from glm.model import positions



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Which keys each query sees, and the ALiBi bias, as per-token arrays.

  q_segment_ids [B, T], kv_segment_ids [B, S] int32: packed sequence ids,
    0 = padding.
  q_slots [B, T], kv_slots [B, S] int32: index of the token in its row;
    causality compares slots.
  q_positions [B, T], kv_positions [B, S] int32: position ids (ALiBi).
  kv_prefix [B, S] bool or None: keys every query of the same segment sees
    (a bidirectional prefix).
  alibi_slopes [H] float32 or None: ALiBi slopes, or no bias.
  causal: static; False makes every key of the segment visible.
  """
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  q_slots: jax.Array
  kv_slots: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array
  kv_prefix: jax.Array | None = None
  alibi_slopes: jax.Array | None = None
  causal: bool = dataclasses.field(default=True, metadata={'static': True})

  @property
  def q_len(self) -> int:
    return self.q_segment_ids.shape[1]

  @property
  def kv_len(self) -> int:
    return self.kv_segment_ids.shape[1]

  def last_queries(self, n: int) -> 'AttentionSpec':
    """The spec of the last n queries against all keys (T = n <= S)."""
    q = lambda a: a[:, a.shape[1] - n:]
    return dataclasses.replace(
        self, q_segment_ids=q(self.q_segment_ids), q_slots=q(self.q_slots),
        q_positions=q(self.q_positions))


def prefix_mask_from_len(prefix_len: jax.Array, length: int) -> jax.Array:
  """[B] prefix lengths -> [B, T] bool, True on the bidirectional prefix."""
  return jnp.arange(length)[None, :] < prefix_len[:, None]


def spec_from_batch(batch: dict, *,
                    alibi_slopes: jax.Array | None = None) -> AttentionSpec:
  """Self-attention over a batch's rows (T = S) from its fields.

  Batch fields: `tokens` [B, T] (required); optional `segment_ids` [B, T]
  (0 = padding, default all ones), `prefix_len` [B] or `prefix_mask` [B, T],
  `position_ids` [B, T] (default: 0.. restarting per segment).
  """
  tokens = batch['tokens']
  b, t = tokens.shape
  segment_ids = batch.get('segment_ids')
  position_ids = batch.get('position_ids')
  if position_ids is None:
    position_ids = positions.default_position_ids(tokens, segment_ids)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  prefix = batch.get('prefix_mask')
  if prefix is None and batch.get('prefix_len') is not None:
    prefix = prefix_mask_from_len(batch['prefix_len'], t)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return AttentionSpec(
      q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
      q_slots=slots, kv_slots=slots, q_positions=position_ids,
      kv_positions=position_ids,
      kv_prefix=None if prefix is None else prefix.astype(bool),
      alibi_slopes=alibi_slopes)


def attention_mask(spec: AttentionSpec) -> jax.Array:
  """[B, T, S] bool: True where the query sees the key (module docstring)."""
  seg_q = spec.q_segment_ids[:, :, None]
  seg_kv = spec.kv_segment_ids[:, None, :]
  visible = (seg_q == seg_kv) & (seg_kv != 0)
  if not spec.causal:
    return visible
  order = spec.kv_slots[:, None, :] <= spec.q_slots[:, :, None]
  if spec.kv_prefix is not None:
    order = order | spec.kv_prefix[:, None, :]
  return visible & order


def attention_bias(spec: AttentionSpec) -> jax.Array:
  """The materialised pattern: [B, 1, T, S] (no ALiBi) or [B, H, T, S]
  float32, the ALiBi bias (or 0) where the key is visible, the float32
  minimum elsewhere. Only the XLA path builds it."""
  mask = attention_mask(spec)[:, None]  # [B, 1, T, S]
  alibi = None
  if spec.alibi_slopes is not None:
    alibi = positions.alibi_bias(spec.q_positions, spec.kv_positions,
                                 spec.alibi_slopes)  # [B, H, T, S]
  # A masked score + the float32 minimum rounds to the minimum, whose exp
  # underflows to 0: masked keys get exactly 0, as a select would give.
  bias = jnp.where(mask, 0.0 if alibi is None else alibi,
                   jnp.finfo(jnp.float32).min)
  return bias.astype(jnp.float32)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  spec: AttentionSpec) -> jax.Array:
  """Softmax attention in float32 with the bias built from the spec.

  q [B, T, H, D], k, v [B, S, H, D] -> [B, T, H, D]. The products run
  head-major ([B, H, T, D]): with (B, H) as the leading batch dims of both
  operands XLA CPU calls its fast batched matmul, where the mixed layouts of
  'bthd,bshd->bhts' fall back to a slower generic dot in the backward.
  """
  bias = attention_bias(spec)
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T|S, D]
  out = _attention(q, k, v, bias)
  return jnp.swapaxes(out, 1, 2)  # [B, T, H, D]


def new_keys_spec(spec: AttentionSpec, cache_index, t: int) -> AttentionSpec:
  """A cached spec (T queries x S slots) cut to the T new tokens' own slots
  cache_index .. cache_index + T - 1 as keys."""
  cut = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(
      a, cache_index, t, axis=1)
  return dataclasses.replace(
      spec, kv_segment_ids=cut(spec.kv_segment_ids),
      kv_slots=cut(spec.kv_slots), kv_positions=cut(spec.kv_positions),
      kv_prefix=cut(spec.kv_prefix))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array,
                     spec: AttentionSpec, cache_index) -> jax.Array:
  """T new queries against the earlier tokens in a KV cache and the T new
  tokens themselves, one softmax over both, in float32.

  q, k, v [B, T, H, D] (the new tokens, at cache slots cache_index ..);
  k_cache, v_cache [B, H, S, D] heads-major, valid before cache_index (the
  rest is masked out); spec: the cached spec, T queries x S slots. The
  cache is only read: the caller's write of k, v into it afterwards is then
  in place, where attending to the written cache made XLA CPU copy the
  whole cache at every decoded token.
  """
  t = q.shape[1]
  old = jnp.arange(k_cache.shape[2]) < cache_index              # [S]
  spec_old = dataclasses.replace(spec, kv_segment_ids=jnp.where(
      old[None, :], spec.kv_segment_ids, 0))
  spec_new = new_keys_spec(spec, cache_index, t)
  qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))     # [B, H, T, D]
  f32, scale = jnp.float32, q.shape[-1] ** -0.5
  s_old = (jnp.einsum('bhtd,bhsd->bhts', qh, k_cache.astype(q.dtype),
                      preferred_element_type=f32) * scale
           + attention_bias(spec_old))
  s_new = (jnp.einsum('bhtd,bhud->bhtu', qh, kh, preferred_element_type=f32)
           * scale + attention_bias(spec_new))
  top = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
  p_old, p_new = jnp.exp(s_old - top), jnp.exp(s_new - top)
  den = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
  out = (jnp.einsum('bhts,bhsd->bhtd', p_old.astype(v.dtype),
                    v_cache.astype(v.dtype), preferred_element_type=f32)
         + jnp.einsum('bhtu,bhud->bhtd', p_new.astype(v.dtype), vh,
                      preferred_element_type=f32)) / den
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)                # [B,T,H,D]


def auto_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                   spec: AttentionSpec) -> jax.Array:
  """The kernel on GPU / TPU; on CPU 'xla' for rows shorter than
  `fused.AUTO_BLOCKWISE_FROM` keys, 'blockwise' from there on (the lowering
  platform decides, so an exported step carries the kernel)."""
  cpu = (blockwise.blockwise_attention
         if spec.kv_len >= fused.AUTO_BLOCKWISE_FROM else xla_attention)
  return jax.lax.platform_dependent(
      q, k, v, cpu=lambda *a: cpu(*a, spec),
      default=lambda *a: fused.pallas_attention(*a, spec))


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'xla': xla_attention,
    'blockwise': blockwise.blockwise_attention,
    'pallas': fused.pallas_attention,
    'auto': auto_attention,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec,
              *, impl: str = 'xla') -> jax.Array:
  """The one attention entry: q [B, T, H, D], k, v [B, S, H, D] ->
  [B, T, H, D] in q's dtype, the pattern taken from `spec`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'attention impl={impl!r} is not one of '
                     f'{sorted(IMPLEMENTATIONS)}.')
  b, t, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f'q {q.shape} and k {k.shape}, v {v.shape} do not '
                     'match: expected [B, T, H, D] and [B, S, H, D] twice.')
  if (spec.q_segment_ids.shape != (b, t)
      or spec.kv_segment_ids.shape != (b, k.shape[1])):
    raise ValueError(
        f'spec of {spec.q_segment_ids.shape} queries x '
        f'{spec.kv_segment_ids.shape} keys does not match q {q.shape}, '
        f'k {k.shape}.')
  return IMPLEMENTATIONS[impl](q, k, v, spec)


def _probs(q, k, bias):
  """Softmax probabilities [B, H, T, S] float32 of scaled scores + bias."""
  scores = jnp.einsum('bhtd,bhsd->bhts', q, k,
                      preferred_element_type=jnp.float32)
  return jax.nn.softmax(scores * q.shape[-1] ** -0.5 + bias, axis=-1)


@jax.custom_vjp
def _attention(q, k, v, bias):
  """Head-major attention: [B, H, T, D], [B, H, S, D] x2, bias
  [B, 1|H, T, S] -> [B, H, T, D].

  Its own backward is the textbook softmax-attention gradient in four
  batched matmuls and one elementwise pass (dS = P * (dP - rowsum(dO * O))),
  reusing the saved probabilities; autodiff's version of the same forward
  ran ~1.4x slower on XLA CPU. The bias is not kept for the backward (it is
  rebuilt per layer from the spec and only its shape matters there).
  """
  return _attention_fwd(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
  probs = _probs(q, k, bias)
  out = jnp.einsum('bhts,bhsd->bhtd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  # An empty array stands in for the bias: its shape and dtype only.
  stub = jnp.zeros((0,) + bias.shape[1:2], bias.dtype)
  return out, (q, k, v, out, probs, stub)


def _attention_bwd(res, d_out):
  q, k, v, out, probs, stub = res
  f32 = jnp.float32
  d_out = d_out.astype(v.dtype)
  d_probs = jnp.einsum('bhtd,bhsd->bhts', d_out, v, preferred_element_type=f32)
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), -1, keepdims=True)
  d_scores = probs * (d_probs - delta)  # = d bias: [B, H, T, S]
  scale = q.shape[-1] ** -0.5
  ds = d_scores.astype(q.dtype)
  dq = jnp.einsum('bhts,bhsd->bhtd', ds, k, preferred_element_type=f32) * scale
  dk = jnp.einsum('bhts,bhtd->bhsd', ds, q, preferred_element_type=f32) * scale
  dv = jnp.einsum('bhts,bhtd->bhsd', probs.astype(v.dtype), d_out,
                  preferred_element_type=f32)
  # The bias comes from integer batch fields and is never differentiated in
  # training, so this sum is dead code there; it keeps the VJP exact.
  d_bias = (jnp.sum(d_scores, axis=1, keepdims=True) if stub.shape[1] == 1
            else d_scores)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          d_bias.astype(stub.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


# The batch fields `attention_context` reads (all [B, ...]).
CONTEXT_FIELDS = ('tokens', 'segment_ids', 'prefix_len', 'prefix_mask',
                  'position_ids', 'block_position_ids')


# The extra batch fields of a forward against a KV cache: `cache_index` (a
# scalar: the cache slot of the first new token) and the whole cache's
# per-key arrays `kv_segment_ids`, `kv_positions` [B, S] (0 = an empty or
# padding slot), optional `kv_prefix` [B, S] bool.
CACHE_FIELDS = ('cache_index', 'kv_segment_ids', 'kv_positions', 'kv_prefix')
CACHE_AXES = ('batch', 'heads', 'length', 'kv')   # a layer's cached k or v


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionContext:
  """What every layer of one forward shares: the attention spec, the RoPE
  tables (((cos, sin),) for 1D, two pairs for 2D, or None) and, when
  decoding, the KV-cache slot where this forward's keys and values go.
  `prefill` (static, so that it survives remat and scan) says the cache is
  empty: cache_index is 0."""
  spec: AttentionSpec
  rope: tuple | None
  cache_index: jax.Array | None = None
  prefill: bool = dataclasses.field(default=False,
                                    metadata={'static': True})


def cached_spec(batch: dict, *,
                alibi_slopes: jax.Array | None = None) -> AttentionSpec:
  """T new tokens (cache slots cache_index ..) against the S slots of the
  cache, whose per-key arrays the batch carries (`CACHE_FIELDS`)."""
  tokens = batch['tokens']
  b, t = tokens.shape
  kv_seg = batch['kv_segment_ids']
  s = kv_seg.shape[1]
  seg = batch.get('segment_ids')
  seg = jnp.ones_like(tokens) if seg is None else seg
  q_slots = batch['cache_index'] + jnp.arange(t, dtype=jnp.int32)
  prefix = batch.get('kv_prefix')
  return AttentionSpec(
      q_segment_ids=seg, kv_segment_ids=kv_seg,
      q_slots=jnp.broadcast_to(q_slots, (b, t)),
      kv_slots=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
      q_positions=batch['position_ids'], kv_positions=batch['kv_positions'],
      kv_prefix=None if prefix is None else prefix.astype(bool),
      alibi_slopes=alibi_slopes)


def attention_context(cfg: ModelConfig, batch: dict) -> AttentionContext:
  """The spec and RoPE tables of a forward over `batch` (see
  `spec_from_batch`; `block_position_ids` [B, T] feed 2D RoPE, default 0)."""
  position_ids = batch.get('position_ids')
  if position_ids is None:
    position_ids = positions.default_position_ids(batch['tokens'],
                                                  batch.get('segment_ids'))
    batch = dict(batch, position_ids=position_ids)
  slopes = None
  if cfg.position == 'alibi':
    slopes = jnp.asarray(positions.alibi_slopes(cfg.num_heads))
  rope = None
  if cfg.position == 'rope':
    rope = (positions.rope_angles(position_ids, cfg.rotary_dims,
                                  cfg.rope_base),)
  elif cfg.position == 'rope2d':
    half = cfg.dims_per_head // 2
    block_ids = batch.get('block_position_ids')
    if block_ids is None:
      block_ids = jnp.zeros_like(position_ids)
    rope = (positions.rope_angles(position_ids, half, cfg.rope_base),
            positions.rope_angles(block_ids, half, cfg.rope_base))
  if batch.get('cache_index') is not None:
    index = batch['cache_index']
    prefill = isinstance(index, int) and index == 0
    return AttentionContext(cached_spec(batch, alibi_slopes=slopes), rope,
                            jnp.asarray(index, jnp.int32), prefill)
  return AttentionContext(spec_from_batch(batch, alibi_slopes=slopes), rope)


class Attention(nn.Module):
  """Self-attention with separate q, k, v projections and an output one;
  the attention itself is `cfg.attention_impl`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, ctx: AttentionContext) -> jax.Array:
    cfg = self.cfg
    policy = precision(cfg)
    dt = policy.activation
    e, h, d = cfg.hidden, cfg.num_heads, cfg.dims_per_head
    qkv_axes = ('embed', 'heads', 'kv')

    def project(name: str, scaled: bool) -> jax.Array:
      w = kernel(self, cfg, name, kernel_init(cfg, scaled=scaled, in_axis=[0],
                                              out_axis=[1, 2]),
                 (e, h, d), qkv_axes, contract=1)
      y = dense('bte,ehd->bthd', x, w, qkv_axes, **policy.dense)
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

    q, k, v = (a.astype(policy.matmul) for a in (q, k, v))
    if ctx.cache_index is None:
      out = attention(q, k, v, ctx.spec, impl=cfg.attention_impl)
    else:
      caches = self._cache(k, ctx)
      if ctx.prefill:  # an empty cache: the new tokens see only each other
        out = attention(q, k, v, new_keys_spec(ctx.spec, 0, q.shape[1]),
                        impl=cfg.attention_impl)
      else:            # read the cache, then write the new keys into it
        out = cached_attention(q, k, v, caches[0].value, caches[1].value,
                               ctx.spec, ctx.cache_index)
      # The writes wait for the reads: `after` is an exact zero that depends
      # on the attention output, so XLA schedules the in-place cache update
      # after the dots that read the cache (unordered, it copied the whole
      # cache at every token to update it first).
      after = jnp.isnan(out[:, :1, :1, :1]).astype(k.dtype) * 0
      for var, new in zip(caches, (k + after, v + after)):
        new = jnp.swapaxes(new, 1, 2).astype(var.value.dtype)  # [B,H,T,D]
        var.value = nn.with_logical_constraint(
            jax.lax.dynamic_update_slice(var.value, new,
                                         (0, 0, ctx.cache_index, 0)),
            CACHE_AXES)
    out_axes = ('heads', 'kv', 'embed')
    wo = kernel(self, cfg, 'out', kernel_init(cfg, scaled=True,
                                              in_axis=[0, 1], out_axis=[2]),
                (h, d, e), out_axes, contract=2)
    y = dense('bthd,hde->bte', out, wo, out_axes, **policy.dense)
    if cfg.use_bias:
      y = y + param(self, 'out_bias', nn.initializers.zeros, (e,),
                    ('embed',)).astype(dt)
    return y

  def _cache(self, new: jax.Array, ctx: AttentionContext) -> tuple:
    """The layer's cached keys and values: variables of the collection
    'cache', heads-major [B, H, S, D] (`CACHE_AXES`), the layout the
    attention's dots read without a copy; `new` [B, T, H, D] gives B, H, D."""
    b, _, h, d = new.shape
    return tuple(self.variable('cache', name, nn.with_logical_partitioning(
        jnp.zeros, CACHE_AXES), (b, h, ctx.spec.kv_len, d), new.dtype)
                 for name in ('key', 'value'))
