"""`glm plan`: per-device memory from shapes and shardings (no allocation)."""

import json
import os
import subprocess
import sys

import gin
import pytest

from glm import gin_config
from glm.model.config import ModelConfig
from glm.model import info as model_info
from glm.parallel.mesh import MeshConfig, MeshError
from glm.parallel import plan as plan_lib


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(vocab_size=256, hidden=64, num_layers=2, num_heads=4,
                   mlp_dim=256, max_len=128)


def _gin_model(name: str) -> ModelConfig:
  gin_config.parse([os.path.join(ROOT, 'configs', 'models', f'{name}.gin')],
                   [])
  try:
    return ModelConfig()
  finally:
    gin.clear_config()


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'glm', 'plan', *args],
                        capture_output=True, text=True, cwd=ROOT)


def test_one_device_params_are_four_bytes_per_parameter():
  r = plan_lib.plan(TINY, MeshConfig(), device_memory='1GB')
  n = model_info.count_params(TINY)['params']
  assert r['params'] == n
  assert r['bytes']['params'] == r['bytes']['grads'] == 4 * n
  assert r['bytes']['optimizer'] == 8 * n  # Adam mu + nu, fp32
  assert r['bubble_fraction'] == 0.0 and r['micro_batch'] == 1


def test_tensor_parallelism_halves_the_sharded_weights():
  l, e, h, d, f = 2, 64, 4, 16, 256
  leaves = plan_lib.leaf_bytes(TINY, MeshConfig(tensor=2))
  assert leaves['layers/attention/query']['params'] == l * e * (h // 2) * d * 4
  assert leaves['layers/attention/out']['params'] == l * (h // 2) * d * e * 4
  assert leaves['layers/mlp/wi']['params'] == l * e * (f // 2) * 4
  assert leaves['embed/embedding']['params'] == (256 // 2) * e * 4
  # Norms and the biases added after a row-parallel matmul stay replicated.
  assert leaves['layers/input_norm/scale']['params'] == l * e * 4
  assert leaves['layers/mlp/wo_bias']['params'] == l * e * 4
  sharded = l * (4 * e * h * d + 3 * h * d + 2 * e * f + f) + 256 * e
  replicated = l * (2 * e + 4 * e) + 2 * e  # out/wo biases, 2 LNs; final LN
  r = plan_lib.plan(TINY, MeshConfig(tensor=2), device_memory='1GB')
  assert sharded + replicated == model_info.count_params(TINY)['params']
  assert r['bytes']['params'] == 4 * (sharded // 2 + replicated)


def test_zero1_splits_only_the_optimizer_state_over_data():
  plain = plan_lib.plan(TINY, MeshConfig(data=4), device_memory='1GB')
  zero1 = plan_lib.plan(TINY, MeshConfig(data=4, zero1=True),
                        device_memory='1GB')
  assert zero1['bytes']['params'] == plain['bytes']['params']
  assert zero1['bytes']['grads'] == plain['bytes']['grads']
  # Every leaf of TINY has a dimension divisible by 4: exactly a quarter.
  assert zero1['bytes']['optimizer'] * 4 == plain['bytes']['optimizer']
  assert plain['bytes']['optimizer'] == 2 * plain['bytes']['params']


def test_bloom_176b_on_the_bigscience_layout():
  cfg = _gin_model('bloom_176b')
  mc = MeshConfig.parse('tensor=4,pipeline=12,data=8', zero1=True)
  r = plan_lib.plan(cfg, mc, device_memory='80GB', seq_len=2048)
  h, f, v, t = 14336, 57344, 250880, 4
  assert r['params'] == 176_247_271_424
  # 70 layers over 12 stages: the heaviest stage holds ceil(70/12) = 6.
  assert r['layers_per_stage'] == 6 and len(r['warnings']) == 1
  # Per layer: q, k, v, out kernels, q/k/v biases, FFN in/out and FFN-in
  # bias are split by tensor; out/FFN-out biases and two LayerNorms are not.
  layer = (4 * h * h + 3 * h + 2 * h * f + f) / t + 6 * h
  # The embedding [250880, 14336] is split by tensor only: every stage of the
  # pipeline holds a quarter of it; so do the embedding and final LayerNorms.
  per_device = 4 * (6 * layer + v * h / t + 4 * h)
  assert r['bytes']['params'] == per_device
  # Against the naive 176.2e9 * 4 B / (4 x 12) = 14.69 GB: the layers take
  # 6/70 instead of 1/12 of the stack (x 72/70) and the embedding table is a
  # quarter per device, not a 48th (+3.60 - 0.30 GB) -> 18.40 GB.
  non_embedding = r['params'] - v * h
  estimate = (non_embedding * 4 / 48 * 72 / 70 + v * h * 4 / t)
  assert r['bytes']['params'] == pytest.approx(estimate, rel=2e-3)
  assert r['bytes']['params'] / 1e9 == pytest.approx(18.40, abs=0.01)
  assert r['bytes']['grads'] == r['bytes']['params']
  # ZeRO-1 over data=8 (the layer axis of 6 per stage takes no split).
  assert r['bytes']['optimizer'] == pytest.approx(
      2 * r['bytes']['params'] / 8, rel=1e-3)
  assert r['bubble_fraction'] == pytest.approx(11 / 23)


def test_activation_formula_is_korthikanti_for_bloom():
  cfg = _gin_model('bloom_176b')
  s, b, h, a, t = 2048, 2, 14336, 112, 4
  kw = dict(seq_len=s, rows=b, tensor=t)
  none = plan_lib.layer_activation_bytes(cfg, remat='none', dtype='bfloat16',
                                         **kw)
  assert none == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
  assert plan_lib.layer_activation_bytes(
      cfg, remat='none', dtype='float32', **kw) == pytest.approx(2 * none)
  assert plan_lib.layer_activation_bytes(
      cfg, remat='full', dtype='bfloat16', **kw) == 2 * s * b * h
  dots = plan_lib.layer_activation_bytes(cfg, remat='dots', dtype='bfloat16',
                                         **kw)
  assert 2 * s * b * h < dots < none


def test_pipeline_keeps_the_residuals_of_every_tick():
  s, h = TINY.max_len, TINY.hidden
  layer = plan_lib.layer_activation_bytes(TINY, seq_len=s, rows=1, tensor=1,
                                          remat='none', dtype='bfloat16')
  mc = MeshConfig(pipeline=2, data=2)  # M = 2 microbatches: 3 ticks
  base = plan_lib.plan(TINY, mc, device_memory='1GB', remat='none')
  assert base['micro_batch'] == 4 and base['rows_per_microbatch'] == 1
  assert base['ticks'] == 3 and base['layers_per_stage'] == 1
  assert base['activation_bytes']['layers'] == round(3 * 1 * layer)
  more = plan_lib.plan(TINY, MeshConfig(pipeline=2, data=2, microbatches=4),
                       device_memory='1GB', remat='none')
  assert more['ticks'] == 5
  assert more['activation_bytes']['layers'] == round(5 * layer)
  assert more['bubble_fraction'] < base['bubble_fraction']
  # remat full checkpoints a stage's whole chunk: its input per tick, and one
  # chunk rebuilt in the backward.
  full = plan_lib.plan(TINY, mc, device_memory='1GB', remat='full')
  assert full['activation_bytes']['layers'] == 3 * (2 * s * h)
  assert full['activation_bytes']['recompute'] == round(layer)
  # Without a pipeline, nn.remat per block: every layer input is kept.
  flat = plan_lib.plan(TINY, MeshConfig(), device_memory='1GB', remat='full')
  assert flat['activation_bytes']['layers'] == 2 * (2 * s * h)


def test_bad_inputs_raise_one_line_errors():
  with pytest.raises(MeshError, match='tensor=3'):
    plan_lib.plan(TINY, MeshConfig(tensor=3), device_memory='1GB')
  with pytest.raises(MeshError, match='not divisible'):
    plan_lib.plan(TINY, MeshConfig(data=2), device_memory='1GB',
                  micro_batch=3)
  with pytest.raises(ValueError, match='seq_len'):
    plan_lib.plan(TINY, MeshConfig(), device_memory='1GB', seq_len=4096)
  with pytest.raises(ValueError, match='remat'):
    plan_lib.plan(TINY, MeshConfig(), device_memory='1GB', remat='some')


@pytest.mark.parametrize('text,expected', [
    ('80GB', 80e9), ('80G', 80e9), ('80e9', 80e9), ('80 gb', 80e9),
    ('96GiB', 96 * 2 ** 30), ('1.5TB', 1.5e12), (2e9, 2e9)])
def test_parse_bytes(text, expected):
  assert plan_lib.parse_bytes(text) == expected


@pytest.mark.parametrize('text', ['80XB', 'lots', '-5GB', '0GB', '80'])
def test_parse_bytes_rejects(text):
  with pytest.raises(ValueError, match='--device_memory'):
    plan_lib.parse_bytes(text)


def test_cli_table_json_and_errors():
  tiny = os.path.join(ROOT, 'configs', 'models', 'tiny_bloom.gin')
  ok = _cli('--gin_file', tiny, '--mesh', 'tensor=2,data=2', '--zero1',
            '--device_memory', '16GB')
  assert ok.returncode == 0, ok.stderr
  assert 'fits: ' in ok.stdout and 'parameters (fp32)' in ok.stdout
  small = _cli('--gin_file', tiny, '--device_memory', '1MB', '--json')
  assert small.returncode == 0, small.stderr
  r = json.loads(small.stdout)
  assert r['fits'] is False and r['device_memory'] == 10 ** 6
  assert 'does not fit' in _cli('--gin_file', tiny,
                                '--device_memory', '1MB').stdout

  bloom = os.path.join(ROOT, 'configs', 'models', 'bloom_176b.gin')
  for args, needle in (
      (('--mesh', 'tensor=5,pipeline=12,data=8', '--device_memory', '80GB'),
       'tensor=5'),
      (('--mesh', 'tensor=4', '--device_memory', '80XB'), "'80XB'")):
    bad = _cli('--gin_file', bloom, *args)
    assert bad.returncode == 2
    assert bad.stdout == ''
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('glm plan: error:')
    assert needle in lines[0]


def test_lower_the_sharded_step_on_the_full_mesh():
  """--lower_layers lowers the real train step (shard_map pipeline, TP,
  ZeRO-1) on faked devices of the production mesh shape, scaled down."""
  out = _cli('--gin_file', os.path.join(ROOT, 'configs', 'models',
                                             'bloom_176b.gin'),
                  '--mesh', 'tensor=4,pipeline=12,data=8', '--zero1',
                  '--device_memory', '80GB', '--seq_len', '256',
                  '--lower_layers', '12', '--json')
  assert out.returncode == 0, out.stderr[-2000:]
  low = json.loads(out.stdout)['lowered']
  assert low['devices'] == 384 and low['layers'] == 12
  assert low['collective_permutes'] >= 1  # the stage-to-stage ppermute
  bad = _cli('--gin_file', os.path.join(ROOT, 'configs', 'models',
                                             'bloom_176b.gin'),
                  '--mesh', 'tensor=4,pipeline=12,data=8',
                  '--device_memory', '80GB', '--lower_layers', '13')
  assert bad.returncode == 2
  assert 'num_layers=13 does not split' in bad.stderr.strip().splitlines()[-1]


def test_16bit_weights_fit_glm_130b_on_its_paper_layout():
  """GLM-130B's layout (TP 4 x PP 8 x DP 24, ZeRO-1, 40 GB A100s) does not
  fit with fp32 weights and gradients; with bf16 weights and gradients and
  fp32 masters in the ZeRO-1 optimiser shards it does."""
  cfg = _gin_model('glm_130b')
  mc = MeshConfig.parse('tensor=4,pipeline=8,data=24', zero1=True)
  kw = dict(device_memory='40GB', micro_batch=192, seq_len=2048,
            remat='full')
  fp32 = plan_lib.plan(cfg, mc, **kw)
  bf16 = plan_lib.plan(cfg.replace(param_dtype='bfloat16'), mc, **kw)
  assert not fp32['fits'] and bf16['fits']
  assert bf16['bytes']['params'] * 2 == fp32['bytes']['params']
  assert bf16['bytes']['grads'] == bf16['bytes']['params']
  # master + mu + nu (fp32) against mu + nu: 3/2 of the optimiser state.
  assert bf16['bytes']['optimizer'] == pytest.approx(
      1.5 * fp32['bytes']['optimizer'], rel=1e-6)
  assert bf16['bytes']['activations'] == fp32['bytes']['activations']
  out = _cli('--gin_file', os.path.join(ROOT, 'configs', 'models',
                                        'glm_130b.gin'),
             '--mesh', 'tensor=4,pipeline=8,data=24', '--zero1',
             '--device_memory', '40GB', '--micro_batch', '192',
             '--seq_len', '2048', '--remat', 'full',
             '--param_dtype', 'bfloat16')
  assert out.returncode == 0, out.stderr
  assert 'parameters (bf16)' in out.stdout and 'fits:' in out.stdout
