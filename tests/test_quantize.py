"""INT8 / INT4 weight-only quantisation: the scheme against a NumPy
reference, the quantised model against the float model run on the
dequantised weights (XLA and the Pallas kernel), the kernel in interpret
mode and lowered for cuda and tpu, and `glm quantize` end to end (score and
generate read its output; errors are one line)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from glm import cli
from glm.inference import quantize
from glm.model import checkpoint
from glm.model import quant
from glm.model import transformer
from glm.model.config import ConfigError, ModelConfig
from glm.pallas_kernels import quant_matmul as qm
from test_hf_bloom import make_hf_bloom, read_jsonl, write_jsonl

FAMILIES = {
    'bloom': dict(position='alibi', embed_norm=True),
    'glm': dict(position='rope', norm_layout='deepnorm',
                mlp_activation='geglu'),
}


def numpy_scheme(w, bits, contract):
  """GLM-130B's scheme written out in NumPy: the dequantised kernel."""
  qmax = {8: 127.0, 4: 7.0}[bits]
  axes = tuple(range(contract))
  scale = np.abs(w).max(axis=axes, keepdims=True).astype(np.float32) / qmax
  with np.errstate(invalid='ignore'):                # 0 / 0
    ints = np.clip(np.round(w / scale), -qmax, qmax)
  return ints * scale, scale


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('shape,contract', [((48, 3, 16), 1),
                                            ((3, 16, 48), 2),
                                            ((48, 2, 64), 1)])
def test_dequantised_weights_equal_the_numpy_scheme(bits, shape, contract):
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  w[..., 0] = 0.0 if contract == 1 else w[..., 0]    # an all-zero column
  q, scale = quant.quantize(w, bits, contract)
  want, want_scale = numpy_scheme(w, bits, contract)
  want = np.nan_to_num(want)                         # 0 / 0 on that column
  np.testing.assert_array_equal(scale, want_scale.reshape(scale.shape))
  got = np.asarray(quant.dequantize(q, scale, bits, contract))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert np.all(np.abs(got - w) <= want_scale / 2 + 1e-7)   # round to nearest
  assert q.dtype == np.int8
  packed = list(shape)
  if bits == 4:
    packed[contract - 1] //= 2
  assert q.shape == tuple(packed) and scale.shape == shape[contract:]


def test_int4_packing_round_trips_every_pair():
  vals = np.array([(a, b) for a in range(-8, 8) for b in range(-8, 8)],
                  np.int8).reshape(-1)                   # [512], pairs
  packed = quant.pack_int4(vals, 0)
  assert packed.shape == (256,) and packed.dtype == np.int8
  np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, 0)),
                                vals)
  with pytest.raises(ValueError, match='odd'):
    quant.pack_int4(np.zeros((3, 2), np.int8), 0)


def _dequantised(qparams, bits):
  flat = traverse_util.flatten_dict(qparams)
  out = {}
  for path, v in flat.items():
    name = path[-1]
    if name.endswith('_scale') and name[:-6] in quant.CONTRACT:
      continue
    if name in quant.CONTRACT and v.dtype == np.int8:
      s = flat[path[:-1] + (f'{name}_scale',)]
      v = np.stack([np.asarray(quant.dequantize(v[i], s[i], bits,
                                                quant.CONTRACT[name]))
                    for i in range(v.shape[0])])
    out[path] = v
  return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize('family,bits', [
    ('bloom', 8), ('glm', 4), pytest.param('bloom', 4, marks=pytest.mark.slow),
    pytest.param('glm', 8, marks=pytest.mark.slow)])
def test_quantised_model_is_the_float_model_on_dequantised_weights(family,
                                                                   bits):
  cfg = ModelConfig(vocab_size=97, hidden=48, num_layers=2, num_heads=3,
                    mlp_dim=64, **FAMILIES[family])
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  qcfg, qparams = quantize.quantize_params(cfg, params, bits)
  assert qcfg.quant_bits == bits
  batch = {'tokens': jnp.asarray(
      np.random.RandomState(0).randint(0, 97, (2, 9)))}
  want = transformer.Transformer(cfg).apply(
      {'params': _dequantised(qparams, bits)}, batch)
  for impl in ('xla', 'pallas'):
    got = transformer.Transformer(qcfg.replace(quant_matmul_impl=impl)).apply(
        {'params': qparams}, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Other params are copied; the block kernels keep their logical axes.
  flat = traverse_util.flatten_dict(qparams)
  axes = traverse_util.flatten_dict(transformer.logical_axes(qcfg))
  q_axes = axes[('layers', 'attention', 'out')]
  assert tuple(q_axes) == ('layers', 'heads', 'kv', 'embed')
  assert tuple(axes[('layers', 'attention', 'out_scale')]) == ('layers',
                                                               'embed')
  np.testing.assert_array_equal(flat[('embed', 'embedding')],
                                params['embed']['embedding'])


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
@pytest.mark.parametrize('bits', [8, 4])
def test_kernel_equals_reference(backend, bits):
  """Odd M, N and K (padded to tiles), several K tiles, bf16 and f32."""
  rng = np.random.default_rng(1)
  m, k, n = 5, 160, 72
  w = rng.integers(-7, 8, (k, n)).astype(np.int8)
  q = quant.pack_int4(w, 0) if bits == 4 else w
  scale = jnp.asarray(rng.random(n) + 0.5, jnp.float32)
  blocks = qm.Blocks(16, 32, 32) if backend == 'gpu' else qm.Blocks(8, 128,
                                                                    32)
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    x64, w64, s64 = (np.asarray(a, np.float64) for a in (x, w, scale))
    want = (x64 @ w64) * s64
    # Any float32 accumulation order (kernel blocking, threads, FMA: what
    # differs between CPUs) stays within gamma_{K+1} * (|x| @ |w|) * scale
    # of the exact product, u = 2^-24 (bf16 x int products are exact in
    # float32); a wrong packing or scale is off by O(|x| @ |w|).
    u = 2.0 ** -24
    bound = (k + 1) * u / (1 - (k + 1) * u) * (np.abs(x64) @ np.abs(w64)) * s64
    ref = qm.quant_matmul_reference(x, jnp.asarray(q), scale, bits=bits,
                                    out_dtype=jnp.float32)
    got = qm.quant_matmul(x, jnp.asarray(q), scale, bits=bits,
                          out_dtype=jnp.float32, backend=backend,
                          blocks=blocks, interpret=True)
    for name, y in (('reference', ref), ('kernel', got)):
      err = np.abs(np.asarray(y, np.float64) - want)
      assert np.all(err <= bound), (name, dtype, float((err / bound).max()))


@pytest.mark.parametrize('backend,platform,call', [
    ('gpu', 'cuda', '__gpu$xla.gpu.triton'), ('tpu', 'tpu', 'tpu_custom_call')])
def test_kernel_exports_for_its_platform(backend, platform, call):
  for bits in (8, 4):
    x = jnp.zeros((4, 192), jnp.bfloat16)
    q = jnp.zeros((192 // (2 if bits == 4 else 1), 300), jnp.int8)
    fn = lambda x, q, s, b=bits: qm.quant_matmul(x, q, s, bits=b,
                                                 backend=backend)
    exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=qm.EXPORT_CHECKS)(
                                     x, q, jnp.ones((300,), jnp.float32))
    back = jax.export.deserialize(exported.serialize())
    assert back.platforms == (platform,)
    assert exported.mlir_module().count(call) == 1


def test_kernel_argument_errors():
  x = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match='bits=3'):
    qm.quant_matmul(x, jnp.zeros((8, 4), jnp.int8), jnp.ones(4), bits=3)
  with pytest.raises(ValueError, match='do not match'):
    qm.quant_matmul(x, jnp.zeros((8, 4), jnp.int8), jnp.ones(4), bits=4)


def test_int4_needs_even_dims():
  with pytest.raises(ConfigError, match='must be even, not hidden=45'):
    ModelConfig(hidden=45, num_heads=3, mlp_dim=64, quant_bits=4)
  with pytest.raises(ConfigError, match='quant_bits=3'):
    ModelConfig(quant_bits=3)


def _error_line(capsys, *args):
  capsys.readouterr()
  assert cli.main(list(args)) == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  return lines[0]


def test_glm_quantize_end_to_end(tmp_path, capsys):
  model = make_hf_bloom(300, 64, 4, 2, seed=3)
  model.save_pretrained(tmp_path / 'hf')
  ckpt = str(tmp_path / 'glm')
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(tmp_path / 'hf'),
                   '--out', ckpt]) == 0
  rng = np.random.RandomState(0)
  write_jsonl(tmp_path / 'in.jsonl',
              [{'tokens': rng.randint(3, 300, 12).tolist()} for _ in range(3)])
  scores = {}
  for bits in (0, 8, 4):
    path = ckpt if not bits else str(tmp_path / f'int{bits}')
    if bits:
      assert cli.main(['quantize', '--checkpoint', ckpt, '--bits', str(bits),
                       '--out', path]) == 0
      meta = checkpoint.read_manifest(path)['meta']
      q = meta['quantization']
      assert q['bits'] == bits and 'absmax' in q['scheme']
      assert q['kernel_bytes'] / q['kernel_bytes_bf16'] <= (
          0.5 if bits == 8 else 0.25) + 2 / 64 + 1e-9        # + scales
      assert meta['hf_config']['eos_token_id'] is not None   # carried over
      cfg, params = checkpoint.load(path)
      assert cfg.quant_bits == bits
      assert params['layers']['attention']['query'].dtype == np.int8
    out = tmp_path / f'score{bits}.jsonl'
    assert cli.main(['score', '--checkpoint', path, '--input',
                     str(tmp_path / 'in.jsonl'), '--output', str(out)]) == 0
    scores[bits] = np.array([r['logprobs'][1:] for r in read_jsonl(out)])
    assert cli.main(['generate', '--checkpoint', path, '--input',
                     str(tmp_path / 'in.jsonl'), '--output',
                     str(tmp_path / 'gen.jsonl'), '--max_new_tokens', '3']) == 0
    assert all(len(r['new_tokens']) <= 3
               for r in read_jsonl(tmp_path / 'gen.jsonl'))
  # Quantisation moves the log-probs a little, INT4 more than INT8.
  err8, err4 = (np.abs(scores[b] - scores[0]).mean() for b in (8, 4))
  assert 0 < err8 < err4 < 1.0, (err8, err4)
  for args, needle in (
      (['--bits', '3', '--out', str(tmp_path / 'x')], '--bits=3'),
      (['--bits', '8', '--out', str(tmp_path / 'int8')], 'exists'),
      (['--bits', '8', '--out', str(tmp_path / 'x'), '--matmul', 'cuda'],
       "quant_matmul_impl='cuda'"),
  ):
    line = _error_line(capsys, 'quantize', '--checkpoint', ckpt, *args)
    assert line.startswith('glm quantize: error:') and needle in line, line
  line = _error_line(capsys, 'quantize', '--checkpoint',
                     str(tmp_path / 'int8'), '--bits', '4', '--out',
                     str(tmp_path / 'x'))
  assert 'already INT8' in line
  assert not (tmp_path / 'x').exists()
