"""The attention description reproduces the materialised-bias path it replaced.

Until the architecture change every forward built one float32 [B, H, T, S]
bias (mask + ALiBi) from the batch fields and handed it to every layer. The
functions under "The old path" are that code, kept verbatim as the
reference. The new entry `attention(q, k, v, spec)` must give the same
numbers for every family and batch field: causal, prefix_len, prefix_mask,
packed segments, padding, explicit (GLM Part B) positions, 2D block
positions; with as many queries as keys, and with the last T < S queries
against all S keys (what a KV cache asks).

Padding: the old mask let a padding query see the padding keys; in the spec
a padding query sees nothing (its output is finite and unspecified). Rows of
real tokens are compared exactly; padding rows only for finiteness.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm.model import attention as attention_lib
from glm.model import positions
from glm.model import transformer
from glm.model.config import ModelConfig

from tolerances import assert_close_at_scale  # tests/tolerances.py

F32_MIN = np.finfo(np.float32).min

# The old path (glm/attention.py before the change) ----------------------------


def old_alibi_bias(position_ids, num_heads):
  pos = position_ids.astype(jnp.float32)
  dist = jnp.abs(pos[:, :, None] - pos[:, None, :])  # [B, T, S]
  slopes = jnp.asarray(positions.alibi_slopes(num_heads))
  return -slopes[None, :, None, None] * dist[:, None, :, :]


def old_make_attention_mask(segment_ids, prefix_mask):
  length = segment_ids.shape[1]
  idx = jnp.arange(length)
  visible = idx[None, :] <= idx[:, None]  # [T, S] causal
  visible = jnp.broadcast_to(visible, (segment_ids.shape[0], length, length))
  if prefix_mask is not None:
    visible = visible | prefix_mask[:, None, :]
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (visible & same_segment)[:, None, :, :]


def old_attention_inputs(cfg, batch):
  """(bias [B, 1|H, T, S], rope tables), as the old model built them."""
  tokens = batch['tokens']
  segment_ids = batch.get('segment_ids')
  position_ids = batch.get('position_ids')
  if position_ids is None:
    position_ids = positions.default_position_ids(tokens, segment_ids)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  prefix_mask = batch.get('prefix_mask')
  if prefix_mask is None and batch.get('prefix_len') is not None:
    prefix_mask = (jnp.arange(tokens.shape[1])[None, :]
                   < batch['prefix_len'][:, None])
  mask = old_make_attention_mask(segment_ids, prefix_mask)
  alibi = rope = None
  if cfg.position == 'alibi':
    alibi = old_alibi_bias(position_ids, cfg.num_heads)
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
  bias = jnp.where(mask, 0.0 if alibi is None else alibi, F32_MIN)
  return bias.astype(jnp.float32), rope


def old_dot_product_attention(q, k, v, bias):
  """Plain softmax attention on [B, T, H, D] with the materialised bias."""
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  scores = jnp.einsum('bhtd,bhsd->bhts', q, k,
                      preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores * q.shape[-1] ** -0.5 + bias, axis=-1)
  out = jnp.einsum('bhts,bhsd->bhtd', probs.astype(v.dtype), v)
  return jnp.swapaxes(out, 1, 2)


# Families and batches ---------------------------------------------------------

B, T, H, D = 3, 12, 4, 8

FAMILIES = {
    'bloom': dict(position='alibi', embed_norm=True),
    'bloom6': dict(position='alibi', num_heads=6, hidden=48),
    'glm': dict(position='rope2d', norm_layout='deepnorm',
                mlp_activation='geglu'),
    'glm130b': dict(position='rope', norm_layout='deepnorm',
                    mlp_activation='geglu'),
    'ul2': dict(position='rope', norm_type='rmsnorm', use_bias=False,
                mlp_activation='swiglu', rope_fraction=0.5),
    'learned': dict(position='learned'),
    'nopos': dict(position='none'),
}


def make_cfg(family: str) -> ModelConfig:
  kw = dict(vocab_size=200, hidden=32, num_layers=2, num_heads=H,
            mlp_dim=48, max_len=32)
  kw.update(FAMILIES[family])
  return ModelConfig(**kw)


def make_batch(field: str, seed: int = 0) -> dict:
  """A batch exercising one batch field (all [B, T] unless noted)."""
  rng = np.random.default_rng(seed)
  batch = {'tokens': rng.integers(3, 200, (B, T)).astype(np.int32)}
  if field in ('segments', 'padding', 'positions', 'everything'):
    seg = np.ones((B, T), np.int32)
    seg[0, 5:] = 2                           # two packed sequences
    seg[1, 3:7], seg[1, 7:] = 2, 3           # three
    batch['segment_ids'] = seg
  if field in ('padding', 'everything'):
    batch['segment_ids'][:, T - 3:] = 0      # trailing padding
    batch['segment_ids'][2, 6:] = 0
  if field == 'prefix_len':
    batch['prefix_len'] = np.array([4, 0, T], np.int32)
  if field in ('prefix_mask', 'positions', 'everything'):
    pm = np.zeros((B, T), bool)
    pm[0, :3], pm[0, 5:7], pm[1, :2], pm[2, :T] = True, True, True, True
    batch['prefix_mask'] = pm
  if field in ('positions', 'everything'):
    # GLM: Part A 0..4, Part B repeats its mask's position; 2D block ids.
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    pos[:, 6:] = 4
    block = np.zeros((B, T), np.int32)
    block[:, 6:] = np.arange(1, T - 5)
    batch['position_ids'], batch['block_position_ids'] = pos, block
  return {k: jnp.asarray(v) for k, v in batch.items()}


FIELDS = ('causal', 'segments', 'padding', 'prefix_len', 'prefix_mask',
          'positions', 'everything')


def real_queries(batch) -> np.ndarray:
  """[B, T] bool: queries of real tokens (segment id != 0)."""
  seg = batch.get('segment_ids')
  return np.ones((B, T), bool) if seg is None else np.asarray(seg) != 0


def qkv(seed: int, t: int = T):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(k, (B, t, H, D), jnp.float32) for k in keys]


# Tests ------------------------------------------------------------------------


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('field', FIELDS)
def test_spec_bias_and_rope_equal_the_old_ones(family, field):
  """The bias the 'xla' path builds from the spec is the old bias, bit for
  bit, on every real query row; the RoPE tables are unchanged."""
  cfg, batch = make_cfg(family), make_batch(field)
  old_bias, old_rope = old_attention_inputs(cfg, batch)
  ctx = attention_lib.attention_context(cfg, batch)
  new_bias = attention_lib.attention_bias(ctx.spec)
  assert new_bias.shape == old_bias.shape
  real = real_queries(batch)
  got, want = np.asarray(new_bias), np.asarray(old_bias)
  for b in range(B):
    np.testing.assert_array_equal(got[b][:, real[b]], want[b][:, real[b]])
  # A padding query sees no key at all.
  assert (got[~real[:, None, :].repeat(got.shape[1], 1)] == F32_MIN).all()
  assert jax.tree.structure(ctx.rope) == jax.tree.structure(old_rope)
  for a, b in zip(jax.tree.leaves(ctx.rope), jax.tree.leaves(old_rope)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('family', ['bloom', 'glm'])  # ALiBi or not
@pytest.mark.parametrize('field', FIELDS)
@pytest.mark.parametrize('queries', [T, 5, 1])
def test_attention_entry_equals_old_path(family, field, queries):
  """attention(q, k, v, spec) equals the old materialised-bias attention,
  forward and gradients, for T = S and for the last T < S queries."""
  cfg, batch = make_cfg(family), make_batch(field, seed=1)
  old_bias, _ = old_attention_inputs(cfg, batch)
  spec = attention_lib.attention_context(cfg, batch).spec
  q, k, v = qkv(2)
  first = T - queries
  real = real_queries(batch)[:, first:]
  if queries < T:
    spec = spec.last_queries(queries)
  q = q[:, first:]
  d_out = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  # Padding rows are unspecified: weight them 0 in the loss.
  w = jnp.asarray(real, jnp.float32)[:, :, None, None]

  def new(q, k, v):
    return attention_lib.attention(q, k, v, spec, impl='xla')

  def old(q, k, v):
    full_q = jnp.concatenate([jnp.zeros((B, first, H, D)), q], axis=1)
    return old_dot_product_attention(full_q, k, v, old_bias)[:, first:]

  got, want = jax.jit(new)(q, k, v), jax.jit(old)(q, k, v)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real],
                             rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * d_out * w)
  g_new = jax.jit(jax.grad(loss(new), argnums=(0, 1, 2)))(q, k, v)
  g_old = jax.jit(jax.grad(loss(old), argnums=(0, 1, 2)))(q, k, v)
  assert_close_at_scale(g_new, g_old, 1e-5, what='dq, dk, dv')


def old_impl(cfg):
  """An attention implementation that ignores the spec's pattern logic and
  rebuilds the old bias from the spec's batch fields (T = S only)."""

  def impl(q, k, v, spec):
    prefix = spec.kv_prefix
    mask = old_make_attention_mask(spec.q_segment_ids, prefix)
    alibi = (None if spec.alibi_slopes is None
             else old_alibi_bias(spec.q_positions, cfg.num_heads))
    bias = jnp.where(mask, 0.0 if alibi is None else alibi, F32_MIN)
    return old_dot_product_attention(q, k, v, bias.astype(jnp.float32))

  return impl


@pytest.mark.parametrize('family,field', [
    *((f, 'everything') if f in ('bloom', 'glm130b') else pytest.param(
        f, 'everything', marks=pytest.mark.slow) for f in sorted(FAMILIES)),
    ('ul2', 'prefix_len'), ('bloom', 'causal')])
def test_model_logits_equal_old_path(family, field, monkeypatch):
  """Whole-model logits and gradients through the new entry equal the same
  model running the old attention path, on every real token."""
  cfg, batch = make_cfg(family), make_batch(field, seed=3)
  params = transformer.init_params(cfg, jax.random.PRNGKey(4))
  model = transformer.Transformer(cfg)
  real = real_queries(batch)
  targets = jnp.roll(batch['tokens'], -1, axis=1)

  def run():
    def loss(p):
      logits = model.apply({'params': p}, batch)
      logp = jax.nn.log_softmax(logits, -1)
      nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
      return jnp.sum(nll * real), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params)
    return np.asarray(logits), grads

  got, g_new = run()
  monkeypatch.setitem(attention_lib.IMPLEMENTATIONS, 'xla', old_impl(cfg))
  want, g_old = run()
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_new)[0],
                          jax.tree.leaves(g_old)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_spec_semantics_by_hand():
  """The mask rules on a hand-written case: causality by slot (repeated
  position ids do not matter), the prefix, segments, padding, T < S."""
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  slots = jnp.arange(6)[None]
  pos = jnp.array([[0, 1, 1, 0, 1, 0]])   # repeated positions
  prefix = jnp.array([[False, True, False, False, False, False]])
  spec = attention_lib.AttentionSpec(
      q_segment_ids=seg, kv_segment_ids=seg, q_slots=slots, kv_slots=slots,
      q_positions=pos, kv_positions=pos, kv_prefix=prefix)
  want = np.array([[1, 1, 0, 0, 0, 0],    # query 0 sees key 1 (prefix)
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [0, 0, 0, 1, 0, 0],    # segment 2 starts
                   [0, 0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0, 0]],   # padding sees nothing
                  bool)
  np.testing.assert_array_equal(np.asarray(attention_lib.attention_mask(spec))
                                [0], want)
  np.testing.assert_array_equal(
      np.asarray(attention_lib.attention_mask(spec.last_queries(2)))[0],
      want[4:])
  bidirectional = attention_lib.AttentionSpec(
      q_segment_ids=seg, kv_segment_ids=seg, q_slots=slots, kv_slots=slots,
      q_positions=pos, kv_positions=pos, causal=False)
  got = np.asarray(attention_lib.attention_mask(bidirectional))[0]
  np.testing.assert_array_equal(got, (seg[0][:, None] == seg[0][None, :])
                                & (np.asarray(seg[0])[None, :] != 0))


def test_attention_rejects_bad_input():
  spec = attention_lib.spec_from_batch({'tokens': jnp.zeros((B, T), jnp.int32)})
  q, k, v = qkv(0)
  with pytest.raises(ValueError, match="impl='flash'"):
    attention_lib.attention(q, k, v, spec, impl='flash')
  with pytest.raises(ValueError, match='do not match'):
    attention_lib.attention(q, k[:, :, :2], v, spec)
  with pytest.raises(ValueError, match='spec of'):
    attention_lib.attention(q[:, :4], k, v, spec)
