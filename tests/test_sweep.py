"""`glm sweep` and `glm plot`: axis parsing and variant names, the results
table and fits on hand-made workdirs, and one real sweep (two axes, two
seeds) that a rerun skips."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from glm.experiments import plot
from glm.experiments import results
from glm.experiments import scaling
from glm.experiments import sweep
from train_cli import ROOT, RUNS, TINY  # tests/train_cli.py

PNG = b'\x89PNG\r\n\x1a\n'


def test_axis_values_split_like_gin_literals():
  assert sweep.split_values("'a','b,c',[1, 2],3") == [
      "'a'", "'b,c'", '[1, 2]', '3']
  assert sweep.parse_axis("ModelConfig.position='alibi','rope'") == (
      'ModelConfig.position', ["'alibi'", "'rope'"])
  for bad in ("x='a", 'x=1,,2', 'x=[1,2'):
    with pytest.raises(sweep.SweepError, match='--axis'):
      sweep.parse_axis(bad)
  with pytest.raises(sweep.SweepError, match='NAME=V1,V2'):
    sweep.parse_axis('train.seed')
  assert [sweep.gin_literal(v) for v in ('alibi', '@foo', 3, 1e-3, True)] == [
      "'alibi'", '@foo', '3', '0.001', 'True']


def test_grid_times_zip_and_readable_names():
  vs = sweep.variants({'ModelConfig.position': ["'alibi'", "'rope'"],
                       'train.seed': ['0', '1']},
                      {'ModelConfig.hidden': ['32', '64'],
                       'ModelConfig.num_layers': ['2', '4']})
  assert len(vs) == 2 * 2 * 2  # the zip is one axis of two
  assert vs[0].name == 'position=alibi_seed=0_hidden=32_num_layers=2'
  assert vs[-1].bindings == ["ModelConfig.position='rope'", 'train.seed=1',
                             'ModelConfig.hidden=64',
                             'ModelConfig.num_layers=4']
  # The same short name on two axes: the full names tell them apart.
  vs = sweep.variants({'a.x': ['1'], 'b.x': ['2']}, {})
  assert vs[0].name == 'a.x=1_b.x=2'
  with pytest.raises(sweep.SweepError, match='different lengths'):
    sweep.variants({}, {'a': ['1'], 'b': ['1', '2']})
  with pytest.raises(sweep.SweepError, match='no axis'):
    sweep.variants({}, {})


def test_sweep_file_is_checked(tmp_path):
  f = tmp_path / 's.yaml'
  f.write_text('grid: {train.seed: 3}\n')
  with pytest.raises(sweep.SweepError, match='non-empty list'):
    sweep.load_spec(str(f))
  f.write_text('axes: {}\n')
  with pytest.raises(sweep.SweepError, match='unknown keys'):
    sweep.load_spec(str(f))
  with pytest.raises(sweep.SweepError, match='configs/ablations'):
    sweep.load_spec(str(tmp_path / 'none.yaml'))


def test_power_law_fit_recovers_the_exponent():
  c = np.geomspace(1e12, 1e16, 7)
  a, b = plot.fit_power_law(c, 3.0 * c ** -0.05)
  assert abs(b + 0.05) < 1e-9 and abs(a - 3.0) < 1e-6


def test_loss_spikes_count_jumps_over_the_running_minimum():
  assert results.loss_spikes([8.0, 6.0, 5.0, 5.5, 6.5, 4.0, float('nan'),
                              4.9, 4.7]) == 3  # 6.5, nan, 4.9 (> 1.2 * 4)
  assert results.loss_spikes([5.0, 4.0, 3.0]) == 0


def test_isoflop_fit_recovers_optimum_and_exponents_and_flags_edges(tmp_path):
  rows = []
  for c in (1e11, 1e12, 1e13):
    n_opt = 0.3 * c ** 0.5
    for n in n_opt * np.array([0.2, 0.5, 1.5, 4.0]):
      rows.append({'flops': c * 1.02, 'params': n, 'tokens': c / (6 * n),
                   'eval_loss': 2 + 0.5 * np.log10(n / n_opt) ** 2})
  # A budget whose sizes are all past its optimum: an edge, left out.
  for n in (1e6, 2e6, 4e6):
    rows.append({'flops': 3e9, 'params': n, 'tokens': 3e9 / (6 * n),
                 'eval_loss': 5 + np.log10(n)})
  fitted = scaling.fit(rows, [3e9, 1e11, 1e12, 1e13])
  assert [e['edge'] for e in fitted['budgets']] == [True, False, False, False]
  assert fitted['fitted_on'] == 3
  assert fitted['n_fit'][1] == pytest.approx(0.5, abs=1e-6)
  assert fitted['d_fit'][1] == pytest.approx(0.5, abs=0.02)
  assert fitted['budgets'][1]['n_opt'] == pytest.approx(0.3 * 1e11 ** 0.5,
                                                        rel=1e-6)
  md = scaling.markdown(fitted)
  assert 'N_opt ~ C^0.500 (fitted on 3 budgets)' in md
  png = plot.plot_isoflop(fitted, str(tmp_path / 'iso.png'))
  assert open(png, 'rb').read(8) == PNG


def test_isoflop_block_turns_budgets_into_steps_of_equal_flops(tmp_path,
                                                              monkeypatch):
  spec = tmp_path / 'iso.yaml'
  spec.write_text(
      'gin_file: configs/runs/default.gin\n'
      'bindings: {BATCH_SIZE: 4, SEQ_LEN: 32}\n'
      'isoflop: {budgets: [1.0e+11, 4.0e+11], sizes: [[16, 1, 2], '
      '[32, 2, 2], [64, 2, 4]], tokens_per_param: [0.5, 100]}\n')
  monkeypatch.chdir(ROOT)
  s = sweep.build([], [], str(spec), [], str(tmp_path / 'w'))
  assert s.isoflop_budgets == [1e11, 4e11] and s.scaling
  from glm.model import info
  from glm.model.config import ModelConfig
  # Which (budget, size) pairs belong, computed here from the definition.
  want = set()
  for c in (1e11, 4e11):
    for h, l, a in ((16, 1, 2), (32, 2, 2), (64, 2, 4)):
      cfg = ModelConfig(hidden=h, num_layers=l, num_heads=a, mlp_dim=4 * h,
                        vocab_size=4096, max_len=512)  # tiny_bloom's vocab
      stats = info.info(cfg, 32)
      steps = round(c / (float(stats['flops_per_token']) * 4 * 32))
      if 0.5 <= steps * 4 * 32 / stats['params'] <= 100:
        want.add((h, l, a, 4 * h, steps))
        # Steps of equal FLOPs: within rounding of the budget.
        assert float(stats['flops_per_token']) * steps * 128 == (
            pytest.approx(c, rel=0.05))
  got = {tuple(int(x) for x in dict(v.axes).values()) for v in s.variants}
  # This plain config lacks tiny_bloom's embedding LayerNorm: a few
  # parameters fewer, so steps may differ in the last digit.
  assert len(got) == len(want) >= 3
  for g in got:
    (w,) = [w for w in want if w[:4] == g[:4] and abs(w[4] / g[4] - 1) < .01]


def _fake_run(d, losses, eval_loss, seq_len=32):
  os.makedirs(d)
  with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
    for i, l in enumerate(losses, 1):
      f.write(json.dumps({'step': i, 'loss': l, 'tokens_per_s': 100.0 * i})
              + '\n')
  with open(os.path.join(d, 'eval.jsonl'), 'w') as f:
    f.write(json.dumps({'step': 1, 'all': eval_loss + 1, 'lang/en': 9.0}) +
            '\n')
    f.write(json.dumps({'step': len(losses), 'all': eval_loss,
                        'lang/en': eval_loss + 0.5, 'acc/all': 0.25,
                        'len_2x': eval_loss + 0.1}) + '\n')
  with open(os.path.join(d, 'final.json'), 'w') as f:
    json.dump({'step': len(losses), 'train_loss': losses[-1],
               'eval_loss': eval_loss, 'elapsed_s': 7.0}, f)


def test_results_mean_std_over_seeds_and_plots(tmp_path):
  d = str(tmp_path)
  meta = {'variants': []}
  for pos, base in (("'alibi'", 3.0), ("'rope'", 4.0)):
    for seed, jitter in (('0', 0.0), ('1', 0.2)):
      name = f'position={pos.strip(chr(39))}_seed={seed}'
      _fake_run(os.path.join(d, name), [6.0, 5.0, base + jitter],
                base + jitter)
      meta['variants'].append({'name': name, 'axes': {
          'ModelConfig.position': pos, 'train.seed': seed}})
  with open(os.path.join(d, 'sweep.json'), 'w') as f:
    json.dump(meta, f)
  rows = results.sweep_rows(d)
  assert [r['status'] for r in rows] == ['done'] * 4
  assert rows[0]['best_eval_loss'] == 3.0 and rows[0]['lang/en'] == 3.5
  assert rows[0]['tokens_per_s'] == 250.0  # median without the first step
  groups = results.group_by_seed(rows)
  assert [g['n'] for g in groups] == [2, 2]
  mean, std = groups[1]['eval_loss']
  assert mean == pytest.approx(4.1) and std == pytest.approx(
      np.std([4.0, 4.2], ddof=1))
  results.write(d, rows, ['ModelConfig.position', 'train.seed'])
  md = open(os.path.join(d, 'results.md')).read()
  assert "| 'rope' | 2 | 4.1 ± 0.1414 |" in md
  assert '## Final held-out loss per language' in md
  assert len(open(os.path.join(d, 'results.jsonl')).readlines()) == 4
  umask = os.umask(0)
  os.umask(umask)  # written whole, yet with open()'s permissions, not 0600
  assert os.stat(os.path.join(d, 'results.md')).st_mode & 0o777 == (
      0o666 & ~umask)
  paths = plot.sweep_plots(d, rows, ['ModelConfig.position', 'train.seed'])
  assert rows[0]['acc/all'] == 0.25 and rows[0]['len_2x'] == 3.1
  assert rows[0]['loss_spikes'] == 0
  assert [os.path.basename(p) for p in paths] == [
      'curves.png', 'axis_position.png', 'lengths.png']
  for p in paths:
    assert open(p, 'rb').read(8) == PNG


def test_glm_plot_compares_workdirs(tmp_path):
  for name in ('a', 'b'):
    _fake_run(str(tmp_path / name), [5.0, 4.0], 4.5)
  out = tmp_path / 'fig.png'
  proc = subprocess.run(
      [sys.executable, '-m', 'glm', 'plot', str(tmp_path / 'a'),
       str(tmp_path / 'b'), '--out', str(out)], capture_output=True,
      text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes()[:8] == PNG
  proc = subprocess.run(
      [sys.executable, '-m', 'glm', 'plot', str(tmp_path), '--out',
       str(out)], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2
  assert proc.stderr.strip().endswith(
      'has no metrics.jsonl; pass glm train workdirs.')


def test_a_failed_variant_is_recorded_and_the_sweep_says_so(tmp_path):
  work = tmp_path / 'bad'
  proc = subprocess.run(
      [sys.executable, '-m', 'glm', 'sweep', '--gin_file',
       os.path.join(RUNS, 'default.gin'), '--axis',
       "ModelConfig.position='nonsense'", '--workdir', str(work)],
      capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'failed position=nonsense' in proc.stdout
  row = json.loads((work / 'results.jsonl').read_text())
  assert row['status'] == 'failed'
  assert "ModelConfig.position='nonsense' is not one of" in row['error']
  assert '| position=nonsense | failed |' in (work / 'results.md').read_text()
  proc = subprocess.run(
      [sys.executable, '-m', 'glm', 'sweep', '--gin_file',
       os.path.join(RUNS, 'default.gin'), '--workdir', str(work)],
      capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2
  assert proc.stderr.strip().endswith(
      'nothing to sweep; give --sweep FILE or one or more --axis NAME=V1,V2.')


def test_parallel_variants_wait_for_the_first_one_to_log_a_step(
    tmp_path, monkeypatch):
  # Stand-in variants that order themselves through files, not sleeps: each
  # records when it started; v1 logs its first step only once v2 has
  # started (so two run at once, or v1 gives up after 60 s and the asserts
  # fail instead of a hang); v0 logs after 0.5 s, time enough for a sweep
  # without the gate to start v1 early (a correct sweep passes however
  # slow the machine).
  script = (
      'import json, os, sys, time\n'
      'w, name = sys.argv[1], sys.argv[2]\n'
      'd = os.path.join(w, name); os.makedirs(d, exist_ok=True)\n'
      'open(os.path.join(d, "start"), "w").write(repr(time.time()))\n'
      'seen = lambda n: os.path.exists(os.path.join(w, n, "start"))\n'
      'deadline = time.time() + 60\n'
      'if name == "v0":\n'
      '  time.sleep(0.5)  # a sweep without the gate starts v1 meanwhile\n'
      'while name == "v1" and not seen("v2") and time.time() < deadline:\n'
      '  time.sleep(0.02)\n'
      'open(os.path.join(d, "metrics.jsonl"), "w").write(\n'
      '    json.dumps({"step": 1, "t": time.time()}) + "\\n")\n')
  s = sweep.Sweep(workdir=str(tmp_path), gin_files=[], bindings=[],
                  variants=[sweep.Variant(f'v{i}', (('train.seed', str(i)),))
                            for i in range(3)], axes=['train.seed'])
  monkeypatch.setattr(sweep.Sweep, 'argv', lambda self, v: [
      sys.executable, '-c', script, self.workdir, v.name])
  # Two slots on any machine (the sweep gives each its share of the cores
  # this process may use; a one-core runner would give one).
  cores = os.sched_getaffinity(0)
  monkeypatch.setattr(sweep, '_cpu_shares', lambda n: [cores] * n)
  out = sweep.run(s, parallel=2, poll_s=0.05, log=lambda *a: None)
  assert {o['status'] for o in out.values()} == {'done'}
  start = lambda n: float((tmp_path / n / 'start').read_text())
  logged = lambda n: json.loads(
      (tmp_path / n / 'metrics.jsonl').read_text())['t']
  assert start('v1') >= logged('v0') and start('v2') >= logged('v0')
  assert start('v2') < logged('v1')   # v1 waited for v2: two at once


def _sweep(workdir, data_dir, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'glm', 'sweep', '--gin_file',
       os.path.join(RUNS, 'default.gin'), f"--gin.train.data_dir='{data_dir}'",
       *TINY, '--gin.TRAIN_STEPS=2', '--gin.train.sample_tokens=0',
       '--axis', "ModelConfig.position='alibi','rope'",
       '--axis', 'OptimizerConfig.weight_decay=0.0,0.1',
       '--axis', 'train.seed=0,1', '--workdir', str(workdir), *extra],
      capture_output=True, text=True, cwd=ROOT)


def test_sweep_trains_every_variant_and_a_rerun_skips_them(tmp_path,
                                                            data_dir):
  work = tmp_path / 'sweep'
  out = _sweep(work, data_dir, '--parallel', '2')
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert '8 variants' in out.stdout and 'ETA' in out.stdout
  rows = [json.loads(l) for l in open(work / 'results.jsonl')]
  assert len(rows) == 8 and {r['status'] for r in rows} == {'done'}
  for r in rows:
    assert r['steps'] == 2 and np.isfinite(r['eval_loss'])
    assert r['params'] > 0 and r['flops'] > 0
    # Each variant's operative config holds its own axes.
    gin = (work / r['name'] / 'config.gin').read_text()
    assert f"position = {r['axes']['ModelConfig.position']}" in gin
    assert f"seed = {r['axes']['train.seed']}" in gin
  # Seeds differ, so the two runs of a setting are not copies.
  by = {r['name']: r['eval_loss'] for r in rows}
  assert (by['position=alibi_weight_decay=0.0_seed=0']
          != by['position=alibi_weight_decay=0.0_seed=1'])
  md = (work / 'results.md').read_text()
  assert md.count('| 2 |') == 4  # four settings, two seeds each
  for png in ('curves.png', 'axis_position.png', 'axis_weight_decay.png'):
    assert (work / png).read_bytes()[:8] == PNG
  again = _sweep(work, data_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '8 finished before, 0 to run' in again.stdout
  assert [json.loads(l)['eval_loss'] for l in open(work / 'results.jsonl')
          ] == [r['eval_loss'] for r in rows]
