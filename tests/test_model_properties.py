"""Property tests of the Transformer's attention pattern and positions.

No reference numbers here: each test changes an input and checks which logits
may (and which must) move. RoPE and ALiBi are relative (shifting every
position id leaves logits alone) while learned tables are absolute; GLM's
Part A never sees Part B; causal rows never see the future; packed segments
and padding are invisible to each other, and a packed segment gives the same
logits as the segment run alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm.model.config import ModelConfig
from glm.model import positions, transformer

from tolerances import assert_close_at_scale  # tests/tolerances.py


try:
  from tests import numpy_reference as ref
except ImportError:  # tests/ itself is on sys.path (pytest rootdir insertion)
  import numpy_reference as ref

BASE = dict(vocab_size=50, vocab_pad_multiple=16, hidden=32, num_layers=2,
            num_heads=4, mlp_dim=48, max_len=32, scan_layers=False)
V = BASE['vocab_size']


def make_cfg(**overrides) -> ModelConfig:
  return ModelConfig(**{**BASE, **overrides})


def random_params(cfg: ModelConfig, seed: int = 0):
  shapes = transformer.abstract_params(cfg)
  return jax.tree.map(jnp.asarray, ref.random_params_like(shapes, seed))


@functools.lru_cache(maxsize=None)
def _apply(cfg: ModelConfig):
  return jax.jit(lambda p, b: transformer.Transformer(cfg).apply(
      {'params': p}, b))


def logits_of(cfg, params, batch) -> np.ndarray:
  """Real-vocab logits [B, T, vocab_size] as float64."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return np.asarray(_apply(cfg)(params, batch), np.float64)[..., :V]


def tokens(seed, shape):
  return np.random.default_rng(seed).integers(0, V, shape, dtype=np.int32)


def assert_same(a, b, rel=1e-5, what=''):
  scale = max(1.0, float(np.abs(b).max()))
  err = float(np.abs(a - b).max())
  assert err <= rel * scale, f'{what}: max |diff| {err:.3g} (scale {scale:.3g})'


def assert_differs(a, b, rel=1e-3, what=''):
  scale = max(1.0, float(np.abs(b).max()))
  err = float(np.abs(a - b).max())
  assert err > rel * scale, (
      f'{what}: logits did not change (max |diff| {err:.3g}, '
      f'scale {scale:.3g})')


# Relative vs absolute positions ----------------------------------------------


@pytest.mark.parametrize('position', ['rope', 'rope2d', 'alibi'])
def test_relative_positions_shift_invariant(position):
  cfg = make_cfg(position=position, norm_layout='deepnorm',
                 mlp_activation='geglu')
  params = random_params(cfg, 1)
  t = 8
  toks = tokens(2, (2, t))
  pos = np.tile(np.arange(t, dtype=np.int32), (2, 1))
  block = np.array([[0, 0, 0, 0, 0, 1, 2, 3],
                    [0, 0, 0, 0, 1, 2, 3, 4]], np.int32)
  # prefix_len makes part of the pattern bidirectional, so keys both behind
  # and ahead of a query are exercised.
  batch = {'tokens': toks, 'position_ids': pos, 'block_position_ids': block,
           'prefix_len': np.array([5, 4])}
  base = logits_of(cfg, params, batch)
  shifted = dict(batch, position_ids=pos + 11, block_position_ids=block + 5)
  assert_same(logits_of(cfg, params, shifted), base, 1e-4,
              f'{position}: shift all ids')
  # Relative positions do matter (the encoding is not a no-op).
  spread = dict(batch, position_ids=pos * 3)
  assert_differs(logits_of(cfg, params, spread), base,
                 what=f'{position}: distances tripled')
  if position == 'rope2d':
    flat_block = dict(batch, block_position_ids=np.zeros_like(block))
    assert_differs(logits_of(cfg, params, flat_block), base,
                   what='rope2d: block positions ignored')


def test_learned_positions_are_absolute():
  cfg = make_cfg(position='learned')
  params = random_params(cfg, 3)
  toks = tokens(4, (2, 8))
  pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
  base = logits_of(cfg, params, {'tokens': toks, 'position_ids': pos})
  default = logits_of(cfg, params, {'tokens': toks})
  assert_same(default, base, 1e-6, 'default position ids are 0..T-1')
  shifted = logits_of(cfg, params, {'tokens': toks, 'position_ids': pos + 11})
  assert_differs(shifted, base, what='learned: shift all ids')


# GLM Part A / Part B, causal -------------------------------------------------


def glm_batch(seed):
  """Part A = 5 tokens (one [MASK]-like slot at 2); Part B = a 4-token span."""
  toks = tokens(seed, (2, 9))
  pos = np.tile(np.array([0, 1, 2, 3, 4, 2, 2, 2, 2], np.int32), (2, 1))
  block = np.tile(np.array([0, 0, 0, 0, 0, 1, 2, 3, 4], np.int32), (2, 1))
  return {'tokens': toks, 'position_ids': pos, 'block_position_ids': block,
          'prefix_len': np.array([5, 5])}


@pytest.mark.parametrize('position', ['rope2d', 'rope'])
def test_glm_part_a_blind_to_part_b(position):
  cfg = make_cfg(position=position, norm_layout='deepnorm',
                 mlp_activation='geglu')
  params = random_params(cfg, 5)
  batch = glm_batch(6)
  base = logits_of(cfg, params, batch)
  a = 5

  new_b = batch['tokens'].copy()
  new_b[:, a:] = (new_b[:, a:] + 7) % V
  changed_b = logits_of(cfg, params, dict(batch, tokens=new_b))
  assert_same(changed_b[:, :a], base[:, :a], 1e-6, 'Part A saw Part B')
  assert_differs(changed_b[:, a:], base[:, a:], what='Part B tokens ignored')

  new_a = batch['tokens'].copy()
  new_a[:, a - 1] = (new_a[:, a - 1] + 7) % V  # last Part A token
  changed_a = logits_of(cfg, params, dict(batch, tokens=new_a))
  assert_differs(changed_a[:, a:], base[:, a:],
                 what='Part B blind to Part A')
  # Part A is bidirectional: its first token sees its last one.
  assert_differs(changed_a[:, 0], base[:, 0],
                 what='Part A is not bidirectional')

  # Part B is causal inside itself: its last token does not reach its first.
  new_last = batch['tokens'].copy()
  new_last[:, -1] = (new_last[:, -1] + 7) % V
  changed_last = logits_of(cfg, params, dict(batch, tokens=new_last))
  assert_same(changed_last[:, :-1], base[:, :-1], 1e-6, 'Part B not causal')


def test_prefix_mask_equals_prefix_len():
  cfg = make_cfg(position='alibi')
  params = random_params(cfg, 7)
  toks = tokens(8, (2, 8))
  by_len = logits_of(cfg, params, {'tokens': toks,
                                   'prefix_len': np.array([3, 6])})
  pm = np.arange(8)[None, :] < np.array([[3], [6]])
  by_mask = logits_of(cfg, params, {'tokens': toks, 'prefix_mask': pm})
  assert_same(by_mask, by_len, 1e-6, 'prefix_mask vs prefix_len')
  causal = logits_of(cfg, params, {'tokens': toks})
  # Causal row 0 sees only token 0; inside a prefix of 3 it sees 0..2.
  assert_differs(by_len[:, :2], causal[:, :2], what='prefix had no effect')


@pytest.mark.parametrize('position', ['alibi', 'learned'])
def test_causal_future_tokens_invisible(position):
  cfg = make_cfg(position=position)
  params = random_params(cfg, 9)
  toks = tokens(10, (2, 8))
  base = logits_of(cfg, params, {'tokens': toks})
  k = 4
  new = toks.copy()
  new[:, k] = (new[:, k] + 7) % V
  changed = logits_of(cfg, params, {'tokens': new})
  assert_same(changed[:, :k], base[:, :k], 1e-6, 'past saw the future')
  for i in range(k, 8):
    assert_differs(changed[:, i], base[:, i], what=f'position {i} blind')


# Packing and padding ---------------------------------------------------------


@pytest.mark.parametrize('position', ['alibi', 'rope', 'rope2d', 'learned',
                                      'none'])
def test_packed_segments_are_independent(position):
  cfg = make_cfg(position=position, mlp_activation='swiglu')
  params = random_params(cfg, 11)
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0],
                  [1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
  # A bidirectional prefix of 2 in every segment.
  pm = np.array([[1, 1, 0, 1, 1, 0, 0, 0],
                 [1, 1, 0, 0, 0, 1, 1, 0]], bool)
  toks = tokens(12, (2, 8))
  batch = {'tokens': toks, 'segment_ids': seg, 'prefix_mask': pm}
  base = logits_of(cfg, params, batch)

  # Changing segment 2 leaves segment 1 bit-for-bit alone.
  new = np.where(seg == 2, (toks + 7) % V, toks)
  changed = logits_of(cfg, params, dict(batch, tokens=new))
  s1 = seg == 1
  assert_same(changed[s1], base[s1], 1e-6, 'segment 1 saw segment 2')
  assert_differs(changed[seg == 2], base[seg == 2],
                 what='segment 2 tokens ignored')

  # Each segment alone (positions restarting at 0) gives the same logits.
  for row in range(2):
    for s in (1, 2):
      idx = np.nonzero(seg[row] == s)[0]
      alone = logits_of(cfg, params, {
          'tokens': toks[row:row + 1, idx], 'prefix_len': np.array([2])})
      assert_same(base[row, idx], alone[0], 1e-4,
                  f'row {row} segment {s} vs alone')


@pytest.mark.parametrize('position', ['learned', 'rope'])
def test_padding_is_invisible(position):
  cfg = make_cfg(position=position, norm_layout='deepnorm',
                 mlp_activation='geglu')
  params = random_params(cfg, 13)
  seg = np.array([[1, 1, 1, 1, 1, 0, 0, 0],    # right padding
                  [0, 0, 0, 1, 1, 1, 1, 1]],   # left padding
                 np.int32)
  toks = tokens(14, (2, 8))
  batch = {'tokens': toks, 'segment_ids': seg}
  base = logits_of(cfg, params, batch)
  real = seg > 0
  new = np.where(real, toks, (toks + 7) % V)
  changed = logits_of(cfg, params, dict(batch, tokens=new))
  assert_same(changed[real], base[real], 1e-6, 'real tokens saw padding')
  assert np.all(np.isfinite(base[real]))
  for row in range(2):
    idx = np.nonzero(real[row])[0]
    alone = logits_of(cfg, params, {'tokens': toks[row:row + 1, idx]})
    assert_same(base[row, idx], alone[0], 1e-4, f'row {row} vs unpadded')


# ALiBi with a non-power-of-two head count ------------------------------------


@pytest.mark.parametrize('heads', [6, 12])
def test_alibi_non_power_of_two_heads(heads, monkeypatch):
  pos = np.array([[0, 1, 2, 3, 4, 0, 1]], np.int32)
  pos_j = jnp.asarray(pos)
  bias = np.asarray(positions.alibi_bias(pos_j, pos_j,
                                         positions.alibi_slopes(heads)))
  slopes = ref.alibi_slopes_reference(heads)
  dist = np.abs(pos[0][:, None] - pos[0][None, :])
  np.testing.assert_allclose(bias[0], -slopes[:, None, None] * dist,
                             rtol=1e-6, atol=1e-7)

  cfg = make_cfg(position='alibi', num_heads=heads, hidden=8 * heads,
                 num_layers=1)
  params = random_params(cfg, 15)
  toks = tokens(16, (2, 8))
  batch = {'tokens': toks, 'prefix_len': np.array([3, 0])}
  got = logits_of(cfg, params, batch)
  want = ref.forward(cfg, params, batch)[..., :V]
  assert_same(got, want, 1e-4, f'alibi {heads} heads vs reference')
  # The comparison is sensitive to which head gets which slope.
  real_slopes = ref.alibi_slopes_reference
  monkeypatch.setattr(ref, 'alibi_slopes_reference',
                      lambda n: real_slopes(n)[::-1].copy())
  swapped = ref.forward(cfg, params, batch)[..., :V]
  monkeypatch.undo()
  assert_differs(got, swapped, 1e-3, 'slope order does not matter')
  # ALiBi is relative: a later copy of the same text, packed after another
  # segment, gives the same logits as the first copy.
  packed = np.concatenate([toks[:1, :4], toks[:1, :4]], axis=1)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
  out = logits_of(cfg, params, {'tokens': packed, 'segment_ids': seg})
  assert_same(out[0, 4:], out[0, :4], 1e-4, 'alibi depends on absolute index')


@pytest.mark.parametrize('bias_heads,extra_keys', [(1, 0), (3, 0), (3, 4)])
def test_attention_vjp_matches_autodiff(bias_heads, extra_keys):
  """The hand-written attention backward equals autodiff of plain softmax
  attention, including the bias gradient, with masked keys in the bias and
  with more keys than queries (the queries are the last T of S)."""
  from glm.model.attention import _attention
  b, h, t, d = 2, 3, 7, 4
  s = t + extra_keys
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  q, d_out = (jax.random.normal(kk, (b, h, t, d)) for kk in keys[:2])
  k, v = (jax.random.normal(kk, (b, h, s, d)) for kk in keys[2:4])
  bias = jax.random.normal(keys[4], (b, bias_heads, t, s))
  causal = jnp.tril(jnp.ones((s, s), bool))[s - t:]
  bias = jnp.where(causal, bias, jnp.finfo(jnp.float32).min)

  def plain(q, k, v, bias):
    s = jnp.einsum('bhtd,bhsd->bhts', q, k) / np.sqrt(d) + bias
    return jnp.einsum('bhts,bhsd->bhtd', jax.nn.softmax(s, -1), v)

  def loss(fn):
    return lambda *a: jnp.sum(fn(*a) * d_out)

  want = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(q, k, v, bias)
  got = jax.grad(loss(_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
  np.testing.assert_allclose(_attention(q, k, v, bias), plain(q, k, v, bias),
                             rtol=1e-5, atol=1e-6)
  want = [jnp.where(jnp.isfinite(w), w, 0.0) for w in want]
  assert_close_at_scale(list(got), want, 1e-5, what='dq, dk, dv, dbias')
