"""Runs every parallel layout on 8 faked CPU devices; tests compare the files.

  JAX_NUM_CPU_DEVICES=8 python tests/parallel_worker.py OUT_DIR [PART]

PART is 'default' (bloom on every layout without a pipeline plus 'combo',
two layouts each of glm and ul2, and the checkpoint and HLO checks: the
default test suite) or 'rest' (the other
family x layout pairs: the `slow` suite); without it, everything.

Writes OUT_DIR/<family>/<layout>.npz with the losses and gradient norms of a
few real train steps (glm.training.step.make_train_step, sharded) and the gradients of
the first batch, for one device (`single`) and each layout; plus
OUT_DIR/restore.npz (a checkpoint saved on one mesh, restored on others) and
OUT_DIR/hlo.json (shapes in the compiled tensor-parallel step). Run by
tests/test_parallel.py in a subprocess, since the device count is fixed when
JAX starts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

if __name__ == '__main__':  # before JAX starts; never when imported by tests
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import orbax.checkpoint as ocp

from glm.model.config import ModelConfig
from glm.model import transformer
from glm.parallel import mesh as mesh_lib
from glm.training import losses
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib


STEPS = 3
BATCH, LENGTH = 8, 16

FAMILIES = {
    # BLOOM: ALiBi, embedding LayerNorm, GeLU, biases; causal LM packed rows.
    'bloom': ModelConfig(vocab_size=384, hidden=32, num_layers=4, num_heads=8,
                         mlp_dim=64, max_len=64, position='alibi',
                         embed_norm=True),
    # GLM: DeepNorm, GeGLU, 2D RoPE, gradient shrink; per-token prefix masks;
    # remat of the matmul outputs.
    'glm': ModelConfig(vocab_size=384, hidden=32, num_layers=4, num_heads=8,
                       mlp_dim=64, max_len=64, position='rope2d',
                       norm_layout='deepnorm', mlp_activation='geglu',
                       embed_grad_shrink=0.1, remat_policy='dots'),
    # UL2 / PaLM: RMSNorm, SwiGLU, RoPE, no biases; prefix-LM lengths; full
    # remat.
    'ul2': ModelConfig(vocab_size=384, hidden=32, num_layers=4, num_heads=8,
                       mlp_dim=64, max_len=64, position='rope',
                       norm_type='rmsnorm', mlp_activation='swiglu',
                       use_bias=False, remat_policy='full'),
}

# layout -> (mesh, number of devices used).
LAYOUTS = {
    'data': ('data=8', {}),
    'zero1': ('data=8', {'zero1': True}),
    'fsdp': ('fsdp=8', {}),
    'tensor': ('tensor=8', {}),
    'gpipe': ('pipeline=4', {'schedule': 'gpipe', 'microbatches': 4}),
    'circular': ('pipeline=2', {'schedule': 'circular', 'repeats': 2,
                                'microbatches': 2}),
    'combo': ('data=2,tensor=2,pipeline=2', {'microbatches': 2}),
}


def make_batches(family: str, steps: int) -> list[dict[str, np.ndarray]]:
  """[1, B, T] batches with the fields each family's objective produces.

  Rows pack two segments and padding; bloom is causal, glm has a per-token
  bidirectional prefix (Part A) and 2D block positions, ul2 a prefix length.
  """
  rng = np.random.RandomState(7)
  out = []
  for _ in range(steps):
    tokens = rng.randint(3, 384, (BATCH, LENGTH)).astype(np.int32)
    seg = np.zeros((BATCH, LENGTH), np.int32)
    pos = np.zeros((BATCH, LENGTH), np.int32)
    block = np.zeros((BATCH, LENGTH), np.int32)
    prefix = np.zeros((BATCH, LENGTH), bool)
    for r in range(BATCH):
      a = rng.randint(4, 10)
      b = rng.randint(a + 3, LENGTH + 1)
      seg[r, :a], seg[r, a:b] = 1, 2
      pos[r, :a], pos[r, a:b] = np.arange(a), np.arange(b - a)
      pa = rng.randint(1, a)
      prefix[r, :pa] = True
      prefix[r, a:a + 2] = True
      block[r, pa:a] = np.arange(1, a - pa + 1)
    targets = np.roll(tokens, -1, axis=1)
    mask = ((seg > 0) & ~prefix).astype(np.float32)
    batch = {'tokens': tokens, 'targets': targets, 'loss_mask': mask,
             'segment_ids': seg, 'position_ids': pos}
    if family == 'glm':
      batch |= {'prefix_mask': prefix, 'block_position_ids': block}
    elif family == 'ul2':
      batch = {'tokens': tokens, 'targets': targets,
               'prefix_len': rng.randint(1, LENGTH // 2, BATCH).astype(
                   np.int32),
               'loss_mask': np.ones((BATCH, LENGTH), np.float32)}
    out.append({k: v[None] for k, v in batch.items()})
  return out


def optimizer():
  # eps well above the gradients' rounding noise: with eps 1e-8, Adam's
  # first step moves every weight by ~lr * sign(g), so a gradient that is
  # zero up to rounding gets a +-lr update whose sign is the noise.
  oc = optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=1,
                                  weight_decay=0.1, eps=1e-4)
  return optimizers.make_optimizer(oc, optimizers.lr_table(
      oc, np.full(STEPS, BATCH * LENGTH)))


def init_state(cfg, opt):
  return state_lib.init_state(cfg, opt, seed=0)


def loss_fn(model):
  def f(params, batch):
    logits = model.apply({'params': params}, batch)
    total, count = losses.cross_entropy(logits, batch['targets'],
                                        batch['loss_mask'])
    return total / count
  return f


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def run(cfg: ModelConfig, batches, layout: str | None) -> dict:
  opt = optimizer()
  state = init_state(cfg, opt)
  if layout is None:
    step, _ = step_lib.make_train_step(cfg, opt)
    grads = jax.jit(jax.grad(loss_fn(transformer.Transformer(cfg))))(
        state['params'], {k: v[0] for k, v in batches[0].items()})
  else:
    text, extra = LAYOUTS[layout]
    mc = mesh_lib.MeshConfig.parse(text, **extra)
    mesh_lib.validate(mc, cfg, micro_batch=BATCH)
    mesh = mesh_lib.make_mesh(mc, jax.devices()[:mc.num_devices])
    step, _ = step_lib.make_train_step(cfg, opt, mesh_cfg=mc, mesh=mesh)
    state = jax.device_put(state, state_lib.state_shardings(state, cfg, mc,
                                                           mesh))
    model = step_lib.make_model(cfg, mc, mesh)
    first = {k: v[0] for k, v in batches[0].items()}
    first = jax.device_put(first, mesh_lib.batch_shardings(first, mesh,
                                                           leading=0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.rules()):
      grads = jax.jit(jax.grad(loss_fn(model)))(state['params'], first)
  loss, norm = [], []
  for b in batches:
    if layout is not None:
      b = jax.device_put(b, mesh_lib.batch_shardings(b, mesh))
    state, m = step(state, b)
    loss.append(float(m['loss']))
    norm.append(float(m['grad_norm']))
  wi = state['params']['layers']['mlp']['wi']
  mu = state['opt_state'][1][0].mu['layers']['mlp']['wi']
  return {'losses': np.asarray(loss), 'grad_norms': np.asarray(norm),
          'shard_shape_param': np.asarray(wi.addressable_shards[0].data.shape),
          'shard_shape_mu': np.asarray(mu.addressable_shards[0].data.shape),
          **{'grad' + k: v for k, v in flat(grads).items()},
          **{'param' + k: v for k, v in flat(state['params']).items()}}


def restore_across_meshes(cfg: ModelConfig, out_dir: str) -> None:
  """Saves a trained state on one mesh, restores it on two others."""
  opt = optimizer()
  state = init_state(cfg, opt)
  batches = make_batches('bloom', 1)
  mc = mesh_lib.MeshConfig.parse('data=2,tensor=2,pipeline=2',
                                 microbatches=2)
  mesh = mesh_lib.make_mesh(mc)
  step, _ = step_lib.make_train_step(cfg, opt, mesh_cfg=mc, mesh=mesh)
  state = jax.device_put(state, state_lib.state_shardings(state, cfg, mc, mesh))
  state, _ = step(state, jax.device_put(
      batches[0], mesh_lib.batch_shardings(batches[0], mesh)))
  result = {'saved' + k: v for k, v in flat(state).items()}
  with tempfile.TemporaryDirectory() as d:
    manager = ocp.CheckpointManager(d)
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    targets = {'fsdp4_tensor2': mesh_lib.MeshConfig.parse('fsdp=4,tensor=2',
                                                          zero1=True),
               'single': mesh_lib.MeshConfig()}
    for name, mc2 in targets.items():
      mesh2 = mesh_lib.make_mesh(mc2, jax.devices()[:mc2.num_devices])
      shardings = state_lib.state_shardings(state, cfg, mc2, mesh2)
      abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          state, shardings)
      restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
      leaf = restored['params']['layers']['mlp']['wi']
      result[f'devices_{name}'] = np.asarray(len(leaf.sharding.device_set))
      result |= {name + k: v for k, v in flat(restored).items()}
    manager.close()
  np.savez(os.path.join(out_dir, 'restore.npz'), **result)


def tensor_parallel_shapes(cfg: ModelConfig) -> dict:
  """Dims of every array in the compiled tensor=8 train step (per device)."""
  opt = optimizer()
  state = init_state(cfg, opt)
  mc = mesh_lib.MeshConfig.parse('tensor=8')
  mesh = mesh_lib.make_mesh(mc)
  step, _ = step_lib.make_train_step(cfg, opt, mesh_cfg=mc, mesh=mesh)
  state = jax.device_put(state, state_lib.state_shardings(state, cfg, mc, mesh))
  b = make_batches('bloom', 1)[0]
  b = jax.device_put(b, mesh_lib.batch_shardings(b, mesh))
  text = step.lower(state, b).compile().as_text()
  single, _ = step_lib.make_train_step(cfg, opt)
  state = init_state(cfg, opt)
  b = make_batches('bloom', 1)[0]
  return {'hlo': text, 'single_hlo': single.lower(state, b).compile().as_text(),
          'padded_vocab': cfg.padded_vocab_size}


# The default suite's pairs: for bloom every layout but the two pure
# pipelines (its 'combo' pipelines, glm runs 'circular' and ul2 'gpipe'); for
# glm and ul2 the layouts their remat and prefix patterns stress most. 'rest' is the others
# but those that tests/test_attention_sharded.py's wide run already trains
# against the one-device step (glm and ul2 on 'combo' and 'fsdp', with the
# blockwise and pallas attention).
DEFAULT_PAIRS = {'bloom': ('data', 'zero1', 'fsdp', 'tensor', 'combo'),
                 'glm': ('tensor', 'circular'), 'ul2': ('fsdp', 'gpipe')}
COVERED_ELSEWHERE = {'bloom': (), 'glm': ('combo', 'fsdp'),
                     'ul2': ('combo', 'fsdp')}


def pairs(part: str | None) -> dict[str, list[str]]:
  """family -> the layouts `part` runs ('default', 'rest' or None: all)."""
  if part is None:
    return {f: list(LAYOUTS) for f in FAMILIES}
  if part == 'default':
    chosen = {f: list(DEFAULT_PAIRS[f]) for f in FAMILIES}
  else:
    chosen = {f: [l for l in LAYOUTS if l not in DEFAULT_PAIRS[f]
                  and l not in COVERED_ELSEWHERE[f]] for f in FAMILIES}
  return {f: ls for f, ls in chosen.items() if ls}


def main(out_dir: str, part: str | None = None) -> None:
  assert jax.device_count() == 8, jax.devices()
  for family, layouts in pairs(part).items():
    cfg = FAMILIES[family]
    os.makedirs(os.path.join(out_dir, family), exist_ok=True)
    batches = make_batches(family, STEPS)
    for layout in [None, *layouts]:
      name = layout or 'single'
      np.savez(os.path.join(out_dir, family, name + '.npz'),
               **run(cfg, batches, layout))
      print(f'{family} {name} done', flush=True)
  if part == 'rest':
    print('all done', flush=True)
    return
  restore_across_meshes(FAMILIES['bloom'], out_dir)
  with open(os.path.join(out_dir, 'hlo.json'), 'w') as f:
    json.dump(tensor_parallel_shapes(FAMILIES['bloom']), f)
  print('all done', flush=True)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
