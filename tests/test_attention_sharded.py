"""'pallas' (interpret, inside shard_map) and 'blockwise' attention in
sharded train steps equal the one-device 'xla' steps; the sharded 'pallas'
step exports for cuda and tpu.

The steps run in tests/attention_worker.py on 8 faked CPU devices (a
subprocess: the device count is fixed when JAX starts). The default suite
runs GLM (2D RoPE, prefixes, packed rows) with both on the data x tensor x
pipeline layout and exports its step; the `slow` marker adds BLOOM (ALiBi),
UL2, FSDP and every family's export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import attention_worker  # pylint: disable=g-import-not-at-top,wrong-import-position
import parallel_worker  # pylint: disable=g-import-not-at-top,wrong-import-position
from tolerances import assert_same_training  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run_worker(out, wide):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'attention_worker.py'),
       str(out)] + (['--wide'] if wide else []), env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return str(out)


def _compare(runs, family, name):
  assert_same_training(
      np.load(os.path.join(runs, family, name + '.npz')),
      np.load(os.path.join(runs, family, 'xla_single.npz')),
      steps=attention_worker.STEPS)


def _check_exports(exports, families):
  assert sorted(exports) == sorted(families)
  for family in families:
    cuda, tpu = exports[family]['cuda'], exports[family]['tpu']
    assert cuda['platforms'] == ['cuda'] and tpu['platforms'] == ['tpu']
    assert cuda['devices'] == tpu['devices'] == 8
    # forward, dq and dk/dv kernels of each platform, and none of the other
    assert cuda['triton_calls'] >= 3 and cuda['mosaic_calls'] == 0
    assert tpu['mosaic_calls'] >= 3 and tpu['triton_calls'] == 0


@pytest.mark.slow
def test_wide_layouts_and_exports(tmp_path):
  """Every family and implementation on the data x tensor x pipeline and
  FSDP layouts equals the one-device 'xla' steps; the sharded 'pallas' step
  of every family exports for cuda and tpu. (The worker's default mode, the
  GLM family on the combined layout, is a quicker manual check.)"""
  runs = _run_worker(tmp_path, wide=True)
  for family in parallel_worker.FAMILIES:
    for impl in attention_worker.IMPLS:
      for layout in attention_worker.WIDE_LAYOUTS:
        _compare(runs, family, f'{impl}_{layout}')
  with open(os.path.join(runs, 'export.json')) as f:
    _check_exports(json.load(f), list(parallel_worker.FAMILIES))


@pytest.mark.slow
def test_training_with_each_implementation_gives_the_xla_losses(tmp_path,
                                                                data_dir):
  """`glm train` on the tiny model for a few steps (fp32): 'pallas'
  (interpret) and 'blockwise' log the losses of 'xla'."""
  from train_cli import train  # pylint: disable=g-import-not-at-top
  losses = {}
  for impl in ('xla', 'pallas', 'blockwise'):
    w = tmp_path / impl
    out = train(w, data_dir, '--gin.TRAIN_STEPS=6',
                "--gin.ModelConfig.dtype='float32'",
                f"--gin.ModelConfig.attention_impl='{impl}'")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'; attention {impl}' in out.stdout
    rows = [json.loads(l) for l in open(w / 'metrics.jsonl')]
    losses[impl] = np.array([r['loss'] for r in rows])
  assert len(losses['xla']) == 6 and np.ptp(losses['xla']) > 1e-3
  for impl in ('pallas', 'blockwise'):
    np.testing.assert_allclose(losses[impl], losses['xla'], rtol=1e-4,
                               err_msg=impl)
