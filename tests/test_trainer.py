"""The trainer: exact resume after SIGKILL, bad steps, the files a run
writes, the paper recipes at tiny size, schedules and gradient accumulation."""

import json
import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glm.model import checkpoint as model_checkpoint
from glm.model.config import ModelConfig
from glm.model import transformer
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib


from train_cli import ROOT  # tests/train_cli.py
from train_cli import train_argv as cmd


def glm_train(run, workdir, data_dir, *extra):
  return subprocess.run(cmd(run, workdir, data_dir, *extra),
                        capture_output=True, text=True, cwd=ROOT)


def losses_by_step(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows}


# `python -c _SIGNAL_AT_STEP SIG N glm-args...`: `glm` that sends itself
# signal SIG right after it logs step N: the same point of the run on every
# machine, however busy (a watcher polling the workdir may come late).
_SIGNAL_AT_STEP = """
import os, sys
from glm import cli
from glm.training import workdir
log, sig, at = workdir.RunFiles.log, int(sys.argv[1]), int(sys.argv[2])
def log_then_signal(self, name, row, prefix):
  log(self, name, row, prefix)
  if name == 'metrics.jsonl' and row['step'] == at:
    os.kill(os.getpid(), sig)
workdir.RunFiles.log = log_then_signal
sys.exit(cli.main(sys.argv[3:]))
"""


def signalled_train(sig, step, run, workdir, data_dir, *extra):
  """`glm train` (as `train_argv`) that gets `sig` after logging `step`."""
  argv = cmd(run, workdir, data_dir, *extra)
  assert argv[1:3] == ['-m', 'glm'], argv
  return subprocess.run([argv[0], '-c', _SIGNAL_AT_STEP, str(int(sig)),
                         str(step), *argv[3:]],
                        cwd=ROOT, capture_output=True, text=True)


def test_sigkill_and_resume_reproduces_losses_bit_for_bit(tmp_path, data_dir):
  steps = ['--gin.TRAIN_STEPS=40', '--gin.CHECKPOINT_EVERY=5']
  ref = glm_train('default.gin', tmp_path / 'ref', data_dir, *steps)
  assert ref.returncode == 0, ref.stderr[-2000:]
  want = losses_by_step(tmp_path / 'ref')
  assert sorted(want) == list(range(1, 41))

  # SIGKILL (no cleanup, as a crash or an OOM kill) after step 12, with
  # checkpoints 5 and 10 written or in flight.
  work = tmp_path / 'killed'
  killed = signalled_train(signal.SIGKILL, 12, 'default.gin', work, data_dir,
                           *steps)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert max(losses_by_step(work)) == 12

  out = glm_train('default.gin', work, data_dir, *steps)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'resumed from step' in out.stdout
  got = losses_by_step(work)
  assert got == want  # every step, bit for bit (JSON keeps float64 exactly)


@pytest.mark.slow
def test_sigterm_saves_then_the_same_command_resumes(tmp_path, data_dir):
  work = tmp_path / 'w'
  done = signalled_train(signal.SIGTERM, 3, 'default.gin', work, data_dir,
                         '--gin.TRAIN_STEPS=400',
                         '--gin.CHECKPOINT_EVERY=1000')
  assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
  assert 'caught signal 15; saved step' in done.stdout
  saved = [int(d) for d in os.listdir(work / 'checkpoints') if d.isdigit()]
  assert saved == [3]   # the step the signal arrived after
  # A half-written save (orbax's temporary folder) is never picked up.
  (work / 'checkpoints' / '399.orbax-checkpoint-tmp-1').mkdir()
  out = glm_train('default.gin', work, data_dir,
                  '--gin.TRAIN_STEPS=' + str(saved[0] + 2),
                  '--gin.CHECKPOINT_EVERY=1000', '--accept_new_settings')
  assert f'resumed from step {saved[0]}' in out.stdout, out.stderr[-2000:]


def test_metrics_config_and_tensorboard_are_written(tmp_path, data_dir):
  out = glm_train('default.gin', tmp_path / 'w', data_dir,
                  '--gin.TRAIN_STEPS=3', '--gin.CHECKPOINT_EVERY=3',
                  '--gin.EVAL_EVERY=3',
                  "--gin.train.eval_tasks=['glm_lambada_en', 'glm_bpb_code']",
                  '--gin.train.eval_task_limit=3')
  assert out.returncode == 0, out.stderr[-2000:]
  w = tmp_path / 'w'
  assert 'TRAIN_STEPS = 3' in (w / 'config.gin').read_text()
  rows = [json.loads(l) for l in open(w / 'metrics.jsonl')]
  for key in ('step', 'loss', 'lr', 'grad_norm', 'tokens_per_s',
              'step_time_s', 'mfu'):
    assert all(key in r and np.isfinite(r[key]) for r in rows), key
  evals = [json.loads(l) for l in open(w / 'eval.jsonl')]
  assert evals[0]['step'] == 3 and 'all' in evals[0]
  assert any(k.startswith('lang/') for k in evals[0])
  # Harness tasks beside the held-out loss (lm-eval's metric names).
  assert 0 <= evals[0]['tasks/glm_lambada_en/acc'] <= 1
  assert evals[0]['tasks/glm_bpb_code/bits_per_byte'] > 0
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  (events,) = os.listdir(w / 'tensorboard')
  tags = {}
  for event in tf.compat.v1.train.summary_iterator(
      str(w / 'tensorboard' / events)):
    for v in event.summary.value:
      tags.setdefault(v.tag, []).append(event.step)
  assert tags['train/loss'] == [1, 2, 3]
  assert 'config' in tags and 'eval/all' in tags
  assert tags['eval/tasks/glm_lambada_en/perplexity'] == [3]


def test_workdir_of_another_run_is_refused(tmp_path, data_dir):
  w = tmp_path / 'w'
  assert glm_train('default.gin', w, data_dir, '--gin.TRAIN_STEPS=1',
                   '--gin.CHECKPOINT_EVERY=1').returncode == 0
  out = glm_train('default.gin', w, data_dir, '--gin.TRAIN_STEPS=2',
                  '--gin.CHECKPOINT_EVERY=1', '--gin.ModelConfig.hidden=64')
  lines = [l for l in out.stderr.splitlines() if l.startswith('glm train')]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert 'another model (hidden: 32 there, 64 here' in lines[0]


def test_consecutive_bad_steps_stop_naming_the_last_checkpoint(tmp_path,
                                                               data_dir):
  # A learning rate of 1e30 turns the parameters to inf after one update:
  # every later step is non-finite, skipped, and the run stops.
  out = glm_train('default.gin', tmp_path / 'w', data_dir,
                  '--gin.TRAIN_STEPS=30', '--gin.CHECKPOINT_EVERY=1',
                  '--gin.OptimizerConfig.learning_rate=1e30',
                  '--gin.OptimizerConfig.warmup_steps=0',
                  '--gin.FailurePolicy.max_bad_steps=3',
                  '--gin.train.failure_policy=@FailurePolicy()')
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'skipped the update (non-finite' in out.stdout
  err = [l for l in out.stderr.splitlines() if l.startswith('glm train')]
  assert '3 consecutive bad steps' in err[0]
  assert 'the last good checkpoint is step' in err[0]


@pytest.mark.parametrize('recipe,model', [
    pytest.param('bloom_recipe.gin', 'tiny_bloom.gin',
                 marks=pytest.mark.slow),
    ('glm130b_recipe.gin', 'tiny_glm.gin')])
def test_paper_recipes_run_at_tiny_size(tmp_path, data_dir, recipe, model):
  w = tmp_path / 'w'
  argv = cmd(recipe, w, data_dir, '--gin.TRAIN_STEPS=4',
             '--gin.CHECKPOINT_EVERY=4', '--gin.train.micro_batch_size=2',
             '--gin.BatchRamp.start=2', '--gin.BatchRamp.steps=2',
             '--gin.OptimizerConfig.warmup_tokens=0',
             '--gin.OptimizerConfig.warmup_steps=2', '--gin.SEQ_LEN=96')
  argv[6:6] = ['--gin_file', os.path.join(ROOT, 'configs', 'models', model)]
  out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(l) for l in open(w / 'metrics.jsonl')]
  assert [r['batch_size'] for r in rows] == [2, 2, 4, 4]  # the ramp
  # Step 1 trains at half the warmup (2 steps) from init_lr to the peak.
  init, peak = (1e-7, 8e-5) if 'glm' in recipe else (0.0, 6e-5)
  assert rows[0]['lr'] == pytest.approx(init + (peak - init) / 2, rel=1e-5)
  assert all(np.isfinite(r['loss']) for r in rows)


def test_finetune_from_a_glm_checkpoint(tmp_path, data_dir):
  base = tmp_path / 'base'
  assert glm_train('default.gin', base, data_dir, '--gin.TRAIN_STEPS=2',
                   '--gin.CHECKPOINT_EVERY=2').returncode == 0
  # A base whose logits are 100x sharper than any init's: its loss on any
  # text is far above init's ~ln(2048) = 7.6, so the fine-tune's first loss
  # tells which weights it started from.
  cfg, params = model_checkpoint.load(str(base / 'model'))
  params['final_norm']['scale'] = 100 * params['final_norm']['scale']
  sharp = model_checkpoint.save(
      str(tmp_path / 'sharp'), cfg, params,
      tokenizer_path=model_checkpoint.tokenizer_path(str(base / 'model')))
  out = glm_train('finetune.gin', tmp_path / 'ft', data_dir,
                  f"--gin.INIT_CHECKPOINT='{sharp}'",
                  '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_EVERY=2',
                  '--gin.SEQ_LEN=96',  # room for the prompts
                  '--gin.ModelConfig.hidden=64')  # ignored: from checkpoint
  assert out.returncode == 0, out.stderr[-2000:]
  assert "{'instruction': 1.0}" in out.stdout
  first = json.loads(open(tmp_path / 'ft' / 'metrics.jsonl').readline())
  assert first['loss'] > 15, first   # starts from the given weights
  missing = glm_train('finetune.gin', tmp_path / 'ft2', data_dir)
  assert missing.returncode == 2
  assert 'required macro INIT_CHECKPOINT is not set' in missing.stderr


def test_micro_batch_must_divide_the_batch(tmp_path, data_dir):
  out = glm_train('default.gin', tmp_path / 'w', data_dir,
                  '--gin.train.micro_batch_size=3')
  assert out.returncode == 2
  assert 'BATCH_SIZE=4 is not divisible by micro_batch_size=3' in out.stderr
  assert not (tmp_path / 'w').exists()


# Unit tests of the step and the schedules ---------------------------------

CFG = ModelConfig(vocab_size=64, hidden=16, num_layers=2, num_heads=2,
                  mlp_dim=32, max_len=16)


def _state(opt, params):
  """A fresh state on copies of `params` (the step donates its state)."""
  return state_lib.new_state(jax.tree.map(jnp.copy, params), opt)


def _batch(seed, b=4, t=8):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, 64, (b, t)).astype(np.int32)
  return {'tokens': tok, 'targets': np.roll(tok, -1, 1),
          'loss_mask': rng.integers(0, 2, (b, t)).astype(np.float32)}


def test_gradient_accumulation_equals_one_big_batch():
  # Plain SGD with lr 1: the update is exactly minus the (accumulated) grads.
  opt = optax.sgd(1.0)
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  step, _ = step_lib.make_train_step(CFG, opt)
  batch = _batch(0)
  one = {k: jnp.asarray(v)[None] for k, v in batch.items()}          # [1,4,T]
  two = {k: jnp.asarray(v).reshape(2, 2, -1) for k, v in batch.items()}
  s1, m1 = step(_state(opt, params), one)
  s2, m2 = step(_state(opt, params), two)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)
  assert float(m1['grad_norm']) > 0.1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
               s1['params'], s2['params'])


def test_nan_batch_is_skipped_and_counted_then_training_goes_on():
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig(),
                                  np.full(4, 1e-2, np.float32))
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  step, _ = step_lib.make_train_step(CFG, opt)
  state = _state(opt, params)
  bad = _batch(1)
  bad['loss_mask'][0, 0] = np.nan
  bad = {k: jnp.asarray(v)[None] for k, v in bad.items()}
  state, m = step(state, bad)
  assert bool(m['skipped']) and bool(m['nonfinite'])
  assert int(state['bad_steps']) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               state['params'], params)
  good = {k: jnp.asarray(v)[None] for k, v in _batch(2).items()}
  state, m = step(state, good)
  assert not bool(m['skipped']) and int(state['bad_steps']) == 0
  assert not np.array_equal(state['params']['embed']['embedding'],
                            params['embed']['embedding'])


def test_loss_spike_is_skipped():
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig(),
                                  np.full(4, 1e-2, np.float32))
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  step, _ = step_lib.make_train_step(
      CFG, opt, policy=step_lib.FailurePolicy(spike_factor=2.0))
  state = _state(opt, params)
  state['loss_ema'] = jnp.float32(1.0)  # running mean far below ln(64)
  batch = {k: jnp.asarray(v)[None] for k, v in _batch(3).items()}
  new, m = step(state, batch)
  assert bool(m['skipped']) and not bool(m['nonfinite'])
  assert float(new['loss_ema']) == 1.0


def test_lr_table_warmup_in_tokens_and_cosine_floor():
  cfg = optimizers.OptimizerConfig(learning_rate=1.0, init_lr=0.1,
                                   min_lr_ratio=0.1, warmup_tokens=400)
  tokens = np.array([100] * 4 + [200] * 16)  # a ramp: 100 then 200 tokens
  lr = optimizers.lr_table(cfg, tokens)
  # Step s trains at the rate reached after its tokens: 100, 200, 300, 400.
  np.testing.assert_allclose(lr[:4], [0.325, 0.55, 0.775, 1.0], rtol=1e-6)
  assert lr[4] == pytest.approx(1.0)
  assert np.all(np.diff(lr[4:]) <= 1e-7) and lr[-1] >= 0.1 - 1e-7
  ramp = optimizers.BatchRamp(start=2, steps=4)
  assert ramp.batch_sizes(8, 2, 6).tolist() == [2, 2, 4, 6, 8, 8]


def test_weight_decay_skips_biases_norms_and_embeddings():
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))  # scanned
  mask = optimizers.decay_mask(params, decay_embeddings=False)
  assert mask['layers']['attention']['query'] is True
  assert mask['layers']['attention']['query_bias'] is False
  assert mask['layers']['input_norm']['scale'] is False
  assert mask['embed']['embedding'] is False
  assert optimizers.decay_mask(params, True)['embed']['embedding'] is True


def test_cross_entropy_and_its_gradient_match_log_softmax():
  from glm.training import losses  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 37)).astype(np.float32) * 3)
  logits = logits.at[..., 30:].set(jnp.finfo(jnp.float32).min)  # padded vocab
  targets = jnp.asarray(rng.integers(0, 30, (2, 5)))
  mask = jnp.asarray(rng.integers(0, 2, (2, 5)).astype(np.float32))

  def reference(lg):
    lp = jax.nn.log_softmax(lg, -1)
    return -jnp.sum(jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
                    * mask)

  ours = lambda lg: losses.cross_entropy(lg, targets, mask)[0]
  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits),
                             jax.grad(reference)(logits), atol=1e-6)
  assert float(losses.cross_entropy(logits, targets, mask)[1]) == float(
      mask.sum())


@pytest.mark.parametrize('tie,z_loss,chunk', [
    pytest.param(True, 0.0, 4, marks=pytest.mark.slow), (True, 1e-2, 7),
    (False, 1e-2, 64)])
def test_output_loss_equals_logits_then_cross_entropy(tie, z_loss, chunk):
  """The chunked output layer + loss (values and gradients of x and of the
  output matrix) equals logits -> cross_entropy + z-loss, with a padded
  vocabulary, masked tokens and a chunk size that does not divide B*T."""
  from glm.training import losses  # pylint: disable=g-import-not-at-top
  cfg = CFG.replace(tie_embeddings=tie, vocab_size=50)  # padded to 128
  params = transformer.init_params(cfg, jax.random.PRNGKey(1))
  batch = {k: jnp.asarray(v) for k, v in _batch(3, b=3, t=6).items()}
  batch['targets'] = batch['targets'] % 50
  batch['loss_mask'] = batch['loss_mask'].at[0, :2].set(0.0)
  model = transformer.Transformer(cfg)

  def plain(p):
    logits = model.apply({'params': p}, batch)
    total, count = losses.cross_entropy(logits, batch['targets'],
                                        batch['loss_mask'])
    return total + z_loss * losses.z_loss_sum(logits, batch['loss_mask']), count

  def fused(p):
    x, w = model.apply({'params': p}, batch, output_layer=False)
    return losses.output_loss(x, w, batch['targets'], batch['loss_mask'],
                              vocab_size=50, z_loss=z_loss, chunk_rows=chunk)

  (want, n0), g_want = jax.value_and_grad(plain, has_aux=True)(params)
  (got, n1), g_got = jax.value_and_grad(fused, has_aux=True)(params)
  assert float(n0) == float(n1) == float(batch['loss_mask'].sum())
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_got)[0],
                          jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_dropout_is_seeded_per_step_and_off_at_eval():
  cfg = CFG.replace(dropout_rate=0.5)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  model = transformer.Transformer(cfg)
  batch = {'tokens': jnp.asarray(_batch(0)['tokens'])}
  plain = model.apply({'params': params}, batch)
  assert np.array_equal(plain, transformer.Transformer(
      cfg.replace(dropout_rate=0.0)).apply({'params': params}, batch))
  drop = lambda k: model.apply({'params': params}, batch,
                               deterministic=False, rngs={'dropout': k})
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  assert np.array_equal(drop(k1), drop(k1))
  assert not np.allclose(drop(k1), drop(k2))
  assert not np.allclose(drop(k1), plain)
  opt = optax.sgd(1e-2)
  step, _ = step_lib.make_train_step(cfg, opt)
  b = {k: jnp.asarray(v)[None] for k, v in _batch(0).items()}
  _, m1 = step(_state(opt, params), b, k1)
  _, m2 = step(_state(opt, params), b, k1)
  _, m3 = step(_state(opt, params), b, None)
  assert float(m1['loss']) == float(m2['loss']) != float(m3['loss'])


def test_eval_step_counts_loss_tokens_and_top1_hits_like_numpy():
  params = transformer.init_params(CFG, jax.random.PRNGKey(3))
  _, eval_step = step_lib.make_train_step(CFG, optax.sgd(1e-2))
  batch = _batch(4)
  # Targets: the model's own top-1 at every other position where it leads
  # by more than float error (so another program's argmax agrees on any
  # CPU), its bottom-1 elsewhere.
  logits = np.asarray(transformer.Transformer(CFG).apply(
      {'params': params}, {'tokens': jnp.asarray(batch['tokens'])}),
      np.float64)[..., :CFG.vocab_size]
  top2 = np.sort(logits, -1)[..., -2:]
  lead = (top2[..., 1] - top2[..., 0] > 1e-4) & (
      np.arange(logits.shape[1]) % 2 == 0)
  batch['targets'] = np.where(lead, logits.argmax(-1),
                              logits.argmin(-1)).astype(np.int32)
  total, count, correct = eval_step(
      params, {k: jnp.asarray(v) for k, v in batch.items()})
  mask = batch['loss_mask']
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(total), (nll * mask).sum(), rtol=1e-5)
  assert float(count) == mask.sum()
  assert float(correct) == (lead * mask).sum() > 0
