"""Data, ZeRO-1, FSDP, tensor and pipeline parallelism equal one device.

The layouts run in tests/parallel_worker.py on 8 faked CPU devices (a
subprocess: the device count is fixed when JAX starts); these tests compare
what it wrote against the single-device run of the same steps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import filelock
import numpy as np
import pytest

from glm.model.config import ModelConfig
from glm.parallel import mesh as mesh_lib


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import parallel_worker  # pylint: disable=g-import-not-at-top,wrong-import-position
from tolerances import assert_same_training  # pylint: disable=g-import-not-at-top,wrong-import-position

# The 8-device runs take minutes on 2 busy cores: the tests that read them
# are `slow` (CI's second step, `make test-slow`).


def _worker(tmp_path_factory, worker_id, part):
  """The 8-device run of `part`, once per session: under pytest-xdist the
  first worker to take the lock runs it and the others read its output (the
  run is slow, and slower still beside a second copy of itself)."""
  base = tmp_path_factory.getbasetemp()
  if worker_id != 'master':
    base = base.parent  # shared by the workers of this session
  out = base / f'parallel_{part}'
  with filelock.FileLock(f'{out}.lock'):
    if not (out / 'done').exists():
      out.mkdir(exist_ok=True)
      env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu')
      proc = subprocess.run(
          [sys.executable, os.path.join(ROOT, 'tests', 'parallel_worker.py'),
           str(out), part], env=env, cwd=ROOT, capture_output=True,
          text=True, timeout=1800)
      assert proc.returncode == 0, proc.stderr[-4000:]
      (out / 'done').write_text('')
  return str(out)


@pytest.fixture(scope='session')
def parallel_runs(tmp_path_factory, worker_id):
  return _worker(tmp_path_factory, worker_id, 'default')


@pytest.fixture(scope='session')
def parallel_runs_rest(tmp_path_factory, worker_id):
  return _worker(tmp_path_factory, worker_id, 'rest')


def _load(runs, family, layout):
  return np.load(os.path.join(runs, family, layout + '.npz'))


def _grid(part):
  return [(f, l) for f, ls in parallel_worker.pairs(part).items()
          for l in ls]


@pytest.mark.slow
@pytest.mark.parametrize('family,layout', _grid('default'))
def test_layout_equals_one_device(parallel_runs, family, layout):
  _check_layout(parallel_runs, family, layout)


@pytest.mark.slow
@pytest.mark.parametrize('family,layout', _grid('rest'))
def test_other_layouts_equal_one_device(parallel_runs_rest, family, layout):
  _check_layout(parallel_runs_rest, family, layout)


def _check_layout(runs, family, layout):
  assert_same_training(_load(runs, family, layout),
                       _load(runs, family, 'single'),
                       steps=parallel_worker.STEPS)


@pytest.mark.slow
def test_sharding_really_splits_state(parallel_runs):
  """FSDP splits parameters and optimiser state; ZeRO-1 only the latter."""
  shape = lambda layout, what: tuple(
      _load(parallel_runs, 'bloom', layout)['shard_shape_' + what])
  full = shape('data', 'param')
  assert shape('data', 'mu') == full
  assert shape('zero1', 'param') == full
  assert np.prod(shape('zero1', 'mu')) * 8 == np.prod(full)
  assert np.prod(shape('fsdp', 'param')) * 8 == np.prod(full)
  assert np.prod(shape('fsdp', 'mu')) * 8 == np.prod(full)
  assert np.prod(shape('tensor', 'param')) * 8 == np.prod(full)


@pytest.mark.slow
def test_checkpoint_restores_on_other_meshes(parallel_runs):
  r = np.load(os.path.join(parallel_runs, 'restore.npz'))
  saved = [k for k in r.files if k.startswith('saved')]
  assert len(saved) > 20
  for name, devices in (('fsdp4_tensor2', 8), ('single', 1)):
    assert int(r['devices_' + name]) == devices
    for k in saved:
      np.testing.assert_array_equal(r[name + k[len('saved'):]], r[k],
                                    err_msg=f'{name} {k}')


@pytest.mark.slow
def test_vocab_parallel_never_gathers_the_vocab(parallel_runs):
  """No array in the compiled tensor=8 step has the full vocabulary as a
  dimension (per-device shapes after partitioning); the one-device step
  does, which shows the check can see it."""
  with open(os.path.join(parallel_runs, 'hlo.json')) as f:
    h = json.load(f)
  full = re.compile(r'\[(?:\d+,)*%d(?:,\d+)*\]' % h['padded_vocab'])
  assert full.search(h['single_hlo'])
  assert not full.search(h['hlo']), full.search(h['hlo'])
  shard = re.compile(r'\[(?:\d+,)*%d(?:,\d+)*\]' % (h['padded_vocab'] // 8))
  assert shard.search(h['hlo'])


# Validation: one line naming the numbers, before any compute. ----------------

CFG = ModelConfig(vocab_size=384, hidden=32, num_layers=4, num_heads=8,
                  mlp_dim=64)


@pytest.mark.parametrize('text,kw,micro,devices,needle', [
    ('data=2,tensor=2', {}, 8, 8, 'uses 4 devices but there are 8'),
    ('tensor=3', {}, 8, 3, 'num_heads=8 is not divisible by tensor=3'),
    ('fsdp=3', {}, 9, 3, 'hidden=32 is not divisible by fsdp=3'),
    ('pipeline=3', {}, 9, 3, 'num_layers=4 does not split into pipeline=3'),
    ('pipeline=2', {'schedule': 'circular', 'repeats': 4}, 8, 2,
     'pipeline=2 x repeats=4 = 8'),
    ('data=4', {}, 6, 4, 'micro-batch 6 is not divisible by data x fsdp = 4'),
    ('pipeline=2,data=2', {'microbatches': 4}, 4, 4,
     'pipeline microbatch of 1 rows is not divisible by data x fsdp = 2'),
    ('pipeline=2', {'microbatches': 3}, 8, 2, 'not divisible by 3 pipeline'),
    ('pipeline=2', {'schedule': 'interleaved'}, 8, 2, "'interleaved'"),
])
def test_bad_meshes_are_one_line_errors(text, kw, micro, devices, needle):
  mc = mesh_lib.MeshConfig.parse(text, **kw)
  with pytest.raises(mesh_lib.MeshError) as e:
    mesh_lib.validate(mc, CFG, micro_batch=micro, num_devices=devices)
  assert needle in str(e.value) and '\n' not in str(e.value)


def test_vocab_not_divisible_names_the_fix():
  cfg = ModelConfig(vocab_size=384, vocab_pad_multiple=128, hidden=40,
                    num_heads=5, mlp_dim=80)
  with pytest.raises(mesh_lib.MeshError, match='vocab_pad_multiple'):
    mesh_lib.validate(mesh_lib.MeshConfig.parse('tensor=5'), cfg,
                      micro_batch=5)


@pytest.mark.parametrize('text', ['data=two', 'model=2', 'data=0'])
def test_bad_mesh_text(text):
  with pytest.raises(mesh_lib.MeshError, match='--mesh'):
    mesh_lib.MeshConfig.parse(text)


def test_parse_and_bubble():
  mc = mesh_lib.MeshConfig.parse('tensor=4, pipeline=12,data=8')
  assert (mc.data, mc.fsdp, mc.tensor, mc.pipeline) == (8, 1, 4, 12)
  assert mc.num_devices == 384
  # GPipe with M = S microbatches idles (S - 1) / (2S - 1) of the time.
  assert mc.bubble_fraction() == pytest.approx(11 / 23)
  circ = mesh_lib.MeshConfig.parse('pipeline=4', schedule='circular',
                                   repeats=2, microbatches=8)
  assert circ.bubble_fraction() == pytest.approx(3 / 19)
  assert mesh_lib.MeshConfig().bubble_fraction() == 0.0


def test_zero1_spec_picks_a_divisible_dimension():
  from jax.sharding import PartitionSpec as P
  shape = {'pipeline': 1, 'data': 4, 'fsdp': 2, 'tensor': 2}
  assert mesh_lib.zero1_spec(P('fsdp', 'tensor'), (16, 6), shape) == P(
      ('fsdp', 'data'), 'tensor')
  assert mesh_lib.zero1_spec(P(None), (3,), shape) == P(None)
  assert mesh_lib.zero1_spec(P(), (), shape) == P()
