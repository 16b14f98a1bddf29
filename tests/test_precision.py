"""Compute policies: 'mixed' (bf16 matmul inputs, fp32 accumulation and
elementwise work), 'bfloat16' and 'auto', against float32; the layer scan's
unrolling; every matmul of a mixed train step really takes bf16 inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm.model import layers
from glm.model import transformer
from glm.model.config import ModelConfig
from glm.training import losses

CFG = ModelConfig(vocab_size=300, hidden=64, num_layers=2, num_heads=4,
                  mlp_dim=128, max_len=32, position='alibi', embed_norm=True)


def _batch():
  rng = np.random.default_rng(0)
  tok = rng.integers(0, 300, (2, 16)).astype(np.int32)
  return {'tokens': jnp.asarray(tok),
          'targets': jnp.asarray(np.roll(tok, -1, 1)),
          'loss_mask': jnp.ones((2, 16), jnp.float32),
          'prefix_len': jnp.asarray([3, 0])}


def _loss(cfg, params, batch):
  x, w = transformer.Transformer(cfg).apply({'params': params}, batch,
                                            output_layer=False)
  total, count = losses.output_loss(x, w, batch['targets'],
                                    batch['loss_mask'],
                                    vocab_size=cfg.vocab_size)
  return total / count


def test_auto_is_mixed_on_cpu_and_unrolls_the_layers():
  assert jax.default_backend() == 'cpu'
  assert layers.precision(CFG.replace(dtype='auto')).name == 'mixed'
  mixed = layers.precision(CFG.replace(dtype='mixed'))
  assert (mixed.activation, mixed.matmul) == (jnp.float32, jnp.bfloat16)
  full = layers.precision(CFG.replace(dtype='bfloat16'))
  assert (full.activation, full.matmul) == (jnp.bfloat16, jnp.bfloat16)
  assert transformer.scan_unroll(CFG) == CFG.num_layers
  assert transformer.scan_unroll(CFG.replace(scan_unroll=1)) == 1


_BLOOM = dict(position='alibi', embed_norm=True)
_GLM = dict(position='rope2d', norm_layout='deepnorm', mlp_activation='geglu',
            tie_embeddings=False)
_UL2 = dict(position='rope', norm_type='rmsnorm', mlp_activation='swiglu',
            use_bias=False)


# Each family once and each policy at least once by default; the rest of the
# family x policy grid is `slow`.
@pytest.mark.parametrize('family,dtype', [
    (_BLOOM, 'mixed'), (_GLM, 'bfloat16'), (_UL2, 'mixed'),
    *(pytest.param(f, d, marks=pytest.mark.slow) for f, d in (
        (_BLOOM, 'bfloat16'), (_GLM, 'mixed'), (_UL2, 'bfloat16')))])
def test_policies_track_float32(family, dtype):
  """Loss and gradients under a 16-bit policy stay within bf16 rounding of
  float32's: the loss to 1%, the gradient direction to cosine > 0.99."""
  cfg = CFG.replace(**family)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  batch = _batch()
  ref_loss, ref_grad = jax.value_and_grad(_loss, argnums=1)(
      cfg.replace(dtype='float32'), params, batch)
  loss, grad = jax.value_and_grad(_loss, argnums=1)(
      cfg.replace(dtype=dtype), params, batch)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
  a, b = flat(grad), flat(ref_grad)
  assert np.isfinite(a).all()
  cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  assert cos > 0.99, cos
  # ... and are not float32 itself: bf16 rounding shows.
  assert float(loss) != float(ref_loss)


def _dots(jaxpr) -> list:
  """Every dot_general of a jaxpr and of the jaxprs inside it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(eqn)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found += _dots(inner)
  return found


def test_every_matmul_of_a_mixed_train_step_takes_bf16():
  """Forward and backward: bf16 operands, float32 results. A float32 dot
  would be the slow path on CPU (and the point of the policy is lost)."""
  cfg = CFG.replace(dtype='mixed', position='rope', mlp_activation='geglu')
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: _loss(cfg, p, _batch())))(params)
  dots = _dots(jaxpr.jaxpr)
  assert len(dots) >= 3 * 6  # q, k, v, out, MLP in, out: forward + 2 grads
  for eqn in dots:
    ins = [v.aval.dtype for v in eqn.invars]
    assert ins == [jnp.bfloat16, jnp.bfloat16], (ins, str(eqn)[:200])
    assert eqn.outvars[0].aval.dtype == jnp.float32, str(eqn)[:200]


def test_mixed_dense_gradient_is_the_bf16_product():
  """dense's mixed backward equals the float32 gradient of the same
  bf16-rounded operands, to float32 accumulation error."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(k1, (2, 5, 8))
  w = jax.random.normal(k2, (8, 3, 4))
  g = jax.random.normal(k3, (2, 5, 3, 4))
  eqn = 'bte,ehd->bthd'
  mixed = lambda x, w: jnp.sum(layers.dense(
      eqn, x, w, ('embed', 'heads', 'kv'), dtype=jnp.bfloat16,
      out_dtype=jnp.float32) * g)
  dx, dw = jax.grad(mixed, argnums=(0, 1))(x, w)
  r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  want_dx = jnp.einsum('bthd,ehd->bte', r(g), r(w))
  want_dw = jnp.einsum('bte,bthd->ehd', r(x), r(g))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype


def test_unrolled_scan_is_the_same_model():
  params = transformer.init_params(CFG, jax.random.PRNGKey(1))
  batch = _batch()
  rolled = _loss(CFG.replace(scan_unroll=1), params, batch)
  unrolled = _loss(CFG.replace(scan_unroll=2), params, batch)
  np.testing.assert_allclose(rolled, unrolled, rtol=1e-6)
