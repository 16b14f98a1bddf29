"""The 'blockwise' attention: the 'xla' path's numbers, forward and
backward, for every family and batch field, T = S and T < S, key blocks that
do not divide S, fp32 and bf16 inputs; and never a [T, S] array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm.model import attention as attention_lib
from glm.model import blockwise
from glm.model import transformer

import test_attention_spec as cases  # the families and batch fields


def _grads(impl, spec, q, k, v, d_out, **kw):
  fn = (lambda q, k, v: blockwise.blockwise_attention(q, k, v, spec, **kw)
        ) if impl == 'blockwise' else (
            lambda q, k, v: attention_lib.attention(q, k, v, spec, impl=impl))
  out = fn(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * d_out),
                   argnums=(0, 1, 2))(q, k, v)
  return out, grads


@pytest.mark.parametrize('family, field, queries', [
    ('bloom' if i % 2 else 'glm', field, cases.T)
    for i, field in enumerate(cases.FIELDS)] + [
        (family, 'everything', 5) for family in ('bloom', 'glm')] + [
            pytest.param(family, field, queries, marks=pytest.mark.slow)
            for family in ('bloom', 'glm') for field in cases.FIELDS
            for queries in (cases.T, 5)])
def test_blockwise_equals_xla(family, field, queries):
  cfg, batch = cases.make_cfg(family), cases.make_batch(field, seed=1)
  spec = attention_lib.attention_context(cfg, batch).spec
  q, k, v = cases.qkv(2)
  first = cases.T - queries
  if queries < cases.T:
    spec = spec.last_queries(queries)
  q = q[:, first:]
  real = cases.real_queries(batch)[:, first:]
  d_out = jax.random.normal(jax.random.PRNGKey(9), q.shape) * jnp.asarray(
      real, jnp.float32)[:, :, None, None]
  want, want_g = _grads('xla', spec, q, k, v, d_out)
  got, got_g = _grads('blockwise', spec, q, k, v, d_out, block_q=5,
                      block_k=5)  # 12 % 5, T % 5
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real],
                             rtol=1e-5, atol=2e-6)
  for name, a, b in zip('qkv', got_g, want_g):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)


def test_bf16_inputs_track_the_xla_path():
  cfg, batch = cases.make_cfg('bloom'), cases.make_batch('everything')
  spec = attention_lib.attention_context(cfg, batch).spec
  q, k, v = (a.astype(jnp.bfloat16) for a in cases.qkv(3))
  real = cases.real_queries(batch)
  d_out = jnp.asarray(real, jnp.float32)[:, :, None, None] * jnp.ones(
      q.shape, jnp.float32)
  want, want_g = _grads('xla', spec, q, k, v, d_out)
  got, got_g = _grads('blockwise', spec, q, k, v, d_out, block_q=4,
                      block_k=4)
  assert got.dtype == jnp.bfloat16
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(f32(got)[real], f32(want)[real], atol=2e-2)
  for a, b in zip(got_g, want_g):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(a), f32(b), atol=6e-2, rtol=5e-2)


def _shapes(jaxpr) -> list[tuple]:
  found = []
  for eqn in jaxpr.eqns:
    found += [tuple(v.aval.shape) for v in eqn.outvars
              if hasattr(v.aval, 'shape')]
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found += _shapes(inner)
  return found


def test_no_query_by_key_array_forward_or_backward():
  """With 64 queries and keys in blocks of 16, no value of the forward or
  the backward has a [64, 64] query x key face (only 16 x 16 tiles); the
  'xla' path does."""
  t = 64
  batch = {'tokens': jnp.zeros((1, t), jnp.int32)}
  cfg = cases.make_cfg('bloom').replace(max_len=t)
  spec = attention_lib.attention_context(cfg, batch).spec
  q = jnp.ones((1, t, 4, 8))

  def grad_jaxpr(fn):
    return jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)),
                                   argnums=(0, 1, 2)))(q, q, q).jaxpr

  blocks = _shapes(grad_jaxpr(lambda q, k, v: blockwise.blockwise_attention(
      q, k, v, spec, block_q=16, block_k=16)))
  assert not [s for s in blocks if s[-2:] in ((t, t), (t, 16), (16, t))]
  assert any(s[-2:] == (16, 16) for s in blocks)
  xla = _shapes(grad_jaxpr(lambda q, k, v: attention_lib.attention(
      q, k, v, spec)))
  assert any(s[-2:] == (t, t) for s in xla)


@pytest.mark.parametrize('family', [
    'bloom', *(pytest.param(f, marks=pytest.mark.slow) for f in ('glm', 'ul2'))])
def test_model_with_blockwise_attention_equals_xla(family):
  cfg = cases.make_cfg(family).replace(max_len=64)
  batch = cases.make_batch('everything', seed=4)
  params = transformer.init_params(cfg, jax.random.PRNGKey(5))
  real = cases.real_queries(batch)

  def run(impl):
    model = transformer.Transformer(cfg.replace(attention_impl=impl))
    loss = lambda p: jnp.sum(jax.nn.logsumexp(
        model.apply({'params': p}, batch), -1) * real)
    return jax.value_and_grad(loss)(params)

  (want, want_g), (got, got_g) = run('xla'), run('blockwise')
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_tiles_nobody_sees_are_skipped():
  """Keys of a segment no query has, in whole tiles, hold NaN: a computed
  tile would spread it (0 * NaN); a skipped one cannot. Causal tiles above
  the diagonal are skipped too: NaN queries there never reach earlier
  outputs' gradients."""
  t, s, h, d = 8, 24, 2, 4
  seg_q = jnp.ones((1, t), jnp.int32)
  seg_kv = jnp.full((1, s), 5, jnp.int32).at[:, :8].set(1)
  slots_q = jnp.arange(t, dtype=jnp.int32)[None]
  slots_kv = jnp.arange(s, dtype=jnp.int32)[None]
  spec = attention_lib.AttentionSpec(
      q_segment_ids=seg_q, kv_segment_ids=seg_kv, q_slots=slots_q + 100,
      kv_slots=slots_kv, q_positions=slots_q, kv_positions=slots_kv)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, t, h, d))
  k, v = (jax.random.normal(kk, (1, s, h, d)) for kk in keys[1:])
  poison = jnp.arange(s)[None, :, None, None] >= 8
  k_bad, v_bad = (jnp.where(poison, jnp.nan, a) for a in (k, v))
  fn = lambda k_, v_: blockwise.blockwise_attention(q, k_, v_, spec,
                                                    block_q=4, block_k=8)
  got = fn(k_bad, v_bad)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, attention_lib.attention(q, k, v, spec),
                             rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda k_, v_: jnp.sum(fn(k_, v_)), argnums=(0, 1))(
      k_bad, v_bad)
  for g in grads:
    assert np.isfinite(np.asarray(g)[:, :8]).all()
