"""The trainer behind `glm train`: gin at the edge, a loop you can read.

`train(...)` reads top to bottom as named steps:

  resolve      check the run's settings, the mesh and the workdir
  build data   corpus, tokenizer, the task mixture, held-out sets
  restore      the model, optimiser and state: fresh, fine-tuned from a
               checkpoint, or the latest checkpoint of this workdir
  loop         step -> log -> evaluate -> checkpoint (+ a save on SIGTERM)
  finish       held-out loss, a greedy sample, the model folder `W/model`

The workdir layout is in `glm.training.workdir`. Exact resume: batches are a
pure function of (seed, step), dropout keys are fold_in(seed, step) and the
whole train state (`glm.training.state`) is checkpointed, so a run killed
after a checkpoint and restarted reproduces the uninterrupted losses bit for
bit on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from glm.data import pipeline
from glm.evaluation import downstream
from glm.evaluation import heldout
from glm.inference import decoding
from glm.inference import generate as generate_lib
from glm.model import checkpoint as model_checkpoint
from glm.model.config import ModelConfig
from glm.model.layers import precision, resolve_dtype
from glm.model import info as model_info
from glm.model import fused
from glm.model import transformer
from glm.parallel import mesh as mesh_lib
from glm.training import checkpoints
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib
from glm.training.step import FailurePolicy
from glm.training import workdir as workdir_lib
from glm.training.workdir import TrainError


# Peak FLOP/s of named accelerators (dense bf16), for MFU.
# The end-of-run sampled continuation (next to the greedy one).
SAMPLE_SAMPLING = generate_lib.Sampling(temperature=0.8, top_p=0.95)

PEAK_FLOPS = {'a100': 312e12, 'h100': 989e12, 'h200': 989e12,
              'tpu_v4': 275e12, 'tpu_v5e': 197e12}


@dataclasses.dataclass(frozen=True)
class Run:
  """A run's resolved settings (what `train`'s arguments come to)."""
  workdir: str
  cfg: ModelConfig
  train_steps: int
  batch_sizes: np.ndarray          # [train_steps] global batch of each step
  batch_size: int
  micro: int                       # rows per accumulation round
  seq_len: int
  seed: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  policy: FailurePolicy
  mesh_cfg: mesh_lib.MeshConfig
  mesh: jax.sharding.Mesh | None   # None on one device
  settings: dict                   # what run.json records and compares
  changes: list[str]               # settings that differ from the workdir's


@dataclasses.dataclass(frozen=True)
class RunData:
  """What the run reads: the tokenizer, train batches and held-out sets."""
  tokenizer: Any
  train: pipeline.Pipeline
  eval_sets: dict[str, list[dict[str, np.ndarray]]]


@gin.configurable(denylist=['workdir', 'accept_new_settings'])
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
          data: pipeline.DataConfig | None = None,
          data_dir: str = '.cache/data',
          tokenizer_vocab_size: int = 4096,
          init_checkpoint: str | None = None,
          eval_batches: int = 8,
          eval_tasks: Sequence[str] = (),
          eval_lengths: Sequence[int] = (),
          eval_task_limit: int | None = None,
          peak_flops: float | str | None = None,
          sample_prompt: str = 'The command',
          sample_tokens: int = 32,
          keep_checkpoints: int = 2,
          mesh: mesh_lib.MeshConfig | None = None,
          accept_new_settings: bool = False) -> dict[str, Any]:
  """Trains on a task mixture; returns final metrics.

  `data` is a `glm.data.pipeline.DataConfig` (default: causal LM only);
  `init_checkpoint` a glm checkpoint folder to fine-tune from; `peak_flops`
  a number, a name in PEAK_FLOPS, or None to measure a matmul here; `mesh`
  the device mesh (default: data parallel over every device);
  `accept_new_settings` lets a resume change the run's settings (not gin:
  `glm train --accept_new_settings`); `eval_tasks` lm-evaluation-harness
  tasks scored with the held-out loss (at most `eval_task_limit` examples
  each), into eval.jsonl and TensorBoard as `tasks/<task>/<metric>`;
  `eval_lengths` multiples k of `seq_len` whose held-out loss `len_<k>x` is
  measured too (windows of k * seq_len tokens: position extrapolation).
  """
  opt_cfg = optimizer or optimizers.OptimizerConfig()
  ramp = batch_ramp or optimizers.BatchRamp()
  data = data or pipeline.DataConfig()
  run = resolve(
      workdir, model_config, init_checkpoint=init_checkpoint,
      train_steps=train_steps, batch_size=batch_size, seq_len=seq_len,
      checkpoint_every=checkpoint_every, log_every=log_every,
      eval_every=eval_every, micro_batch_size=micro_batch_size, ramp=ramp,
      policy=failure_policy or FailurePolicy(), seed=seed, mesh=mesh,
      tokenizer_vocab_size=tokenizer_vocab_size, peak_flops=peak_flops,
      recorded={'data': dataclasses.asdict(data),
                'optimizer': dataclasses.asdict(opt_cfg),
                'batch_ramp': dataclasses.asdict(ramp),
                'tokenizer_vocab_size': tokenizer_vocab_size,
                'init_checkpoint': init_checkpoint},
      eval_lengths=eval_lengths, accept_new_settings=accept_new_settings)
  run_data = build_data(run, data, data_dir=data_dir,
                        tokenizer_vocab_size=tokenizer_vocab_size,
                        eval_batches=eval_batches, eval_lengths=eval_lengths,
                        tokenizer=checkpoint_tokenizer(init_checkpoint))
  files = workdir_lib.RunFiles(run.workdir)
  tokens = run.batch_sizes * run.seq_len
  lrs = optimizers.lr_table(opt_cfg, tokens)
  opt = optimizers.make_optimizer(opt_cfg, lrs)
  state = state_lib.init_state(
      run.cfg, opt, seed=run.seed, params=_init_params(run, init_checkpoint),
      mesh_cfg=run.mesh_cfg, mesh=run.mesh)
  train_step, eval_step = step_lib.make_train_step(
      run.cfg, opt, z_loss=opt_cfg.z_loss, policy=run.policy,
      mesh_cfg=run.mesh_cfg, mesh=run.mesh)
  manager = checkpoints.open_manager(run.workdir, keep_checkpoints)
  state, start = checkpoints.restore_latest(manager, state)
  files.record_config(run.cfg, run.settings, gin.operative_config_str(),
                      start, run.changes)
  files.resume_at(start)
  flops, peak = announce(run, data, peak_flops,
                         optimizers.warmup_note(opt_cfg, tokens, lrs))
  score_tasks = downstream.task_evaluator(
      run.cfg, run_data.tokenizer, eval_tasks, data_dir=data_dir,
      limit=eval_task_limit, mixture=dict(data.mixture), mesh=run.mesh)
  # Evaluations this run already has (every process sees the same ones).
  evaluated = {r['step']: r for r in files.read('eval.jsonl')
               if r['step'] <= start}

  def evaluate(params, step: int) -> dict[str, float]:
    """Held-out losses at `step` ('all', ...), once per step and run."""
    if step not in evaluated:
      put = ((lambda b: {k: jnp.asarray(v) for k, v in b.items()})
             if run.mesh is None else
             (lambda b: mesh_lib.put_global(b, run.mesh)))
      row = heldout.evaluate(eval_step, params, run_data.eval_sets, put)
      if score_tasks is not None:
        row.update(score_tasks(params))
      files.log('eval.jsonl', {'step': step, **row}, 'eval')
      evaluated[step] = row
    return evaluated[step]

  t_start = time.time()
  state, loss, skipped = loop(run, state, start, train_step,
                              batch_fn=lambda s: micro_batches(run, run_data, s),
                              evaluate=evaluate, manager=manager, files=files,
                              lrs=lrs, flops_per_token=flops, peak=peak)
  return finish(run, run_data, state, evaluate, files, train_loss=loss,
                skipped=skipped, sample_prompt=sample_prompt,
                sample_tokens=sample_tokens, t_start=t_start)


def resolve(workdir: str, model_config: ModelConfig, *,
            init_checkpoint: str | None, train_steps: int, batch_size: int,
            seq_len: int, checkpoint_every: int, log_every: int,
            eval_every: int, micro_batch_size: int,
            ramp: optimizers.BatchRamp, policy: FailurePolicy, seed: int,
            mesh: mesh_lib.MeshConfig | None, tokenizer_vocab_size: int,
            peak_flops: float | str | None, recorded: dict,
            accept_new_settings: bool, eval_lengths: Sequence[int] = ()
            ) -> Run:
  """Checks every setting before any work; raises TrainError with the fix.

  `recorded`: further settings that run.json records and a resume compares.
  """
  cfg = model_config
  if init_checkpoint:
    # Fine-tuning: the architecture comes from the self-describing checkpoint;
    # the run only chooses numerics (dtype, scan and unroll, remat).
    cfg = model_checkpoint.load_config(init_checkpoint).replace(
        dtype=cfg.dtype, scan_layers=cfg.scan_layers,
        scan_unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy,
        attention_impl=cfg.attention_impl)
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
  check_eval_lengths(cfg, seq_len, eval_lengths)
  if tokenizer_vocab_size % 128:
    raise TrainError(f'tokenizer_vocab_size={tokenizer_vocab_size} must be a '
                     'multiple of 128 (e.g. 4096) so that the embedding '
                     'needs no padding rows.')
  own_tokenizer = checkpoint_tokenizer(init_checkpoint) is not None
  if tokenizer_vocab_size > cfg.vocab_size and not own_tokenizer:
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
  settings = {'train_steps': train_steps, 'batch_size': batch_size,
              'micro_batch_size': micro, 'seq_len': seq_len, 'seed': seed,
              **{k: getattr(cfg, k) for k in workdir_lib.NUMERICS},
              **recorded}
  changes = workdir_lib.check_workdir(workdir, cfg, settings,
                                      accept_new_settings=accept_new_settings)
  return Run(workdir=workdir, cfg=cfg, train_steps=train_steps,
             batch_sizes=batch_sizes, batch_size=batch_size, micro=micro,
             seq_len=seq_len, seed=seed, log_every=log_every,
             eval_every=eval_every, checkpoint_every=checkpoint_every,
             policy=policy, mesh_cfg=mesh_cfg,
             mesh=(mesh_lib.make_mesh(mesh_cfg)
                   if mesh_cfg.num_devices > 1 else None),
             settings=settings, changes=changes)


def check_eval_lengths(cfg: ModelConfig, seq_len: int,
                       lengths: Sequence[int]) -> None:
  """Refuses eval_lengths the model cannot be evaluated at: learned
  positions have no embedding past max_len (ALiBi and RoPE have no limit)."""
  for k in lengths:
    if not isinstance(k, int) or k < 2:
      raise TrainError(f'eval_lengths entry {k!r} must be an integer >= 2 (a '
                       'multiple of SEQ_LEN), e.g. --gin.train.eval_lengths='
                       '(2,4,8).')
    if cfg.position == 'learned' and k * seq_len > cfg.max_len:
      raise TrainError(
          f'eval_lengths {k}x needs {k * seq_len} positions but learned '
          f'positions stop at ModelConfig.max_len={cfg.max_len}; raise max_len '
          f'to {k * seq_len} (the extra rows stay untrained) or evaluate at '
          'shorter lengths.')


def checkpoint_tokenizer(init_checkpoint: str | None):
  """The tokenizer a fine-tuning run reads text with: the checkpoint's own
  (glm's SentencePiece or a converted model's Hugging Face one), or None
  (the data folder's) for a checkpoint without one; a checkpoint converted
  from Hugging Face without its tokenizer is refused."""
  if not init_checkpoint:
    return None
  path = model_checkpoint.tokenizer_path(init_checkpoint)
  if path:
    from glm.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    return hf_tokenizer.open_tokenizer(path)
  meta = model_checkpoint.read_manifest(init_checkpoint)['meta']
  if meta.get('converted_from'):
    raise TrainError(
        f'checkpoint {init_checkpoint!r} was converted without its tokenizer;'
        ' convert it again from a folder with tokenizer.json (glm convert '
        'hf-to-glm copies it) so that fine-tuning reads text as the model '
        'was trained to.')
  return None


def build_data(run: Run, data: pipeline.DataConfig, *, data_dir: str,
               tokenizer_vocab_size: int, eval_batches: int,
               eval_lengths: Sequence[int] = (), tokenizer=None) -> RunData:
  """The corpus and tokenizer (built on first use, unless `tokenizer` is
  given), train batches and the held-out sets."""
  # The tokenizer belongs to the data folder, not to the run: its seed stays
  # fixed (with train.seed, a seed sweep retrained the shared spm_<V> file for
  # each seed, under the variants reading it).
  train_split = pipeline.open_split(os.path.abspath(data_dir), 'train',
                                    vocab_size=tokenizer_vocab_size,
                                    tokenizer=tokenizer)
  tok = train_split.tok
  if tok.vocab_size > run.cfg.vocab_size:
    fix = ('raise ModelConfig.vocab_size' if tokenizer is None else
           "use the tokenizer the model was trained with (put it in the "
           "checkpoint: glm convert hf-to-glm copies a folder's "
           'tokenizer.json)')
    raise TrainError(f'tokenizer {tok.model_path} has {tok.vocab_size} ids '
                     f'but the model only {run.cfg.vocab_size}; {fix}.')
  train_data = pipeline.Pipeline(train_split, data, seq_len=run.seq_len,
                                 batch_size=run.batch_size, seed=run.seed,
                                 gmask_positions=run.cfg.gmask_positions)
  valid_split = pipeline.SplitData(train_split.corpus_dir, tok, 'valid',
                                   cache_dir=train_split.cache_dir)
  sets = heldout.eval_sets(valid_split, data, seq_len=run.seq_len,
                           batch_size=run.micro, seed=run.seed,
                           num_batches=eval_batches,
                           breakdown=bool(run.eval_every),
                           gmask_positions=run.cfg.gmask_positions,
                           lengths=tuple(eval_lengths))
  return RunData(tok, train_data, sets)


def micro_batches(run: Run, data: RunData, step: int) -> dict[str, jax.Array]:
  """Step `step`'s batch as [A, B / A, T] micro-batches on the devices; on a
  mesh each process builds only the rows its devices hold."""
  rows = int(run.batch_sizes[step])
  if run.mesh is None:
    b = data.train.batch(step, rows=rows)
    # [B, T] -> [A, B / A, T] micro-batches
    return {k: jnp.asarray(v.reshape(-1, run.micro, *v.shape[1:]))
            for k, v in b.items()}
  return mesh_lib.put_batch(lambda idx: data.train.rows(step, idx),
                            rows // run.micro, run.micro, run.mesh)


def _init_params(run: Run, init_checkpoint: str | None) -> Any:
  """Fine-tuning weights in this run's layer layout, or None (fresh)."""
  if not init_checkpoint:
    return None
  _, params = model_checkpoint.load(init_checkpoint)
  cfg = run.cfg
  if 'layers' in params and not cfg.scan_layers:
    params = transformer.unstack_layers(params, cfg.num_layers)
  elif 'layers' not in params and cfg.scan_layers:
    params = transformer.stack_layers(params, cfg.num_layers)
  return jax.tree.map(jnp.asarray, params)


def measure_peak_flops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul with the policy's matmul inputs
  (float32 results) on this machine (the best of `repeats` timings, so a
  busy moment does not lower it)."""
  dt = jnp.float32 if resolve_dtype(dtype) == 'float32' else jnp.bfloat16
  a = jnp.ones((n, n), dt)
  f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def announce(run: Run, data: pipeline.DataConfig,
             peak_flops: float | str | None,
             warning: str | None = None) -> tuple[float, float]:
  """Prints what the run is; returns (training FLOPs per token, peak)."""
  info = model_info.info(run.cfg, run.seq_len)
  if peak_flops is None:
    peak = measure_peak_flops(run.cfg.dtype)
    peak_source = f'measured here ({run.cfg.dtype} matmul)'
  else:
    peak = PEAK_FLOPS.get(peak_flops, peak_flops)
    peak_source = f'configured ({peak_flops})'
  print(f'glm train: {info["params"]:,} params, {run.train_steps} steps of '
        f'{run.batch_size}x{run.seq_len} tokens (micro-batch {run.micro}), '
        f'workdir {run.workdir}; MFU against {peak / 1e9:,.0f} GFLOP/s '
        f'{peak_source}', flush=True)
  print(f'glm train: data mixture {dict(data.mixture)}', flush=True)
  policy = precision(run.cfg)
  auto = f" ('{run.cfg.dtype}' on {jax.default_backend()})" if (
      run.cfg.dtype == 'auto') else ''
  unroll = transformer.scan_unroll(run.cfg)
  print(f'glm train: compute dtype {policy.name}{auto}: {policy.describe()}'
        + (f'; layer scan unrolled x{unroll}' if run.cfg.scan_layers
           and unroll > 1 else '')
        + '; attention ' + fused.describe(run.cfg.attention_impl, run.seq_len),
        flush=True)
  mc = run.mesh_cfg
  if run.mesh is not None:
    print(f'glm train: mesh {mc.describe()} over '
          f'{jax.device_count()} devices in {jax.process_count()} '
          f'process(es)' + (f'; {mc.schedule} pipeline, '
                            f'{mc.num_microbatches} microbatches x '
                            f'{mc.repeats} repeats, bubble '
                            f'{mc.bubble_fraction():.1%}'
                            if mc.pipeline > 1 else '')
          + (', ZeRO-1' if mc.zero1 else ''), flush=True)
    if jax.process_count() > 1:
      mine = mesh_lib.local_rows(run.mesh, run.micro)
      print(f'glm train: process {jax.process_index()} builds rows '
            f'{mine[0]}..{mine[-1]} ({len(mine)} of {run.micro}) of each '
            'micro-batch', flush=True)
  if run.changes:
    print(f'glm train: going on with new settings from this step: '
          f'{"; ".join(run.changes)} (the earlier config.gin is in '
          f'{run.workdir}/config_history/)', flush=True)
  if warning:
    print(f'glm train: warning: {warning}', flush=True)
  return info['flops_per_token'], peak


def loop(run: Run, state: dict, start: int, train_step: Callable, *,
         batch_fn: Callable[[int], dict], evaluate: Callable,
         manager: ocp.CheckpointManager, files: workdir_lib.RunFiles,
         lrs: np.ndarray, flops_per_token: float, peak: float
         ) -> tuple[dict, float | None, int]:
  """Steps `start` .. train_steps: step, log, evaluate, checkpoint; a save
  and exit 128 + signal on SIGTERM / SIGINT. Returns (state, last logged
  loss, skipped steps).

  The host reads a step's outcome (skipped or not) only after it has
  dispatched the next step, so the device never waits for the host between
  steps; it waits only where the loop logs, evaluates or checkpoints. Time
  spent evaluating and checkpointing is left out of the logged tokens/s.
  """
  progress = workdir_lib.Progress(run.train_steps)
  if start >= run.train_steps:
    progress.message(f'glm train: already at step {start} of '
                     f'{run.train_steps}; evaluating only.')
  dropout_key = jax.random.fold_in(jax.random.PRNGKey(run.seed), 1)
  clock = {'time': time.time(), 'step': start, 'paused': 0.0}
  loss, skipped, pending = None, [0], None
  with workdir_lib.preemption_flag() as preempted:
    for step in range(start, run.train_steps):
      rng = (jax.random.fold_in(dropout_key, step)
             if run.cfg.dropout_rate > 0 else None)
      state, m = train_step(state, batch_fn(step), rng)
      done = step + 1
      if pending is not None:
        _check_step(run, *pending, manager, progress, skipped)
      pending = (done, m)
      if (done % run.log_every == 0 or done == run.train_steps
          or done == start + 1):
        _check_step(run, *pending, manager, progress, skipped)
        pending = None
        loss = _log_step(run, m, step, start, clock, files, progress, lrs,
                         flops_per_token, peak, skipped[0])
      due_eval = bool(run.eval_every) and done % run.eval_every == 0
      due_save = done % run.checkpoint_every == 0 or done == run.train_steps
      if due_eval or due_save:
        jax.block_until_ready(m['loss'])  # the step's own time ends here
        t = time.time()
        if due_eval:
          evaluate(state['params'], done)
        if due_save:
          manager.save(done, args=_save_args(state))
        clock['paused'] += time.time() - t
      if preempted['signal'] is not None:
        _save_and_exit(run, state, done, preempted['signal'], manager, files,
                       progress)
  if pending is not None:
    _check_step(run, *pending, manager, progress, skipped)
  manager.wait_until_finished()
  return state, loss, skipped[0]


def _save_args(state: dict) -> ocp.args.StandardSave:
  return ocp.args.StandardSave(state_lib.to_saved(state))


def _check_step(run: Run, done: int, m: dict, manager: ocp.CheckpointManager,
                progress: workdir_lib.Progress, skipped: list[int]) -> None:
  """Reports a skipped update; stops after too many in a row."""
  if not bool(m['skipped']):
    return
  skipped[0] += 1
  reason = 'non-finite loss or gradients' if bool(m['nonfinite']) else (
      'a loss spike')
  progress.message(f'glm train: step {done}: skipped the update '
                   f'({reason}, loss {float(m["loss"]):.4g}).')
  if int(m['bad_steps']) >= run.policy.max_bad_steps:
    manager.wait_until_finished()
    raise TrainError(
        f'{run.policy.max_bad_steps} consecutive bad steps up to step '
        f'{done}; the last good checkpoint is step '
        f'{manager.latest_step()} in {run.workdir}/checkpoints: lower the '
        'learning rate or check the data, then resume.')


def _log_step(run: Run, m: dict, step: int, start: int, clock: dict,
              files: workdir_lib.RunFiles, progress: workdir_lib.Progress,
              lrs: np.ndarray, flops_per_token: float, peak: float,
              skipped: int) -> float:
  """One metrics row (W/metrics.jsonl, TensorBoard) and the progress line;
  the only place the loop waits for the device. Returns the loss."""
  jax.block_until_ready(m['loss'])
  done = step + 1
  now = time.time()
  busy = now - clock['time'] - clock['paused']
  dt = busy / max(done - clock['step'], 1)
  clock.update(time=now, step=done, paused=0.0)
  loss = float(m['loss'])
  tokens = int(run.batch_sizes[step]) * run.seq_len
  tps = tokens / dt if dt > 0 else 0.0
  row = {'step': done, 'loss': loss, 'lr': float(lrs[step]),
         'grad_norm': float(m['grad_norm']), 'tokens_per_s': tps,
         'step_time_s': dt, 'mfu': flops_per_token * tps / peak,
         'batch_size': int(run.batch_sizes[step]), 'skipped_steps': skipped}
  files.log('metrics.jsonl', row, 'train')
  if done == start + 1:
    text = f'compiled and ran the first step in {dt:.1f}s'
  else:
    text = (f'{tps:,.0f} tok/s  MFU {row["mfu"]:.1%}  ETA '
            f'{workdir_lib.fmt_eta(dt * (run.train_steps - done))}')
  progress.update(done, f'step {done:>6}/{run.train_steps}  loss '
                  f'{loss:.4f}  lr {row["lr"]:.2e}  {text}')
  return loss


def _save_and_exit(run: Run, state: dict, done: int, signum: int,
                   manager: ocp.CheckpointManager,
                   files: workdir_lib.RunFiles,
                   progress: workdir_lib.Progress) -> None:
  if done % run.checkpoint_every and done != run.train_steps:
    manager.save(done, args=_save_args(state))
  manager.wait_until_finished()
  files.close()
  progress.message(f'glm train: caught signal {signum}; saved step {done}; '
                   'rerun the same command to resume.')
  raise SystemExit(128 + signum)


def finish(run: Run, data: RunData, state: dict, evaluate: Callable,
           files: workdir_lib.RunFiles, *, train_loss: float | None,
           skipped: int, sample_prompt: str, sample_tokens: int,
           t_start: float) -> dict[str, Any]:
  """Held-out loss, a greedy sample and the model folder W/model."""
  row = evaluate(state['params'], run.train_steps)
  eval_loss = row['all']
  params = state_lib.float32_params(state)  # the master copy, if any
  if jax.process_count() > 1:  # every process gets the full weights
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = multihost_utils.process_allgather(params, tiled=True)
  print(f'held-out loss {eval_loss:.4f} (perplexity '
        f'{math.exp(min(eval_loss, 50)):.1f})', flush=True)
  longer = {k: v for k, v in row.items() if k.startswith('len_')}
  if longer:
    print('held-out loss at longer lengths: ' + ', '.join(
        f'{k[4:]} {v:.4f}' for k, v in longer.items()), flush=True)
  tok, cfg = data.tokenizer, run.cfg
  mixture = dict(data.train.config.mixture)
  blank_infilling = (max(mixture, key=mixture.get) == 'glm_blank_infilling'
                     and data.train.special.has_infilling)
  num_new = min(sample_tokens,
                cfg.max_len - len(tok.encode(sample_prompt)) - 2)
  sample, sampled = decoding.run_samples(
      cfg, params, tok, sample_prompt, num_new, SAMPLE_SAMPLING,
      blank_infilling=blank_infilling)
  how = ' ([gMASK] filled)' if blank_infilling else ''
  print(f'greedy sample{how}: {sample!r}', flush=True)
  if sampled is not None:
    print(f'sampled{how} (temperature {SAMPLE_SAMPLING.temperature}, top-p '
          f'{SAMPLE_SAMPLING.top_p}, seed 0): {sampled!r}', flush=True)
  files.close()
  model_dir = files.path('model')
  result = {'step': run.train_steps, 'train_loss': train_loss,
            'eval_loss': eval_loss, **longer, 'skipped_steps': skipped,
            'sample': sample, 'sampled': sampled, 'model_dir': model_dir,
            'elapsed_s': time.time() - t_start}
  if not files.lead:
    return result
  model_checkpoint.save(model_dir, cfg, params, tokenizer_path=tok.model_path,
                        meta={'step': run.train_steps,
                              'mixture': dict(data.train.config.mixture)},
                        overwrite=True)
  files.write_json('final.json', result)
  print(f'glm train: done; model written to {model_dir}', file=sys.stderr,
        flush=True)
  return result
