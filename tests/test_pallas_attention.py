"""The Pallas attention kernels (GPU Triton and TPU Mosaic, in interpret
mode) against the plain-jnp reference and the model's 'xla' path, forward and
gradient; tile skipping; argument errors; `jax.export` for cuda and tpu.

Small shapes (interpret mode is slow); blocks smaller than the rows so every
case crosses tiles. The `slow` marker adds a wider sweep.

On a GPU or TPU machine, GLM_PALLAS_COMPILED=1 runs the same checks through
the compiled kernel of that chip instead of the interpreter (the other
backend's cases are skipped): benchmarks/device_attention.sh does that."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm.pallas_kernels import attention as pallas_kernels
from glm.pallas_kernels import common
from glm.model import attention as attention_lib
from glm.model import fused
from glm.model import positions
from glm.pallas_kernels import attention as kernels
from glm.pallas_kernels import attention_gpu, attention_tpu

BLOCKS = {'gpu': pallas_kernels.BlockSizes(16, 16, 16, 32),
          'tpu': pallas_kernels.BlockSizes(16, 128, 8, 128)}
COMPILED = os.environ.get('GLM_PALLAS_COMPILED') == '1'
INTERPRET = not COMPILED
H, D = 3, 24  # 3 heads: BLOOM's slope rule for a count that is no power of 2


@pytest.fixture(autouse=True)
def _on_this_chip(request):
  """Compiled runs take only the cases of the machine's own chip."""
  backend = getattr(request.node, 'callspec', None)
  backend = backend and backend.params.get('backend')
  if COMPILED and backend and backend != {'gpu': 'gpu', 'tpu': 'tpu'}.get(
      jax.default_backend()):
    pytest.skip(f'{backend} kernel: not this machine\'s chip')


def make_spec(case: str, t: int, seed: int = 0) -> attention_lib.AttentionSpec:
  """Two rows of t tokens: packed segments, padding, a prefix, positions."""
  rng = np.random.default_rng(seed)
  seg = np.ones((2, t), np.int32)
  cut = int(rng.integers(t // 3, 2 * t // 3)) if t >= 8 else t
  if t >= 8:
    seg[0, cut:] = 2
    seg[0, t - 4:] = 0                      # trailing padding
  pos = np.tile(np.arange(t, dtype=np.int32), (2, 1))
  pos[0, cut:] -= cut
  prefix = np.zeros((2, t), bool)
  prefix[0, :3], prefix[0, cut:cut + 5], prefix[1, :t // 2] = True, True, True
  slots = np.tile(np.arange(t, dtype=np.int32), (2, 1))
  slopes = jnp.asarray(positions.alibi_slopes(H))
  spec = attention_lib.AttentionSpec(
      q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
      q_slots=jnp.asarray(slots), kv_slots=jnp.asarray(slots),
      q_positions=jnp.asarray(pos), kv_positions=jnp.asarray(pos),
      kv_prefix=jnp.asarray(prefix) if case in ('prefix', 'glm') else None,
      alibi_slopes=None if case in ('glm', 'bidirectional') else slopes,
      causal=case != 'bidirectional')
  return spec


CASES = ('causal_alibi', 'prefix', 'glm', 'bidirectional')


def _data(spec, d=D, dtype=jnp.float32, seed=1):
  b, t = spec.q_segment_ids.shape
  s = spec.kv_segment_ids.shape[1]
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, t, H, d)).astype(dtype)
  k, v = (jax.random.normal(kk, (b, s, H, d)).astype(dtype)
          for kk in keys[1:3])
  live = (spec.q_segment_ids != 0)[:, :, None, None]
  d_out = jax.random.normal(keys[3], (b, t, H, d)) * live
  return q, k, v, d_out


def _value_and_grads(fn, q, k, v, d_out):
  out = fn(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * d_out),
                   argnums=(0, 1, 2))(q, k, v)
  return out, grads


def _kernel_fn(spec, backend, **extra):
  options = dict(fused.kernel_options(spec), backend=backend,
                 interpret=INTERPRET,
                 block_sizes=BLOCKS[backend], **extra)
  return (lambda q, k, v: pallas_kernels.flash_attention(q, k, v, **options),
          lambda q, k, v: pallas_kernels.flash_attention_reference(
              q, k, v, **options))


def _check(spec, backend, dtype=jnp.float32, d=D):
  q, k, v, d_out = _data(spec, d, dtype)
  kernel, reference = _kernel_fn(spec, backend)
  xla = lambda q, k, v: attention_lib.attention(q, k, v, spec, impl='xla')
  live = np.asarray(spec.q_segment_ids != 0)[:, :, None, None]
  got, got_g = _value_and_grads(kernel, q, k, v, d_out)
  tol = 2e-6 if dtype == jnp.float32 else 2e-2
  for name, fn in (('reference', reference), ('xla', xla)):
    want, want_g = _value_and_grads(fn, q, k, v, d_out)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert np.isfinite(np.asarray(got, np.float32)).all()
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(got, np.float32) * live,
                               np.asarray(want, np.float32) * live,
                               atol=tol * 4 * scale, err_msg=name)
    # One scale for the three gradients: some are zero in exact arithmetic
    # (dq of a query that sees one key), and rounding needs a floor.
    g_scale = max(float(np.abs(np.asarray(b, np.float32)).max())
                  for b in want_g)
    for which, a, b in zip('qkv', got_g, want_g):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, atol=tol * 8 * g_scale,
                                 err_msg=f'{name} d{which}')


@pytest.mark.parametrize('backend', kernels.BACKENDS)
@pytest.mark.parametrize('case', CASES)
def test_kernel_equals_reference_and_xla(backend, case):
  _check(make_spec(case, 40), backend)


@pytest.mark.parametrize('backend', kernels.BACKENDS)
def test_bf16_inputs(backend):
  _check(make_spec('glm', 40, seed=3), backend, dtype=jnp.bfloat16)


@pytest.mark.parametrize('backend', kernels.BACKENDS)
@pytest.mark.parametrize('queries', [
    1, pytest.param(9, marks=pytest.mark.slow)])
def test_fewer_queries_than_keys(backend, queries):
  """Decoding shapes: the last `queries` rows against all keys (T != S,
  neither a multiple of the block)."""
  _check(make_spec('causal_alibi', 37).last_queries(queries), backend)


@pytest.mark.parametrize('backend', kernels.BACKENDS)
def test_residuals_equal_the_forward_reference(backend):
  """The saved log-sum-exp, not only the output, is the reference's."""
  spec = make_spec('prefix', 40)
  q, k, v, _ = _data(spec)
  options = dict(fused.kernel_options(spec), backend=backend,
                 interpret=INTERPRET,
                 block_sizes=BLOCKS[backend])
  qp, kp, vp, pattern, st, _ = kernels._prepare(
      q, k, v, **{**kernels._DEFAULTS, **options})
  mod = attention_gpu if backend == 'gpu' else attention_tpu
  out, lse = mod.forward(qp, kp, vp, pattern, st)
  want_out, want_lse = kernels.mha_forward_reference(qp, kp, vp, pattern, st)
  live = np.asarray(pattern['q_seg'] != 0)
  np.testing.assert_allclose(np.asarray(lse).reshape(want_lse.shape)
                             .transpose(0, 2, 1)[live],
                             np.asarray(want_lse).transpose(0, 2, 1)[live],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out)[live], np.asarray(want_out)[live],
                             atol=1e-5)


def test_backward_reference_is_the_gradient_of_the_forward_one():
  spec = make_spec('causal_alibi', 24)
  q, k, v, d_out = _data(spec)
  options = dict(fused.kernel_options(spec), backend='gpu',
                 interpret=INTERPRET)
  qp, kp, vp, pattern, st, _ = kernels._prepare(
      q, k, v, **{**kernels._DEFAULTS, **options})
  d_pad = jnp.zeros(qp.shape).at[:, :24, :, :D].set(d_out)
  out, lse = kernels.mha_forward_reference(qp, kp, vp, pattern, st)
  got = kernels.mha_backward_reference(qp, kp, vp, pattern, st, out, lse,
                                       d_pad)
  fwd = lambda *a: kernels.mha_forward_reference(*a, pattern, st)[0]
  want = jax.vjp(fwd, qp, kp, vp)[1](d_pad)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))


def test_block_map_skips_masked_tiles():
  b, t, blk = 1, 64, 16
  seg = np.ones((b, t), np.int32)
  slots = np.arange(t, dtype=np.int32)[None]
  pattern = {'q_seg': seg, 'kv_seg': seg, 'q_slot': slots, 'kv_slot': slots,
             'kv_pre': np.zeros((b, t), np.int32)}
  causal = np.asarray(common.block_map(pattern, blk, blk, causal=True))[0]
  np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), np.int32)))
  full = np.asarray(common.block_map(pattern, blk, blk, causal=False))[0]
  assert full.all()
  packed = dict(pattern, q_seg=np.repeat([[1, 2, 3, 0]], blk, 1))
  packed['kv_seg'] = packed['q_seg']
  got = np.asarray(common.block_map(packed, blk, blk, causal=False))[0]
  np.testing.assert_array_equal(got, np.diag([1, 1, 1, 0]))
  prefix = dict(pattern, kv_pre=(slots < 20).astype(np.int32))
  got = np.asarray(common.block_map(prefix, blk, blk, causal=True))[0]
  want = np.tril(np.ones((4, 4), np.int32))
  want[:, 1] = 1  # keys 16..19 are in the prefix: every query sees them
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('backend', kernels.BACKENDS)
def test_skipped_tiles_are_not_computed(backend):
  """Keys of a segment no query has, in whole tiles, hold NaN: a computed
  tile would turn them into NaN outputs (0 * NaN); skipped ones cannot."""
  t, s = 16, 256 + 128
  seg_q = jnp.ones((1, t), jnp.int32)
  seg_kv = jnp.full((1, s), 7, jnp.int32).at[:, :128].set(1)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, t, H, D))
  k, v = (jax.random.normal(kk, (1, s, H, D)) for kk in keys[1:])
  poison = jnp.arange(s)[None, :, None, None] >= 128
  k_bad, v_bad = (jnp.where(poison, jnp.nan, a) for a in (k, v))
  options = dict(q_segment_ids=seg_q, kv_segment_ids=seg_kv, causal=False,
                 backend=backend, interpret=INTERPRET,
                 block_sizes=BLOCKS[backend])
  got = pallas_kernels.flash_attention(q, k_bad, v_bad, **options)
  want = pallas_kernels.flash_attention_reference(q, k, v, **options)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('kwargs, needle', [
    ({'backend': 'cuda'}, "backend='cuda'"),
    ({'alibi_slopes': jnp.ones(4)}, 'alibi_slopes has shape (4,)'),
    ({'q_segment_ids': jnp.ones((2, 5), jnp.int32)},
     'q_segment_ids has shape (2, 5)'),
    ({'block_sizes': pallas_kernels.BlockSizes(24, 16, 16, 16)},
     'BlockSizes.block_q=24'),
    ({'backend': 'tpu', 'block_sizes': pallas_kernels.BlockSizes(8, 64, 8,
                                                                 128)},
     'BlockSizes.block_k=64'),
])
def test_bad_arguments_are_eager_value_errors(kwargs, needle):
  q = jnp.zeros((2, 8, H, D))
  seg = jnp.ones((2, 8), jnp.int32)
  options = {'q_segment_ids': seg, 'kv_segment_ids': seg, **kwargs}
  with pytest.raises(ValueError, match=needle.replace('(', r'\(').replace(
      ')', r'\)')):
    pallas_kernels.flash_attention(q, q, q, **options)
  with pytest.raises(ValueError, match='do not match'):
    pallas_kernels.flash_attention(q, q[:, :, :2], q[:, :, :2],
                                   q_segment_ids=seg, kv_segment_ids=seg)


@pytest.mark.parametrize('backend, platform', [('gpu', 'cuda'),
                                               ('tpu', 'tpu')])
def test_kernels_export_for_their_platform(backend, platform):
  """Forward and gradient lower for the chip from this CPU host, with a
  head dim Triton must pad (80) and bf16 inputs, and survive a round trip
  through serialisation."""
  spec = make_spec('glm', 200)
  spec = dataclasses.replace(spec, alibi_slopes=jnp.asarray(
      positions.alibi_slopes(H)))
  q = jnp.zeros((2, 200, H, 80), jnp.bfloat16)
  options = dict(fused.kernel_options(spec), backend=backend)
  fwd = lambda q, k, v: pallas_kernels.flash_attention(q, k, v, **options)
  grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  call = ('__gpu$xla.gpu.triton' if backend == 'gpu' else 'tpu_custom_call')
  for fn, kernels_in_module in ((fwd, 1), (grad, 3)):
    exported = jax.export.export(
        jax.jit(fn), platforms=[platform],
        disabled_checks=pallas_kernels.EXPORT_CHECKS)(q, q, q)
    back = jax.export.deserialize(exported.serialize())
    assert back.platforms == (platform,)
    assert back.out_avals == exported.out_avals
    assert exported.mlir_module().count(call) == kernels_in_module


def test_auto_picks_by_length_on_cpu(monkeypatch):
  spec = make_spec('causal_alibi', 40)
  q, k, v, _ = _data(spec)
  xla = attention_lib.attention(q, k, v, spec, impl='xla')
  assert fused.describe('auto', 40).startswith('auto: xla')
  np.testing.assert_array_equal(
      attention_lib.attention(q, k, v, spec, impl='auto'), xla)
  monkeypatch.setattr(fused, 'AUTO_BLOCKWISE_FROM', 32)
  assert fused.describe('auto', 40).startswith('auto: blockwise')
  np.testing.assert_array_equal(
      attention_lib.attention(q, k, v, spec, impl='auto'),
      attention_lib.attention(q, k, v, spec, impl='blockwise'))


@pytest.mark.slow
@pytest.mark.parametrize('backend', kernels.BACKENDS)
@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('d', [80])  # the default suite's D is 24
def test_wide_sweep(backend, case, d):
  for t in (1, 300):
    _check(make_spec(case, t, seed=t), backend, d=d)
  _check(make_spec(case, 150, seed=5), backend, dtype=jnp.bfloat16, d=d)
