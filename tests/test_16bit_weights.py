"""16-bit weights and gradients with float32 master weights (GLM-130B's
scheme): it trains like float32, the masters live in the (ZeRO-1 sharded)
optimiser state, and checkpoints and the exported model hold the masters."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from glm.model import checkpoint as model_checkpoint
from glm.model.config import ModelConfig
from glm.parallel.mesh import MeshConfig
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib

import train_cli  # tests/train_cli.py

CFG = ModelConfig(vocab_size=300, hidden=64, num_layers=2, num_heads=4,
                  mlp_dim=128, max_len=32)


def _opt(steps=30):
  oc = optimizers.OptimizerConfig(learning_rate=3e-3, warmup_steps=2)
  return optimizers.make_optimizer(oc, optimizers.lr_table(
      oc, np.full(steps, 64)))


def test_bf16_weights_train_like_float32():
  # Three fixed batches, seen in turn: a loss that can fall.
  rng = np.random.default_rng(0)
  tok = rng.integers(0, 300, (3, 1, 4, 16)).astype(np.int32)[
      np.arange(30) % 3]
  losses = {}
  for pd in ('float32', 'bfloat16'):
    cfg, opt = CFG.replace(param_dtype=pd), _opt()
    state = state_lib.init_state(cfg, opt, seed=0)
    step, _ = step_lib.make_train_step(cfg, opt)
    got = []
    for t in tok:
      batch = {'tokens': jnp.asarray(t), 'targets': jnp.asarray(
          np.roll(t, -1, -1)), 'loss_mask': jnp.ones(t.shape, jnp.float32)}
      state, m = step(state, batch)
      got.append(float(m['loss']))
    losses[pd] = np.asarray(got)
    if pd == 'bfloat16':
      assert all(a.dtype == jnp.bfloat16
                 for a in jax.tree.leaves(state['params']))
      master = state['opt_state']['master']
      assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(master))
      # The weights are the rounded masters, and the masters moved by
      # updates far below bf16's resolution too.
      jax.tree.map(lambda p, m: np.testing.assert_array_equal(
          p, m.astype(jnp.bfloat16)), state['params'], master)
      w = np.asarray(master['layers']['mlp']['wi'])
      assert not np.array_equal(w, w.astype(jnp.bfloat16).astype(np.float32))
  drop = losses['float32'][0] - losses['float32'][-1]
  assert drop > 0.5, losses   # it learns (about 1.8 nats)
  # The curves differ by bf16 rounding of weights and gradients, whose
  # effect on the loss is a random walk (measured at most 0.0016 here, about
  # 0.1% of the drop); 1% of the drop is a tenfold margin for another CPU's
  # rounding, and a broken master update is off by a large part of the drop.
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'],
                             atol=0.01 * drop, rtol=0)


def test_master_weights_are_sharded_like_the_optimiser_state():
  cfg = CFG.replace(param_dtype='bfloat16')
  state = state_lib.abstract_state(cfg, _opt())
  specs = state_lib.state_specs(state, cfg, MeshConfig(data=4, zero1=True))
  # ZeRO-1 adds `data` to the largest divisible dimension of each master,
  # exactly as to Adam's moments; the bf16 weights are not split over it.
  zero1 = P(('tensor', 'data'), 'fsdp')
  assert specs['opt_state']['master']['embed']['embedding'] == zero1
  mu = specs['opt_state']['inner'][1][0].mu['embed']['embedding']
  assert mu == zero1
  assert specs['params']['embed']['embedding'] == P('tensor', 'fsdp')
  saved = state_lib.to_saved(state)
  assert 'params' not in saved
  assert state_lib.state_specs(saved, cfg, MeshConfig(data=4, zero1=True))[
      'opt_state']['master']['embed']['embedding'] == zero1


def _train(workdir, data_dir, *extra):
  return train_cli.train(workdir, data_dir,
                         "--gin.ModelConfig.param_dtype='bfloat16'", *extra)


@pytest.mark.slow
def test_checkpoints_hold_the_masters_and_resume_exactly(tmp_path, data_dir):
  w = tmp_path / 'w'
  run = ['--gin.TRAIN_STEPS=4', '--gin.CHECKPOINT_EVERY=2']
  out = _train(w, data_dir, *run)
  assert out.returncode == 0, out.stderr[-3000:]
  # The checkpoint: float32 masters in the optimiser state, no bf16 copy.
  saved = ocp.StandardCheckpointer().restore(
      str(w / 'checkpoints' / '4' / 'default'))
  assert set(saved) == {'opt_state', 'loss_ema', 'bad_steps'}
  masters = jax.tree.leaves(saved['opt_state']['master'])
  assert masters and all(a.dtype == np.float32 for a in masters)
  # The exported model is the masters, not their bf16 rounding.
  _, params = model_checkpoint.load(str(w / 'model'))
  np.testing.assert_array_equal(
      params['layers']['mlp']['wi'],
      saved['opt_state']['master']['layers']['mlp']['wi'])
  # Resuming from step 2 reproduces steps 3 and 4 bit for bit.
  want = [json.loads(l) for l in open(w / 'metrics.jsonl')]
  shutil.rmtree(w / 'checkpoints' / '4')
  out = _train(w, data_dir, *run)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed from step 2' in out.stdout
  got = [json.loads(l) for l in open(w / 'metrics.jsonl')]
  by_step = lambda rows: {r['step']: r['loss'] for r in rows}
  assert by_step(got)[3] == by_step(want)[3]
  assert by_step(got)[4] == by_step(want)[4]
