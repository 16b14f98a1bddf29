"""Mistakes the trainer catches instead of silently doing the wrong thing:
misspelt bindings, a model file given as a run, a resume with other
settings, broken checkpoints, duplicated evals, throughput that counts
evaluation time, a warmup longer than the run, a first step at lr 0."""

import json
import os
import shutil

import gin
import numpy as np
import pytest

from glm import cli
from glm.model.config import ModelConfig
from glm.training import loop as loop_lib
from glm.training import optimizers
from glm.training import workdir as workdir_lib

from train_cli import MODELS, RUNS, glm, train  # tests/train_cli.py


@pytest.fixture(autouse=True)
def no_gin_bindings():
  """In-process CLI calls leave gin bindings behind; start without."""
  gin.clear_config()
  yield
  gin.clear_config()


def error_lines(out) -> list[str]:
  return [l for l in out.stderr.splitlines() if l.strip()]


# Bindings -----------------------------------------------------------------


@pytest.mark.parametrize('binding,hint', [
    ('--gin.TRAIN_STEPZ=5', 'did you mean TRAIN_STEPS?'),
    ('--gin.train.train_stepz=5', 'did you mean train_steps?'),
    ('--gin.OptimizerConfig.learnig_rate=1e-3', 'did you mean learning_rate?'),
    ('--gin.ModelConfg.hidden=8', 'did you mean ModelConfig?'),
])
def test_misspelt_binding_fails_in_one_line(tmp_path, capsys, binding, hint):
  code = cli.main(['train', '--gin_file', os.path.join(RUNS, 'default.gin'),
                   '--workdir', str(tmp_path / 'w'), binding])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith('glm train: error: ') and hint in err[0], err[0]
  assert not (tmp_path / 'w').exists()


def test_a_model_file_alone_is_one_line_naming_what_is_missing(tmp_path,
                                                               capsys):
  code = cli.main(['train', '--gin_file', os.path.join(MODELS,
                                                       'tiny_bloom.gin'),
                   '--workdir', str(tmp_path / 'w')])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert 'train.train_steps' in err[0] and 'train.model_config' in err[0]
  assert 'default.gin' in err[0] and 'tiny_glm.gin' in err[0]


# Resuming with other settings ----------------------------------------------


def _settings(**change):
  base = {'train_steps': 10, 'batch_size': 4, 'seq_len': 32, 'seed': 0,
          'dtype': 'float32', 'data': {'mixture': [['causal_lm', 1.0]]},
          'optimizer': {'learning_rate': 3e-3, 'warmup_steps': 30}}
  return {**base, **change}


@pytest.mark.parametrize('change,named', [
    ({'batch_size': 8}, 'batch_size: 4 there, 8 here'),
    ({'seq_len': 64}, 'seq_len: 32 there, 64 here'),
    ({'train_steps': 20}, 'train_steps: 10 there, 20 here'),
    ({'data': {'mixture': [['ul2_mixture', 1.0]]}}, 'data.mixture'),
    ({'optimizer': {'learning_rate': 1e-3, 'warmup_steps': 30}},
     'optimizer.learning_rate: 0.003 there, 0.001 here'),
])
def test_check_workdir_names_each_changed_setting(tmp_path, change, named):
  cfg = ModelConfig()
  files = workdir_lib.RunFiles(str(tmp_path))
  files.record_config(cfg, _settings(), 'A = 1\n', 0, [])
  assert workdir_lib.check_workdir(str(tmp_path), cfg, _settings()) == []
  with pytest.raises(workdir_lib.TrainError, match='--accept_new_settings') as e:
    workdir_lib.check_workdir(str(tmp_path), cfg, _settings(**change))
  assert named in str(e.value)
  assert workdir_lib.check_workdir(str(tmp_path), cfg, _settings(**change),
                                   accept_new_settings=True)
  with pytest.raises(workdir_lib.TrainError, match='another model'):
    workdir_lib.check_workdir(str(tmp_path), cfg.replace(hidden=128),
                              _settings(), accept_new_settings=True)


def test_resume_with_other_settings_is_refused_then_recorded(tmp_path,
                                                              data_dir):
  w = tmp_path / 'w'
  first = train(w, data_dir, '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_EVERY=2',
                '--gin.EVAL_EVERY=0')
  assert first.returncode == 0, first.stderr[-2000:]
  config = (w / 'config.gin').read_text()
  refused = train(w, data_dir, '--gin.TRAIN_STEPS=3',
                  '--gin.CHECKPOINT_EVERY=2', '--gin.EVAL_EVERY=0',
                  '--gin.OptimizerConfig.learning_rate=1e-3')
  err = error_lines(refused)
  assert refused.returncode == 2 and len(err) == 1, err
  assert 'train_steps: 2 there, 3 here' in err[0]
  assert 'optimizer.learning_rate' in err[0]
  assert (w / 'config.gin').read_text() == config  # nothing was touched
  accepted = train(w, data_dir, '--gin.TRAIN_STEPS=3',
                   '--gin.CHECKPOINT_EVERY=2', '--gin.EVAL_EVERY=0',
                   '--accept_new_settings')
  assert accepted.returncode == 0, accepted.stderr[-2000:]
  assert 'resumed from step 2' in accepted.stdout
  assert 'going on with new settings' in accepted.stdout
  kept = (w / 'config_history' / 'from_step_000000.gin').read_text()
  assert kept == config and 'TRAIN_STEPS = 2' in kept
  assert 'TRAIN_STEPS = 3' in (w / 'config.gin').read_text()
  history = json.loads((w / 'run.json').read_text())['history']
  assert [h['from_step'] for h in history] == [0, 2]
  assert history[0]['config'] == 'config_history/from_step_000000.gin'
  assert any('train_steps' in c for c in history[1]['changed'])
  # The same command again is not a change.
  again = train(w, data_dir, '--gin.TRAIN_STEPS=3',
                '--gin.CHECKPOINT_EVERY=2', '--gin.EVAL_EVERY=0')
  assert again.returncode == 0, again.stderr[-2000:]


# Broken checkpoints ---------------------------------------------------------


def _truncate_largest_file(folder) -> None:
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  big = max(files, key=os.path.getsize)
  with open(big, 'r+b') as f:
    f.truncate(os.path.getsize(big) // 3)


def test_broken_latest_checkpoint_falls_back_and_keeps_both(tmp_path,
                                                            data_dir):
  w = tmp_path / 'w'
  run = ['--gin.TRAIN_STEPS=4', '--gin.CHECKPOINT_EVERY=2',
         '--gin.EVAL_EVERY=0']
  assert train(w, data_dir, *run).returncode == 0
  assert sorted(os.listdir(w / 'checkpoints')) == ['2', '4']
  _truncate_largest_file(w / 'checkpoints' / '4')
  out = train(w, data_dir, *run)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'checkpoint step 4 does not restore' in out.stdout
  assert 'resumed from step 2' in out.stdout
  assert os.path.isdir(w / 'checkpoints_unrestorable' / '4')  # kept
  assert sorted(os.listdir(w / 'checkpoints')) == ['2', '4']  # 4 made again

  # A damaged model folder: `glm score` says so in one line.
  model = tmp_path / 'model'
  shutil.copytree(w / 'model', model)
  _truncate_largest_file(model / 'params')
  inp = tmp_path / 'in.jsonl'
  inp.write_text(json.dumps({'tokens': [5, 6, 7]}) + '\n')
  scored = glm('score', '--checkpoint', str(model), '--input', str(inp),
               '--output', str(tmp_path / 'out.jsonl'))
  err = error_lines(scored)
  assert scored.returncode == 2 and len(err) == 1, err
  assert 'do not restore' in err[0] and 'damaged' in err[0]
  assert not (tmp_path / 'out.jsonl').exists()


# Evaluations, throughput and the schedule -----------------------------------


@pytest.mark.slow
def test_each_eval_step_is_logged_once_also_on_rerun(tmp_path, data_dir):
  w = tmp_path / 'w'
  run = ['--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_EVERY=2',
         '--gin.EVAL_EVERY=1', '--gin.OptimizerConfig.warmup_steps=5']
  out = train(w, data_dir, *run)
  assert out.returncode == 0, out.stderr[-2000:]
  # The warmup does not fit the run: a word in the log, not a squeeze.
  assert 'warning: warmup_steps=5 is longer than the run (2 steps)' in (
      out.stdout)
  rows = [json.loads(l) for l in open(w / 'metrics.jsonl')]
  assert rows[0]['lr'] == pytest.approx(3e-3 / 5)  # warmup as configured
  steps = lambda: [json.loads(l)['step'] for l in open(w / 'eval.jsonl')]
  assert steps() == [1, 2]
  again = train(w, data_dir, *run)  # a finished run: evaluates nothing new
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'already at step 2' in again.stdout
  assert steps() == [1, 2]


def test_first_step_learns_and_the_peak_comes_after_the_warmup():
  cfg = optimizers.OptimizerConfig(learning_rate=1.0, warmup_steps=4)
  lr = optimizers.lr_table(cfg, np.full(10, 100))
  np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0])
  assert lr[4] == pytest.approx(1.0) and lr[-1] < lr[4]
  tokens = optimizers.OptimizerConfig(learning_rate=1.0, warmup_tokens=250)
  assert optimizers.lr_table(tokens, np.full(4, 100))[0] == pytest.approx(0.4)
  assert optimizers.warmup_note(cfg, np.full(10, 100), lr) is None


class _Files:
  """RunFiles stand-in that keeps the logged rows."""

  def __init__(self):
    self.rows = []

  def log(self, name, row, prefix):
    self.rows.append(row)


class _Clock:
  """A stand-in for the `time` module whose clock moves only when the stub
  step, evaluation and checkpoint say how long they took."""

  def __init__(self):
    self.now = 1000.0

  def time(self):
    return self.now

  perf_counter = time

  def sleep(self, seconds):
    self.now += seconds


class _Manager:
  def __init__(self, clock):
    self.clock = clock

  def save(self, step, args):
    self.clock.sleep(0.3)  # a slow checkpoint

  def wait_until_finished(self):
    pass


def test_logged_throughput_leaves_out_evaluation_and_checkpoints(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(loop_lib, 'time', clock)
  run = loop_lib.Run(
      workdir='/nonexistent', cfg=ModelConfig(), train_steps=4,
      batch_sizes=np.full(4, 2), batch_size=2, micro=2, seq_len=8, seed=0,
      log_every=2, eval_every=1, checkpoint_every=1,
      policy=loop_lib.FailurePolicy(), mesh_cfg=None, mesh=None,
      settings={}, changes=[])
  ok = {'loss': np.float32(1.0), 'grad_norm': np.float32(1.0),
        'skipped': False, 'nonfinite': False, 'bad_steps': 0}

  def step(state, batch, rng):
    clock.sleep(0.05)
    return state, ok

  files = _Files()
  loop_lib.loop(run, {'params': None}, 0, step, batch_fn=lambda s: None,
                evaluate=lambda params, s: clock.sleep(0.3),
                manager=_Manager(clock), files=files, lrs=np.ones(4),
                flops_per_token=1.0, peak=1.0)
  times = [r['step_time_s'] for r in files.rows if r['step'] > 1]
  assert times == pytest.approx([0.05] * len(times), abs=1e-9), times
