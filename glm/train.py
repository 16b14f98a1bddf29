"""The training loop behind `glm train` (walking skeleton: causal LM).

Reads top to bottom: data and tokenizer -> model and optimiser -> restore
the latest checkpoint in the workdir if any -> jitted steps with metrics and
checkpoints -> held-out loss, a greedy sample, and a self-describing model
folder `W/model` that `glm score` reads.

Workdir layout:
  W/config.gin        the operative gin config of the run
  W/metrics.jsonl     one JSON object per logged step (step, loss, lr, ...)
  W/checkpoints/      orbax CheckpointManager (params, opt state, step)
  W/model/            final self-describing checkpoint (glm.checkpoint)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from glm import checkpoint as model_checkpoint
from glm import decoding
from glm import losses
from glm import transformer
from glm.config import ModelConfig


class TrainError(ValueError):
  """A run that cannot start, with the fix."""


def make_optimizer(*, learning_rate: float, warmup_steps: int,
                   total_steps: int, min_lr_ratio: float, weight_decay: float,
                   b1: float, b2: float, grad_clip: float
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate,
      warmup_steps=max(1, min(warmup_steps, total_steps - 1)),
      decay_steps=max(total_steps, 2), end_value=learning_rate * min_lr_ratio)

  def decay_mask(params):
    # Decay matrices only: no biases, norm scales or embedding tables.
    def keep(path, leaf):
      name = getattr(path[-1], 'key', '')
      return leaf.ndim >= 2 and name not in ('embedding',
                                             'position_embedding')
    return jax.tree_util.tree_map_with_path(keep, params)

  opt = optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8,
                  weight_decay=weight_decay, mask=decay_mask))
  return opt, schedule


def make_train_step(cfg: ModelConfig, opt: optax.GradientTransformation):
  model = transformer.Transformer(cfg)

  def loss_fn(params, batch):
    logits = model.apply({'params': params}, batch)
    total, count = losses.cross_entropy(logits, batch['targets'],
                                        batch['loss_mask'])
    return total / jnp.maximum(count, 1.0)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {'loss': loss,
                               'grad_norm': optax.global_norm(grads)}

  @jax.jit
  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch)
    return losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])

  return train_step, eval_step


def _append_jsonl(path: str, row: dict) -> None:
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
          learning_rate: float = 3e-3,
          warmup_steps: int = 30,
          min_lr_ratio: float = 0.1,
          weight_decay: float = 0.1,
          b1: float = 0.9,
          b2: float = 0.95,
          grad_clip: float = 1.0,
          seed: int = 0,
          data: Any = None,
          data_dir: str = '.cache/data',
          tokenizer_vocab_size: int = 4096,
          eval_batches: int = 8,
          sample_prompt: str = 'The command',
          sample_tokens: int = 32,
          keep_checkpoints: int = 2) -> dict[str, Any]:
  """Trains on a task mixture of the default corpus; returns final metrics.

  `data` is a `glm.data.pipeline.DataConfig` (default: causal LM only).
  """
  from glm.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = model_config
  for name, value in (('train_steps', train_steps), ('batch_size', batch_size),
                      ('seq_len', seq_len),
                      ('checkpoint_every', checkpoint_every),
                      ('log_every', log_every)):
    if not isinstance(value, int) or value < 1:
      raise TrainError(f'{name}={value!r} must be a positive integer; set it '
                       f'with --gin.{name.upper()}=N.')
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

  # Data --------------------------------------------------------------------
  data = data or pipeline.DataConfig()
  train_split = pipeline.open_split(os.path.abspath(data_dir), 'train',
                                    vocab_size=tokenizer_vocab_size, seed=seed)
  tok = train_split.tok
  tok_path = tok.model_path
  if tok.vocab_size > cfg.vocab_size:
    raise TrainError(f'tokenizer {tok_path} has {tok.vocab_size} ids but the '
                     f'model only {cfg.vocab_size}; raise '
                     'ModelConfig.vocab_size.')
  train_data = pipeline.Pipeline(train_split, data, seq_len=seq_len,
                                 batch_size=batch_size, seed=seed)
  valid_split = pipeline.SplitData(train_split.corpus_dir, tok, 'valid')
  eval_data = pipeline.Pipeline(valid_split, data, seq_len=seq_len,
                                batch_size=batch_size, seed=seed
                                ).eval_batches(eval_batches)
  print(f'glm train: data mixture {dict(data.mixture)}', flush=True)

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.gin'), 'w') as f:
    f.write(gin.operative_config_str())

  # Model and optimiser -------------------------------------------------------
  opt, schedule = make_optimizer(
      learning_rate=learning_rate, warmup_steps=warmup_steps,
      total_steps=train_steps, min_lr_ratio=min_lr_ratio,
      weight_decay=weight_decay, b1=b1, b2=b2, grad_clip=grad_clip)
  params = transformer.init_params(cfg, jax.random.PRNGKey(seed))
  opt_state = opt.init(params)
  train_step, eval_step = make_train_step(cfg, opt)

  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep_checkpoints,
                                           create=True))
  start = 0
  latest = manager.latest_step()
  if latest is not None:
    state = manager.restore(latest, args=ocp.args.StandardRestore(
        {'params': params, 'opt_state': opt_state}))
    params, opt_state = state['params'], state['opt_state']
    start = latest
    print(f'glm train: resumed from step {latest} in {workdir}/checkpoints',
          flush=True)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  print(f'glm train: {n_params:,} params, {train_steps} steps of '
        f'{batch_size}x{seq_len} tokens, workdir {workdir}', flush=True)

  # Loop ----------------------------------------------------------------------
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  t_start = time.time()
  t_last, step_last = t_start, start
  loss = None
  if start >= train_steps:
    print(f'glm train: already at step {start} of {train_steps}; evaluating '
          'only.', flush=True)
  for step in range(start, train_steps):
    batch = {k: jnp.asarray(v) for k, v in train_data.batch(step).items()}
    params, opt_state, m = train_step(params, opt_state, batch)
    done = step + 1
    if done % log_every == 0 or done == train_steps or done == start + 1:
      loss = float(m['loss'])
      if not math.isfinite(loss):
        raise TrainError(f'loss is {loss} at step {done}; lower the '
                         'learning rate or check the data. Last checkpoint: '
                         f'{manager.latest_step()}.')
      now = time.time()
      dt = (now - t_last) / max(done - step_last, 1)
      t_last, step_last = now, done
      row = {'step': done, 'loss': loss, 'lr': float(schedule(step)),
             'grad_norm': float(m['grad_norm']), 'step_time_s': dt,
             'tokens_per_s': batch_size * seq_len / dt if dt > 0 else 0.0}
      _append_jsonl(metrics_path, row)
      if done == start + 1:  # the first step includes compilation
        progress = f'compiled and ran the first step in {dt:.1f}s'
      else:
        progress = (f'{row["tokens_per_s"]:,.0f} tok/s  ETA '
                    f'{_fmt_eta(dt * (train_steps - done))}')
      print(f'step {done:>6}/{train_steps}  loss {loss:.4f}  lr '
            f'{row["lr"]:.2e}  {progress}', flush=True)
    if done % checkpoint_every == 0 or done == train_steps:
      manager.save(done, args=ocp.args.StandardSave(
          {'params': params, 'opt_state': opt_state}))
  manager.wait_until_finished()

  # Evaluate, sample, export --------------------------------------------------
  total = count = 0.0
  for b in eval_data:
    s, c = eval_step(params, {k: jnp.asarray(v) for k, v in b.items()})
    total, count = total + float(s), count + float(c)
  eval_loss = total / max(count, 1.0)
  print(f'held-out loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.1f}'
        f') over {int(count)} tokens', flush=True)
  prompt = tok.encode(sample_prompt)
  new = decoding.greedy_generate(cfg, params, prompt,
                                 min(sample_tokens, cfg.max_len - len(prompt)),
                                 eos_id=tok.eos_id)
  sample = tok.decode(prompt + new)
  print(f'greedy sample: {sample!r}', flush=True)
  model_dir = model_checkpoint.save(
      os.path.join(workdir, 'model'), cfg, params, tokenizer_path=tok_path,
      meta={'step': train_steps}, overwrite=True)
  result = {'step': train_steps, 'train_loss': loss, 'eval_loss': eval_loss,
            'sample': sample, 'model_dir': model_dir,
            'elapsed_s': time.time() - t_start}
  with open(os.path.join(workdir, 'final.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(f'glm train: done; model written to {model_dir}', file=sys.stderr,
        flush=True)
  return result
