"""The main job as `make run` runs it: the default gin at full length.

Slow (about 4 minutes on 2 cores): CI runs it in its separate slow step.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_run_learns(tmp_path):
  workdir = tmp_path / 'default'
  out = subprocess.run(
      [sys.executable, '-m', 'glm', 'train', '--gin_file',
       os.path.join(ROOT, 'configs', 'runs', 'default.gin'), '--workdir',
       str(workdir)], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert rows[-1]['step'] == 300
  first, last = rows[0]['loss'], rows[-1]['loss']
  # ln(4096) = 8.3 at the start (a property of the init, on any machine).
  # The run must have learned something real: 2 nats below that, where it
  # gets to about 3.3 below (the rest is margin for another CPU's numerics
  # and another machine's man pages, which make the corpus).
  assert first > 8.0 and last < first - 2.0, (first, last)
  final = json.loads((workdir / 'final.json').read_text())
  assert final['eval_loss'] < first - 2.0, (first, final['eval_loss'])
  assert 'greedy sample:' in out.stdout
  assert 'sampled (temperature 0.8, top-p 0.95, seed 0):' in out.stdout
  assert isinstance(final['sampled'], str) and final['sampled']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['200', '300']
