"""glm's Transformer against the float64 NumPy reference, plus model plumbing.

The parity grid touches every ModelConfig switch value at least once (not the
cartesian product). Weights are drawn large (N(0, 0.3) kernels, N(0, 1)
embeddings, random norm scales and biases) so that attention is far from
uniform and wiring mistakes cannot hide. The other tests cover ALiBi slopes,
scan vs unrolled layers, remat policies, bf16 compute, DeepNorm init, the
embedding gradient shrink, padded-vocab masking and logical axis names.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from glm.model.config import ModelConfig
from glm.model import positions, transformer
from glm.parallel import partitioning

from tolerances import assert_close_at_scale  # tests/tolerances.py


try:
  from tests import numpy_reference as ref
except ImportError:  # tests/ itself is on sys.path (pytest rootdir insertion)
  import numpy_reference as ref

# vocab 50 padded to 64, so every parity case also checks the padding mask.
BASE = dict(vocab_size=50, vocab_pad_multiple=16, hidden=32, num_layers=2,
            num_heads=4, mlp_dim=48, max_len=16, scan_layers=False)
B, T = 2, 7


def make_cfg(**overrides) -> ModelConfig:
  return ModelConfig(**{**BASE, **overrides})


def random_params(cfg: ModelConfig, seed: int = 0):
  """glm's unscanned param tree refilled with large random values."""
  shapes = transformer.abstract_params(cfg.replace(scan_layers=False))
  return jax.tree.map(jnp.asarray, ref.random_params_like(shapes, seed))


def _init(cfg, seed):
  return jax.jit(transformer.init_params, static_argnums=0)(
      cfg, jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg: ModelConfig):
  return jax.jit(lambda p, b: transformer.Transformer(cfg).apply(
      {'params': p}, b))


def random_tokens(seed: int, shape=(B, T), vocab: int = BASE['vocab_size']):
  return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32)


def assert_logits_match(cfg, got, want, valid=None, rel=1e-4):
  """Compare real-vocab logits at valid positions; padded vocab exactly."""
  got = np.asarray(got, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  v = cfg.vocab_size
  if valid is None:
    valid = np.ones(got.shape[:2], bool)
  g, w = got[valid][:, :v], want[valid][:, :v]
  scale = max(1.0, float(np.abs(w).max()))
  err = float(np.abs(g - w).max())
  assert err <= rel * scale, (
      f'glm vs reference: max |diff| {err:.3g} > {rel} * logits scale '
      f'{scale:.3g} for {cfg}')
  if cfg.padded_vocab_size > v:
    assert np.all(got[..., v:] == np.finfo(np.float32).min)


# Batches ---------------------------------------------------------------------


def batch_causal(seed):
  return {'tokens': random_tokens(seed)}


def batch_prefix_len(seed):
  return {'tokens': random_tokens(seed), 'prefix_len': np.array([3, 5])}


def batch_prefix_mask(seed):
  pm = np.zeros((B, T), bool)
  pm[0, :2] = True
  pm[1, :6] = True
  return {'tokens': random_tokens(seed), 'prefix_mask': pm}


def batch_glm(seed):
  """GLM blank infilling: Part A (4 tokens with a mask) ++ Part B (3)."""
  pos = np.array([[0, 1, 2, 3, 2, 2, 2],
                  [0, 1, 2, 3, 1, 1, 1]], np.int32)
  block = np.array([[0, 0, 0, 0, 1, 2, 3],
                    [0, 0, 0, 0, 1, 2, 3]], np.int32)
  return {'tokens': random_tokens(seed), 'prefix_len': np.array([4, 4]),
          'position_ids': pos, 'block_position_ids': block}


def batch_packed(seed):
  """Two packed segments with their own prefixes, trailing padding."""
  seg = np.array([[1, 1, 1, 2, 2, 2, 0],
                  [1, 1, 2, 2, 2, 2, 2]], np.int32)
  pm = np.array([[1, 1, 0, 1, 0, 0, 0],
                 [1, 0, 1, 1, 1, 0, 0]], bool)
  return {'tokens': random_tokens(seed), 'segment_ids': seg,
          'prefix_mask': pm}


def batch_padded(seed):
  """Left and right padding, causal."""
  seg = np.array([[0, 0, 1, 1, 1, 1, 1],
                  [1, 1, 1, 1, 0, 0, 0]], np.int32)
  return {'tokens': random_tokens(seed), 'segment_ids': seg}


# name: (ModelConfig overrides, batch builder)
GRID = {
    'bloom_alibi_pre_ln_embednorm_gelu_tied': (
        dict(position='alibi', norm_layout='pre', embed_norm=True,
             mlp_activation='gelu'), batch_causal),
    'alibi_6_heads_packed_prefix': (
        dict(position='alibi', num_heads=6, hidden=36, mlp_activation='swiglu',
             norm_type='rmsnorm'), batch_packed),
    'alibi_12_heads_prefix_headdim': (
        dict(position='alibi', num_heads=12, head_dim=4, num_layers=1,
             vocab_size=64), batch_prefix_len),
    'glm130b_rope_deepnorm_geglu': (
        dict(position='rope', norm_layout='deepnorm', mlp_activation='geglu',
             num_layers=3), batch_glm),
    'chatglm_rope2d_deepnorm_geglu': (
        dict(position='rope2d', norm_layout='deepnorm', mlp_activation='geglu',
             rope_base=500.0), batch_glm),
    'ul2_rope_partial_rms_swiglu_nobias_lmhead': (
        dict(position='rope', rope_fraction=0.5, norm_type='rmsnorm',
             mlp_activation='swiglu', use_bias=False, tie_embeddings=False),
        batch_prefix_mask),
    'rope_odd_fraction_headdim_packed': (
        dict(position='rope', rope_fraction=0.7, head_dim=10, num_heads=3,
             rope_base=100.0), batch_packed),
    'learned_embednorm_no_final_norm_headdim_padded': (
        dict(position='learned', embed_norm=True, final_norm=False,
             head_dim=12, max_len=9), batch_padded),
    'none_deepnorm_rms_swiglu_lmhead_nobias': (
        dict(position='none', norm_layout='deepnorm', norm_type='rmsnorm',
             mlp_activation='swiglu', use_bias=False, tie_embeddings=False,
             embed_norm=True), batch_prefix_len),
    'rope_post_ln_gelu_prefix': (
        dict(position='rope', norm_layout='post', num_layers=3),
        batch_prefix_mask),
    'learned_deepnorm_gelu_packed': (
        dict(position='learned', norm_layout='deepnorm', final_norm=False,
             tie_embeddings=False), batch_packed),
}


@pytest.mark.parametrize('name', sorted(GRID))
def test_logits_match_numpy_reference(name):
  overrides, make_batch = GRID[name]
  cfg = make_cfg(**overrides)
  params = random_params(cfg, seed=len(name))
  batch = make_batch(seed=len(name) + 1)
  got = jitted_apply(cfg)(params, jax.tree.map(jnp.asarray, batch))
  want = ref.forward(cfg, params, batch)
  seg = batch.get('segment_ids')
  valid = None if seg is None else np.asarray(seg) > 0
  assert_logits_match(cfg, got, want, valid)


def test_grid_touches_every_switch_value():
  seen = {}
  for overrides, make_batch in GRID.values():
    cfg = make_cfg(**overrides)
    for field in ('position', 'norm_layout', 'norm_type', 'mlp_activation',
                  'use_bias', 'tie_embeddings', 'embed_norm', 'final_norm'):
      seen.setdefault(field, set()).add(getattr(cfg, field))
    seen.setdefault('head_dim_override', set()).add(bool(cfg.head_dim))
    seen.setdefault('partial_rope', set()).add(
        cfg.position == 'rope' and cfg.rope_fraction < 1)
    seen.setdefault('pow2_heads', set()).add(
        cfg.num_heads & (cfg.num_heads - 1) == 0)
    seen.setdefault('batch', set()).add(make_batch.__name__)
  from glm.model import config
  assert seen['position'] == set(config.POSITIONS)
  assert seen['norm_layout'] == set(config.NORM_LAYOUTS)
  assert seen['norm_type'] == set(config.NORM_TYPES)
  assert seen['mlp_activation'] == set(config.MLP_ACTIVATIONS)
  for field in ('use_bias', 'tie_embeddings', 'embed_norm', 'final_norm',
                'head_dim_override', 'partial_rope', 'pow2_heads'):
    assert seen[field] == {True, False}, field
  assert len(seen['batch']) == 6


def test_reference_masks_glm_layout():
  """The reference's own mask follows GLM's layout (tril + Part A columns)."""
  batch = batch_glm(0)
  m = ref.attention_mask_reference(batch)[0]
  want = np.tril(np.ones((T, T), bool))
  want[:, :4] = True
  np.testing.assert_array_equal(m, want)
  mp = ref.attention_mask_reference(batch_packed(0))[0]
  assert mp[0, 1] and not mp[2, 3] and not mp[4, 2] and not mp[3, 4]
  assert not mp[4, 5] and mp[5, 4]


# ALiBi slopes ----------------------------------------------------------------


def test_alibi_slopes_reference_known_values():
  np.testing.assert_allclose(ref.alibi_slopes_reference(8),
                             [2.0 ** -i for i in range(1, 9)])
  want112 = ([2.0 ** (-i / 8) for i in range(1, 65)]
             + [2.0 ** (-k / 16) for k in range(1, 96, 2)])
  assert len(want112) == 112
  np.testing.assert_allclose(ref.alibi_slopes_reference(112), want112,
                             rtol=1e-12)
  # Megatron: get_slopes(2c)[0::2][:n-c] for n = 6 (c = 4).
  np.testing.assert_allclose(ref.alibi_slopes_reference(6),
                             [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                              2.0 ** -1, 2.0 ** -3])


@pytest.mark.parametrize('n', list(range(1, 131)))
def test_alibi_slopes_match_glm(n):
  got = np.asarray(positions.alibi_slopes(n), np.float64)
  assert got.shape == (n,)
  np.testing.assert_allclose(got, ref.alibi_slopes_reference(n), rtol=1e-6)


# Scan, remat, bf16 -----------------------------------------------------------


def _loss_and_grad(cfg, params, batch):
  """((loss, logits), grads) of a next-token-style loss, jitted."""
  targets = jnp.asarray(random_tokens(99, batch['tokens'].shape))

  def loss(p):
    logits = transformer.Transformer(cfg).apply({'params': p}, batch)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1).mean()
    return nll, logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_scan_layers_equals_unrolled():
  cfg = make_cfg(position='rope', norm_layout='deepnorm',
                 mlp_activation='geglu', num_layers=3)
  params = random_params(cfg, seed=3)
  batch = jax.tree.map(jnp.asarray, batch_glm(4))
  unrolled = jitted_apply(cfg)(params, batch)
  scfg = cfg.replace(scan_layers=True)
  stacked = transformer.stack_layers(params, cfg.num_layers)
  shapes = transformer.abstract_params(scfg)
  assert (jax.tree.map(lambda a: a.shape, stacked)
          == jax.tree.map(lambda a: a.shape, shapes))
  scanned = jitted_apply(scfg)(stacked, batch)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-4)
  back = transformer.unstack_layers(stacked, cfg.num_layers)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Scanned init draws different weights per layer.
  init = _init(scfg, 0)
  q = np.asarray(init['layers']['attention']['query'])
  assert q.shape[0] == cfg.num_layers and not np.allclose(q[0], q[1])


@pytest.mark.parametrize('scan', [True, False])
def test_remat_policies_same_logits_and_grads(scan):
  cfg = make_cfg(position='alibi', scan_layers=scan, mlp_activation='geglu')
  params = random_params(cfg, seed=5)
  if scan:
    params = transformer.stack_layers(params, cfg.num_layers)
  batch = jax.tree.map(jnp.asarray, batch_prefix_len(6))
  (base_loss, base_logits), base_grad = _loss_and_grad(cfg, params, batch)
  # key_bias's true gradient is 0 (softmax shift), so compare against the
  # largest gradient anywhere rather than leaf by leaf.
  gmax = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(base_grad))
  assert float(jnp.abs(base_grad['embed']['embedding']).max()) > 0
  policies = ('full', 'dots', 'dots_no_batch') if scan else ('full',)
  for policy in policies:
    rcfg = cfg.replace(remat_policy=policy)
    (loss, logits), grad = _loss_and_grad(rcfg, params, batch)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    np.testing.assert_allclose(logits, base_logits, rtol=1e-6, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * gmax), grad, base_grad)


def test_bf16_compute_close_to_fp32():
  cfg = make_cfg(position='rope', mlp_activation='swiglu', num_layers=2)
  # Moderate weights: bf16 has 8 mantissa bits.
  params = jax.tree.map(lambda a: a * 0.5, random_params(cfg, seed=7))
  batch = batch_prefix_len(8)
  want = ref.forward(cfg, params, batch)
  f32 = np.asarray(jitted_apply(cfg)(params, batch))
  bcfg = cfg.replace(dtype='bfloat16')
  bf16 = jitted_apply(bcfg)(params, batch)
  assert bf16.dtype == jnp.float32  # logits come back in float32
  bf16 = np.asarray(bf16, np.float64)
  v = cfg.vocab_size
  scale = float(np.abs(want[..., :v]).max())
  err = float(np.abs(bf16[..., :v] - want[..., :v]).max())
  assert err < 0.08 * scale, (err, scale)
  corr = np.corrcoef(bf16[..., :v].ravel(), want[..., :v].ravel())[0, 1]
  assert corr > 0.999, corr
  # ... and bf16 really is lower precision than fp32 (the switch is wired).
  assert err > 10 * float(np.abs(f32[..., :v] - want[..., :v]).max())
  assert np.all(bf16[..., v:] == np.finfo(np.float32).min)
  shapes = transformer.abstract_params(bcfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


# Initialisation --------------------------------------------------------------


def _xavier_std(fan_in, fan_out):
  return math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize('activation', ['gelu', 'geglu'])
def test_deepnorm_init_std(activation):
  e, h, d, f, n = 128, 4, 32, 256, 2
  cfg = ModelConfig(vocab_size=64, hidden=e, num_heads=h, mlp_dim=f,
                    num_layers=n, norm_layout='deepnorm', position='rope',
                    mlp_activation=activation, scan_layers=True)
  beta = (2.0 * n) ** -0.5
  p = _init(cfg, 1)['layers']
  gated = activation == 'geglu'
  # GLM-130B's dense_h_to_4h is one [h, 2*ffn] matrix: fan_out = 2F.
  wi_out = 2 * f if gated else f
  want = {
      ('attention', 'query'): _xavier_std(e, h * d),
      ('attention', 'key'): _xavier_std(e, h * d),
      ('attention', 'value'): beta * _xavier_std(e, h * d),
      ('attention', 'out'): beta * _xavier_std(h * d, e),
      ('mlp', 'wi'): beta * _xavier_std(e, wi_out),
      ('mlp', 'wo'): beta * _xavier_std(f, e),
  }
  for (mod, name), std in want.items():
    w = np.asarray(p[mod][name], np.float64)
    assert w.shape[0] == n
    got = w.std()
    assert abs(got / std - 1) < 0.05, (
        f'{mod}/{name}: std {got:.5f}, want {std:.5f} (ratio {got / std:.3f})')
    assert abs(w.mean()) < 0.05 * std
  for mod in ('attention', 'mlp'):
    for name, leaf in p[mod].items():
      if name.endswith('_bias'):
        assert np.all(np.asarray(leaf) == 0), f'{mod}/{name} is not zero'
  for norm in ('input_norm', 'post_attention_norm'):
    assert np.all(np.asarray(p[norm]['scale']) == 1)
    assert np.all(np.asarray(p[norm]['bias']) == 0)


def test_pre_ln_init_std():
  cfg = ModelConfig(vocab_size=64, hidden=128, num_heads=4, mlp_dim=256,
                    num_layers=2, init_std=0.02, scan_layers=True,
                    tie_embeddings=False, position='learned', max_len=256)
  p = _init(cfg, 2)
  for mod, name in (('attention', 'query'), ('attention', 'value'),
                    ('attention', 'out'), ('mlp', 'wi'), ('mlp', 'wo')):
    std = float(np.asarray(p['layers'][mod][name]).std())
    assert abs(std / 0.02 - 1) < 0.05, (mod, name, std)
  for name in ('lm_head', 'position_embedding'):
    assert abs(float(np.asarray(p[name]).std()) / 0.02 - 1) < 0.05, name


# Embedding gradient shrink ---------------------------------------------------


def test_embedding_gradient_shrink():
  cfg = make_cfg(position='rope', tie_embeddings=False, embed_norm=True,
                 norm_layout='deepnorm', mlp_activation='geglu', num_layers=1)
  params = random_params(cfg, seed=9)
  batch = jax.tree.map(jnp.asarray, batch_prefix_len(10))
  (l1, _), g1 = _loss_and_grad(cfg, params, batch)
  (l2, _), g2 = _loss_and_grad(cfg.replace(embed_grad_shrink=0.1), params,
                               batch)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  e1 = np.asarray(g1['embed']['embedding'])
  e2 = np.asarray(g2['embed']['embedding'])
  assert np.abs(e1).max() > 0
  np.testing.assert_allclose(e2, 0.1 * e1, rtol=1e-4,
                             atol=1e-6 * np.abs(e1).max())
  # Every other gradient is untouched (up to rounding: 0.1 x + 0.9 x is not
  # always x in float32, so the forward differs in the last bits).
  g1['embed'] = g2['embed'] = None
  assert_close_at_scale(g2, g1, 1e-5, what='other gradients')


# Padded vocabulary -----------------------------------------------------------


@pytest.mark.parametrize('tie', [True, False])
def test_padded_vocab_logits_masked(tie):
  cfg = make_cfg(vocab_size=37, vocab_pad_multiple=32, tie_embeddings=tie,
                 num_layers=1)
  assert cfg.padded_vocab_size == 64
  params = random_params(cfg, seed=11)
  logits = np.asarray(jitted_apply(cfg)(params, batch_causal(12)))
  assert logits.shape == (B, T, 64) and logits.dtype == np.float32
  assert np.all(logits[..., 37:] == np.finfo(np.float32).min)
  assert np.all(np.isfinite(logits[..., :37]))
  assert np.all(np.abs(logits[..., :37]) < 1e30)
  probs = jax.nn.softmax(jnp.asarray(logits), -1)
  assert float(probs[..., 37:].max()) == 0.0


def test_unpadded_vocab_has_no_masked_logits():
  cfg = make_cfg(vocab_size=48, num_layers=1)
  assert cfg.padded_vocab_size == 48
  params = random_params(cfg, seed=13)
  logits = np.asarray(jitted_apply(cfg)(params, batch_causal(14)))
  assert logits.shape[-1] == 48 and np.all(np.abs(logits) < 1e30)


# Logical axes ----------------------------------------------------------------


@pytest.mark.parametrize('overrides', [
    dict(scan_layers=True, position='learned', tie_embeddings=False,
         embed_norm=True),
    dict(scan_layers=False, mlp_activation='geglu', norm_type='rmsnorm'),
    dict(scan_layers=True, mlp_activation='swiglu', use_bias=False,
         position='rope2d'),
], ids=['scan_learned_lmhead', 'unrolled_geglu_rms', 'scan_swiglu_nobias'])
def test_every_param_has_logical_axes(overrides):
  cfg = make_cfg(**overrides)
  shapes = transformer.abstract_params(cfg)
  axes = transformer.logical_axes(cfg)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  flat_axes = dict(jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=is_spec)[0])
  flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
  assert set(flat_axes) == set(flat_shapes)
  assert len(flat_shapes) > 10
  for path, leaf in flat_shapes.items():
    names = tuple(flat_axes[path])
    where = jax.tree_util.keystr(path)
    assert len(names) == leaf.ndim, (where, names, leaf.shape)
    for name in names:
      assert name in partitioning.LOGICAL_NAMES, (where, names)
    if cfg.scan_layers and where.startswith("['layers']"):
      assert names[0] == 'layers', (where, names)
    else:
      assert 'layers' not in names, (where, names)
