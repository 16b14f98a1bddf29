"""The trainer behind `glm train`: gin at the edge, a loop you can read.

Top to bottom: validate the run -> data (corpus, tokenizer, task mixture) ->
refuse a workdir that holds another run -> model, optimiser, per-step batch
sizes and learning rates -> restore the latest checkpoint -> jitted steps
(gradient accumulation over micro-batches; NaN / spike steps skipped) with
metrics, evals and async checkpoints, a save on SIGTERM / SIGINT -> held-out
loss, a greedy sample and the self-describing model folder `W/model`.

Workdir layout:
  W/config.gin        the operative gin config (also in TensorBoard as text)
  W/run.json          the model config of the run, checked on every restart
  W/metrics.jsonl     one JSON object per logged step
  W/eval.jsonl        held-out loss per task and per language
  W/tensorboard/      event files (scalars and the config)
  W/checkpoints/      orbax CheckpointManager: params, opt state, loss EMA
  W/model/            final self-describing checkpoint (glm.checkpoint)

Exact resume: batches are a pure function of (seed, step), dropout keys are
fold_in(seed, step) and every piece of state is checkpointed, so a run killed
after a checkpoint and restarted reproduces the uninterrupted losses bit for
bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from glm import checkpoint as model_checkpoint
from glm import decoding
from glm import losses
from glm import mesh as mesh_lib
from glm import model_info
from glm import optimizers
from glm import transformer
from glm.config import ModelConfig
from glm.tensorboard import EventWriter

# Peak FLOP/s of named accelerators (dense bf16), for MFU.
PEAK_FLOPS = {'a100': 312e12, 'h100': 989e12, 'h200': 989e12,
              'tpu_v4': 275e12, 'tpu_v5e': 197e12}


class TrainError(ValueError):
  """A run that cannot start, with the fix."""


@dataclasses.dataclass(frozen=True)
class FailurePolicy:
  """What to do with bad steps (GLM-130B fought loss spikes)."""
  max_bad_steps: int = 5          # stop after this many consecutive skips
  spike_factor: float = 0.0       # skip when loss > factor * running mean; 0: off
  ema_decay: float = 0.99         # running mean of the loss


def make_train_step(cfg: ModelConfig, opt: optax.GradientTransformation, *,
                    z_loss: float = 0.0, policy: FailurePolicy = FailurePolicy(),
                    mesh_cfg: mesh_lib.MeshConfig | None = None,
                    mesh: jax.sharding.Mesh | None = None):
  """Returns jitted (train_step, eval_step).

  train_step(state, batch [A, B, T]) accumulates gradients over A micro-
  batches (token-weighted), then applies the update unless the loss or the
  gradients are not finite, or the loss spikes; such steps leave the state
  unchanged but count in `bad_steps`.

  With a `mesh`, both run sharded: parameters, gradients and optimiser state
  as `glm.mesh.state_shardings` says (FSDP, ZeRO-1, tensor, pipeline stages),
  activations by the logical constraints in the model, the batch split over
  the data axes; the layer stack is pipelined when `mesh_cfg.pipeline` > 1.
  """
  sharded = mesh is not None
  if sharded:
    mesh_cfg = mesh_cfg or mesh_lib.MeshConfig()
    model = transformer.Transformer(cfg, mesh_cfg, mesh)
    param_shardings = mesh_lib.to_shardings(mesh_lib.param_specs(cfg), mesh)
  else:
    model = transformer.Transformer(cfg)

  def loss_sums(params, batch, rng):
    kw = {} if rng is None else {'deterministic': False,
                                 'rngs': {'dropout': rng}}
    x, w = model.apply({'params': params}, batch, output_layer=False, **kw)
    return losses.output_loss(x, w, batch['targets'], batch['loss_mask'],
                              vocab_size=cfg.vocab_size, z_loss=z_loss)

  def micro_grads(params, micro, rng):
    (total, count), grads = jax.value_and_grad(loss_sums, has_aux=True)(
        params, micro, rng)
    return total, count, grads

  def train_step(state, batch, rng=None):
    """rng: the step's dropout key (fold_in(seed key, step)), or None."""
    params = state['params']
    num_micro = jax.tree.leaves(batch)[0].shape[0]

    def body(carry, xs):
      micro, i = xs
      total, count, grads = carry
      key = None if rng is None else jax.random.fold_in(rng, i)
      t, c, g = micro_grads(params, micro, key)
      return (total + t, count + c,
              jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (total, count, grads), _ = jax.lax.scan(
        body, (jnp.float32(0), jnp.float32(0), zeros),
        (batch, jnp.arange(num_micro)))
    count = jnp.maximum(count, 1.0)
    loss = total / count
    grads = jax.tree.map(lambda g: g / count, grads)
    if sharded:  # gradients live where their parameters live
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ema = state['loss_ema']
    spike = ((policy.spike_factor > 0) & (ema > 0)
             & (loss > policy.spike_factor * ema))
    ok = finite & ~spike
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt = opt.update(safe_grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(ok, n, o), new, old)
    new_ema = jnp.where(ema > 0, policy.ema_decay * ema
                        + (1 - policy.ema_decay) * loss, loss)
    new_state = {
        'params': keep(new_params, params),
        'opt_state': keep(new_opt, state['opt_state']),
        'loss_ema': jnp.where(ok, new_ema, ema),
        'bad_steps': jnp.where(ok, 0, state['bad_steps'] + 1),
    }
    return new_state, {'loss': loss, 'grad_norm': grad_norm, 'skipped': ~ok,
                       'nonfinite': ~finite, 'tokens': count}

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch)
    return losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])

  if not sharded:
    return jax.jit(train_step), jax.jit(eval_step)
  return (_ShardedStep(train_step, cfg, mesh_cfg, mesh, state_out=True),
          _ShardedStep(eval_step, cfg, mesh_cfg, mesh, state_out=False))


class _ShardedStep:
  """jit with the state's shardings, traced under the mesh and axis rules.

  The output state keeps the shardings of `glm.mesh.state_shardings` (they
  are computed from the first state it sees); inputs keep theirs.
  """

  def __init__(self, fn, cfg, mesh_cfg, mesh, *, state_out: bool):
    self.fn, self.cfg, self.mesh_cfg, self.mesh = fn, cfg, mesh_cfg, mesh
    self.state_out = state_out
    self.jitted = None

  def _jit(self, state):
    out = None
    if self.state_out:
      out = (mesh_lib.state_shardings(state, self.cfg, self.mesh_cfg,
                                      self.mesh), None)
    return jax.jit(self.fn, out_shardings=out)

  def __call__(self, *args):
    if self.jitted is None:
      self.jitted = self._jit(args[0])
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.rules()):
      return self.jitted(*args)

  def lower(self, *args):
    """Lowers without running (for `glm plan` style checks)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.rules()):
      return self._jit(args[0]).lower(*args)


def measure_peak_flops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul in the compute dtype on this machine
  (the best of `repeats` timings, so a busy moment does not lower it)."""
  dt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  a = jnp.ones((n, n), dt)
  f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


class _Progress:
  """A one-line progress bar on a terminal; plain log lines otherwise."""

  def __init__(self, total: int):
    self.total = total
    self.tty = sys.stdout.isatty()

  def update(self, step: int, text: str) -> None:
    if self.tty:
      width = 24
      done = int(width * step / self.total)
      bar = '#' * done + '.' * (width - done)
      end = '\n' if step == self.total else ''
      print(f'\r[{bar}] {text}', end=end, flush=True)
    else:
      print(text, flush=True)

  def message(self, text: str) -> None:
    print(('\n' if self.tty else '') + text, flush=True)


@contextlib.contextmanager
def _preemption_flag():
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""
  caught = {'signal': None}
  handler = lambda signum, frame: caught.update(signal=signum)
  previous = {s: signal.signal(s, handler)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _check_workdir(workdir: str, cfg: ModelConfig) -> None:
  """Refuses a workdir whose recorded run has another model config."""
  path = os.path.join(workdir, 'run.json')
  if not os.path.isfile(path):
    return
  with open(path) as f:
    recorded = json.load(f).get('model_config', {})
  ours = cfg.to_dict()
  diff = sorted(k for k in set(recorded) | set(ours)
                if recorded.get(k) != ours.get(k))
  if diff:
    k = diff[0]
    raise TrainError(
        f'workdir {workdir} holds a run with another model config '
        f'({k}: {recorded.get(k)!r} there, {ours.get(k)!r} here; '
        f'{len(diff)} fields differ); use a new --workdir.')


def _truncate_jsonl(path: str, after_step: int) -> None:
  """Drops rows logged after the checkpoint a run resumes from."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    rows = [l for l in f if l.strip() and json.loads(l)['step'] <= after_step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(rows)
  os.replace(tmp, path)


class _NoBoard:
  """TensorBoard stand-in for the processes that do not write files."""

  def text(self, *args):
    pass

  def scalars(self, *args):
    pass

  def close(self):
    pass


def _append_jsonl(path: str, row: dict) -> None:
  if jax.process_index():  # one process writes the run's files
    return
  with open(path, 'a', encoding='utf-8') as f:
    f.write(json.dumps(row) + '\n')


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 60}m{seconds % 60:02d}s'


@gin.configurable(denylist=['workdir'])
def train(*, workdir: str,
          model_config: ModelConfig = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          seq_len: int = gin.REQUIRED,
          checkpoint_every: int = gin.REQUIRED,
          log_every: int = 10,
          eval_every: int = 0,
          micro_batch_size: int = 0,
          optimizer: optimizers.OptimizerConfig | None = None,
          batch_ramp: optimizers.BatchRamp | None = None,
          failure_policy: FailurePolicy | None = None,
          seed: int = 0,
          data: Any = None,
          data_dir: str = '.cache/data',
          tokenizer_vocab_size: int = 4096,
          init_checkpoint: str | None = None,
          eval_batches: int = 8,
          peak_flops: float | str | None = None,
          sample_prompt: str = 'The command',
          sample_tokens: int = 32,
          keep_checkpoints: int = 2,
          mesh: mesh_lib.MeshConfig | None = None) -> dict[str, Any]:
  """Trains on a task mixture; returns final metrics.

  `data` is a `glm.data.pipeline.DataConfig` (default: causal LM only);
  `init_checkpoint` a glm checkpoint folder to fine-tune from; `peak_flops`
  a number, a name in PEAK_FLOPS, or None to measure a matmul here; `mesh`
  the device mesh (default: data parallel over every device).
  """
  from glm.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = model_config
  if init_checkpoint:
    # Fine-tuning: the architecture comes from the self-describing checkpoint;
    # the run only chooses numerics (dtype, scan, remat).
    cfg = model_checkpoint.load_config(init_checkpoint).replace(
        dtype=cfg.dtype, scan_layers=cfg.scan_layers,
        remat_policy=cfg.remat_policy)
  opt_cfg = optimizer or optimizers.OptimizerConfig()
  ramp = batch_ramp or optimizers.BatchRamp()
  policy = failure_policy or FailurePolicy()
  micro = micro_batch_size or batch_size
  for name, value in (('train_steps', train_steps), ('batch_size', batch_size),
                      ('seq_len', seq_len),
                      ('checkpoint_every', checkpoint_every),
                      ('log_every', log_every)):
    if not isinstance(value, int) or value < 1:
      raise TrainError(f'{name}={value!r} must be a positive integer; set it '
                       f'with --gin.{name.upper()}=N.')
  if batch_size % micro:
    raise TrainError(f'BATCH_SIZE={batch_size} is not divisible by '
                     f'micro_batch_size={micro}; pick a divisor.')
  if seq_len > cfg.max_len:
    raise TrainError(f'SEQ_LEN={seq_len} is longer than the model allows '
                     f'(ModelConfig.max_len={cfg.max_len}); lower SEQ_LEN or '
                     'raise max_len.')
  if tokenizer_vocab_size % 128:
    raise TrainError(f'tokenizer_vocab_size={tokenizer_vocab_size} must be a '
                     'multiple of 128 (e.g. 4096) so that the embedding '
                     'needs no padding rows.')
  if tokenizer_vocab_size > cfg.vocab_size:
    raise TrainError(
        f'tokenizer vocab {tokenizer_vocab_size} is larger than the model '
        f'vocab {cfg.vocab_size}; set ModelConfig.vocab_size >= '
        f'{tokenizer_vocab_size}.')
  if isinstance(peak_flops, str) and peak_flops not in PEAK_FLOPS:
    raise TrainError(f'peak_flops={peak_flops!r} is not one of '
                     f'{sorted(PEAK_FLOPS)}; give a number or leave it unset '
                     'to measure.')
  mesh_cfg = mesh or mesh_lib.MeshConfig(data=jax.device_count())
  try:
    mesh_lib.validate(mesh_cfg, cfg, micro_batch=micro,
                      num_devices=jax.device_count())
  except mesh_lib.MeshError as e:
    raise TrainError(str(e)) from None
  batch_sizes = ramp.batch_sizes(batch_size, micro, train_steps)
  workdir = os.path.abspath(workdir)
  _check_workdir(workdir, cfg)
  lead = jax.process_index() == 0  # the one process that writes files
  device_mesh = (mesh_lib.make_mesh(mesh_cfg)
                 if mesh_cfg.num_devices > 1 else None)

  # Data --------------------------------------------------------------------
  data = data or pipeline.DataConfig()
  train_split = pipeline.open_split(os.path.abspath(data_dir), 'train',
                                    vocab_size=tokenizer_vocab_size, seed=seed)
  tok = train_split.tok
  if tok.vocab_size > cfg.vocab_size:
    raise TrainError(f'tokenizer {tok.model_path} has {tok.vocab_size} ids '
                     f'but the model only {cfg.vocab_size}; raise '
                     'ModelConfig.vocab_size.')
  train_data = pipeline.Pipeline(train_split, data, seq_len=seq_len,
                                 batch_size=batch_size, seed=seed)
  valid_split = pipeline.SplitData(train_split.corpus_dir, tok, 'valid')
  tasks = [t for t, r in data.mixture if r > 0]
  eval_sets = {'all': pipeline.Pipeline(valid_split, data, seq_len=seq_len,
                                        batch_size=micro, seed=seed
                                        ).eval_batches(eval_batches)}
  if eval_every:
    if len(tasks) > 1:
      for t in tasks:
        eval_sets[f'task/{t}'] = pipeline.Pipeline(
            valid_split, pipeline.DataConfig.for_task(t), seq_len=seq_len,
            batch_size=micro, seed=seed).eval_batches(max(1, eval_batches // 4))
    for lang, batches in pipeline.language_eval_batches(
        valid_split, seq_len=seq_len, batch_size=micro,
        num_batches=1).items():
      eval_sets[f'lang/{lang}'] = batches

  def micro_batches(step: int) -> dict[str, jnp.ndarray]:
    rows = int(batch_sizes[step])
    if device_mesh is None:
      b = train_data.batch(step, rows=rows)
      # [B, T] -> [A, B / A, T] micro-batches
      return {k: jnp.asarray(v.reshape(-1, micro, *v.shape[1:]))
              for k, v in b.items()}
    return mesh_lib.put_batch(
        lambda idx: train_data.rows(step, idx), rows // micro, micro,
        device_mesh)

  # Workdir -------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  if lead:
    with open(os.path.join(workdir, 'config.gin'), 'w') as f:
      f.write(gin.operative_config_str())
    with open(os.path.join(workdir, 'run.json'), 'w') as f:
      json.dump({'model_config': cfg.to_dict()}, f, indent=2, sort_keys=True)
  board = EventWriter(os.path.join(workdir, 'tensorboard')) if lead else (
      _NoBoard())
  board.text(0, 'config', gin.operative_config_str())

  # Model, optimiser, state -----------------------------------------------------
  lrs = optimizers.lr_table(opt_cfg, batch_sizes * seq_len)
  opt = optimizers.make_optimizer(opt_cfg, lrs)
  if init_checkpoint:
    _, params = model_checkpoint.load(init_checkpoint)
    if 'layers' in params and not cfg.scan_layers:
      params = transformer.unstack_layers(params, cfg.num_layers)
    elif 'layers' not in params and cfg.scan_layers:
      params = transformer.stack_layers(params, cfg.num_layers)
    params = jax.tree.map(jnp.asarray, params)
  else:
    params = None

  def new_state(params):
    if params is None:
      params = transformer.init_params(cfg, jax.random.PRNGKey(seed))
    return {'params': params, 'opt_state': opt.init(params),
            'loss_ema': jnp.float32(0), 'bad_steps': jnp.int32(0)}

  if device_mesh is None:
    state = new_state(params)
    shardings = None
  else:  # initialised in place, already sharded
    shardings = mesh_lib.state_shardings(jax.eval_shape(new_state, params),
                                         cfg, mesh_cfg, device_mesh)
    state = jax.jit(new_state, out_shardings=shardings)(params)
  train_step, eval_step = make_train_step(
      cfg, opt, z_loss=opt_cfg.z_loss, policy=policy,
      mesh_cfg=mesh_cfg, mesh=device_mesh)
  dropout_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)

  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep_checkpoints, create=True,
          enable_async_checkpointing=True))
  start = 0
  latest = manager.latest_step()
  if latest is not None:
    # Restored straight into this run's shardings, whatever mesh saved it.
    state = manager.restore(latest, args=ocp.args.StandardRestore(state))
    start = latest
    print(f'glm train: resumed from step {latest} in {workdir}/checkpoints',
          flush=True)
  if lead:
    for name in ('metrics.jsonl', 'eval.jsonl'):
      _truncate_jsonl(os.path.join(workdir, name), start)

  info = model_info.info(cfg, seq_len)
  if peak_flops is None:
    peak = measure_peak_flops(cfg.dtype)
    peak_source = f'measured here ({cfg.dtype} matmul)'
  else:
    peak = PEAK_FLOPS.get(peak_flops, peak_flops)
    peak_source = f'configured ({peak_flops})'
  print(f'glm train: {info["params"]:,} params, {train_steps} steps of '
        f'{batch_size}x{seq_len} tokens (micro-batch {micro}), workdir '
        f'{workdir}; MFU against {peak / 1e9:,.0f} GFLOP/s {peak_source}',
        flush=True)
  print(f'glm train: data mixture {dict(data.mixture)}', flush=True)
  if device_mesh is not None:
    print(f'glm train: mesh {mesh_cfg.describe()} over '
          f'{jax.device_count()} devices in {jax.process_count()} '
          f'process(es)' + (f'; {mesh_cfg.schedule} pipeline, '
                            f'{mesh_cfg.num_microbatches} microbatches x '
                            f'{mesh_cfg.repeats} repeats, bubble '
                            f'{mesh_cfg.bubble_fraction():.1%}'
                            if mesh_cfg.pipeline > 1 else '')
          + (', ZeRO-1' if mesh_cfg.zero1 else ''), flush=True)
    if jax.process_count() > 1:
      mine = mesh_lib.local_rows(device_mesh, micro)
      print(f'glm train: process {jax.process_index()} builds rows '
            f'{mine[0]}..{mine[-1]} ({len(mine)} of {micro}) of each '
            'micro-batch', flush=True)

  def evaluate(params, step: int) -> float:
    row = {'step': step}
    for name, batches in eval_sets.items():
      total = count = 0.0
      for b in batches:
        b = ({k: jnp.asarray(v) for k, v in b.items()} if device_mesh is None
             else mesh_lib.put_global(b, device_mesh))
        s, c = eval_step(params, b)
        total, count = total + float(s), count + float(c)
      row[name] = total / max(count, 1.0)
    _append_jsonl(os.path.join(workdir, 'eval.jsonl'), row)
    board.scalars(step, {f'eval/{k}': v for k, v in row.items()
                         if k != 'step'})
    return row['all']

  # Loop ----------------------------------------------------------------------
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  progress = _Progress(train_steps)
  t_start = t_last = time.time()
  step_last, skipped = start, 0
  loss = None
  if start >= train_steps:
    progress.message(f'glm train: already at step {start} of {train_steps};'
                     ' evaluating only.')
  with _preemption_flag() as preempted:
    for step in range(start, train_steps):
      rng = (jax.random.fold_in(dropout_key, step)
             if cfg.dropout_rate > 0 else None)
      state, m = train_step(state, micro_batches(step), rng)
      done = step + 1
      if bool(m['skipped']):
        skipped += 1
        reason = 'non-finite loss or gradients' if bool(m['nonfinite']) else (
            'a loss spike')
        progress.message(f'glm train: step {done}: skipped the update '
                         f'({reason}, loss {float(m["loss"]):.4g}).')
        if int(state['bad_steps']) >= policy.max_bad_steps:
          manager.wait_until_finished()
          raise TrainError(
              f'{policy.max_bad_steps} consecutive bad steps up to step '
              f'{done}; the last good checkpoint is step '
              f'{manager.latest_step()} in {workdir}/checkpoints: lower the '
              'learning rate or check the data, then resume.')
      if done % log_every == 0 or done == train_steps or done == start + 1:
        jax.block_until_ready(m['loss'])
        now = time.time()
        dt = (now - t_last) / max(done - step_last, 1)
        t_last, step_last = now, done
        loss = float(m['loss'])
        tokens = int(batch_sizes[step]) * seq_len
        tps = tokens / dt if dt > 0 else 0.0
        row = {'step': done, 'loss': loss, 'lr': float(lrs[step]),
               'grad_norm': float(m['grad_norm']), 'tokens_per_s': tps,
               'step_time_s': dt, 'mfu': info['flops_per_token'] * tps / peak,
               'batch_size': int(batch_sizes[step]), 'skipped_steps': skipped}
        _append_jsonl(metrics_path, row)
        board.scalars(done, {f'train/{k}': v for k, v in row.items()
                             if k != 'step'})
        if done == start + 1:
          text = f'compiled and ran the first step in {dt:.1f}s'
        else:
          text = (f'{tps:,.0f} tok/s  MFU {row["mfu"]:.1%}  ETA '
                  f'{_fmt_eta(dt * (train_steps - done))}')
        progress.update(done, f'step {done:>6}/{train_steps}  loss '
                        f'{loss:.4f}  lr {row["lr"]:.2e}  {text}')
      if eval_every and done % eval_every == 0:
        evaluate(state['params'], done)
      if done % checkpoint_every == 0 or done == train_steps:
        manager.save(done, args=ocp.args.StandardSave(state))
      if preempted['signal'] is not None:
        if done % checkpoint_every and done != train_steps:
          manager.save(done, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        board.close()
        progress.message(f'glm train: caught signal {preempted["signal"]}; '
                         f'saved step {done}; rerun the same command to '
                         'resume.')
        raise SystemExit(128 + preempted['signal'])
  manager.wait_until_finished()

  # Evaluate, sample, export --------------------------------------------------
  params = state['params']
  eval_loss = evaluate(params, train_steps)
  if jax.process_count() > 1:  # every process gets the full weights
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = multihost_utils.process_allgather(params, tiled=True)
  print(f'held-out loss {eval_loss:.4f} (perplexity '
        f'{math.exp(min(eval_loss, 50)):.1f})', flush=True)
  prompt = tok.encode(sample_prompt)
  new = decoding.greedy_generate(cfg, params, prompt,
                                 min(sample_tokens, cfg.max_len - len(prompt)),
                                 eos_id=tok.eos_id)
  sample = tok.decode(prompt + new)
  print(f'greedy sample: {sample!r}', flush=True)
  board.close()
  model_dir = os.path.join(workdir, 'model')
  result = {'step': train_steps, 'train_loss': loss, 'eval_loss': eval_loss,
            'skipped_steps': skipped, 'sample': sample,
            'model_dir': model_dir, 'elapsed_s': time.time() - t_start}
  if not lead:
    return result
  model_checkpoint.save(model_dir, cfg, params, tokenizer_path=tok.model_path,
                        meta={'step': train_steps}, overwrite=True)
  with open(os.path.join(workdir, 'final.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(f'glm train: done; model written to {model_dir}', file=sys.stderr,
        flush=True)
  return result
