"""`glm train --mesh`, several processes through `glm launch-local`, and a
launch that loses a process."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_trainer import losses_by_step
from train_cli import ROOT, RUNS, TINY  # tests/train_cli.py

STEPS = ['--gin.TRAIN_STEPS=4', '--gin.CHECKPOINT_EVERY=2']


def train_args(workdir, data_dir, *extra):
  return ['--gin_file', os.path.join(RUNS, 'default.gin'),
          '--workdir', str(workdir), f"--gin.train.data_dir='{data_dir}'",
          *TINY, *STEPS, *extra]


def run(argv, devices=1, **kw):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'glm', *argv], env=env,
                        capture_output=True, text=True, cwd=ROOT,
                        timeout=900, **kw)


@pytest.mark.slow  # two 2-process runs and one single run: ~2 min
def test_two_processes_equal_one(tmp_path, data_dir):
  one = run(['train', *train_args(tmp_path / 'one', data_dir)])
  assert one.returncode == 0, one.stderr[-3000:]
  two = run(['launch-local', '--num_processes', '2', '--',
             *train_args(tmp_path / 'two', data_dir)])
  assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-3000:]
  assert 'over 2 devices in 2 process(es)' in two.stdout
  # Each process builds only its half of every micro-batch (BATCH_SIZE 4).
  for i, rows in ((0, '0..1'), (1, '2..3')):
    log = (tmp_path / 'two' / 'logs' / f'process_{i}.log').read_text()
    assert f'process {i} builds rows {rows} (2 of 4)' in log
  a, b = losses_by_step(tmp_path / 'one'), losses_by_step(tmp_path / 'two')
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in sorted(b)],
                             [a[s] for s in sorted(a)], rtol=1e-5)
  # The collective checkpoint restores: a longer run resumes from step 4.
  more = run(['launch-local', '--num_processes', '2', '--',
              *train_args(tmp_path / 'two', data_dir),
              '--gin.TRAIN_STEPS=5', '--accept_new_settings'])
  assert more.returncode == 0, more.stdout[-3000:]
  assert 'resumed from step 4' in more.stdout


@pytest.mark.slow
def test_mesh_flag_equals_one_device(tmp_path, data_dir):
  one = run(['train', *train_args(tmp_path / 'one', data_dir)])
  assert one.returncode == 0, one.stderr[-3000:]
  meshed = run(['train', *train_args(tmp_path / 'mesh', data_dir),
                '--mesh', 'data=2,tensor=2,pipeline=2',
                '--gin.MeshConfig.microbatches=2'], devices=8)
  assert meshed.returncode == 0, meshed.stderr[-3000:]
  assert 'mesh pipeline=2,data=2,tensor=2 over 8 devices' in meshed.stdout
  assert 'bubble 33.3%' in meshed.stdout
  assert "MeshConfig.tensor = 2" in (tmp_path / 'mesh' / 'config.gin'
                                     ).read_text()
  a, b = losses_by_step(tmp_path / 'one'), losses_by_step(tmp_path / 'mesh')
  np.testing.assert_allclose([b[s] for s in sorted(b)],
                             [a[s] for s in sorted(a)], rtol=1e-5)


def test_bad_mesh_fails_before_compute(tmp_path, data_dir):
  out = run(['train', *train_args(tmp_path / 'w', data_dir),
             '--mesh', 'data=3'])
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      'glm train: error: mesh data=3 uses 3 devices but there are 1; make '
      'the product of the axis sizes 1.')
  assert not (tmp_path / 'w' / 'checkpoints').exists()
  out = run(['train', *train_args(tmp_path / 'w', data_dir),
             '--mesh', 'model=2'])
  assert out.returncode == 2 and 'unknown axis' in out.stderr


def pgrep(pattern):
  return subprocess.run(['pgrep', '-f', '--', pattern], capture_output=True,
                        text=True).stdout.split()


def test_launch_local_stops_everything_when_a_process_dies(tmp_path,
                                                           data_dir):
  work = tmp_path / 'w'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  argv = [sys.executable, '-m', 'glm', 'launch-local', '--num_processes', '2',
          '--', *train_args(work, data_dir), '--gin.TRAIN_STEPS=100000',
          '--gin.CHECKPOINT_EVERY=100000']
  proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  log = work / 'logs' / 'process_1.log'
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until process 1 trains
    if log.is_file() and 'step ' in log.read_text():
      break
    time.sleep(0.5)
  else:
    proc.kill()
    raise AssertionError('process 1 never started training')
  pids = pgrep(f'--workdir {work} .*--process_id')
  victim = [p for p in pids if f'--process_id 1' in open(
      f'/proc/{p}/cmdline').read().replace('\0', ' ')]
  if len(pids) != 2 or len(victim) != 1:
    for p in pids:
      os.kill(int(p), signal.SIGKILL)
    proc.kill()
    raise AssertionError(f'expected 2 train processes, found {pids}')
  os.kill(int(victim[0]), signal.SIGKILL)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert ('glm launch-local: error: process 1 of 2 exited with status -9; '
          'stopped the others.') in err
  left = pgrep(f'--workdir {work} ')
  for p in left:
    os.kill(int(p), signal.SIGKILL)
  assert not left
