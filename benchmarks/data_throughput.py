"""Data pipeline throughput per objective vs what training consumes.

Measures, in one process on this machine:
  * tokens/s the default training run consumes (the tiny BLOOM of
    configs/runs/default.gin: batch x seq_len tokens per jitted train step);
  * tokens/s each task's batch construction produces (packed rows, the same
    `glm.data.pipeline.Pipeline.batch` the trainer calls), single-threaded;
and prints their ratio. The goal is >= 10x for every objective, so that data
never limits training. Writes benchmarks/results/data_throughput.json.

  .venv/bin/python benchmarks/data_throughput.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from glm.data import pipeline
from glm import gin_config
from glm.model.config import ModelConfig
from glm.model import transformer
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_tokens_per_s(batch: dict, steps: int) -> float:
  gin_config.parse([os.path.join(ROOT, 'configs', 'runs', 'default.gin')], [])
  cfg = ModelConfig()
  gin.clear_config()
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig(),
                                 np.full(100, 1e-3, np.float32))
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  state = state_lib.new_state(params, opt)
  step, _ = step_lib.make_train_step(cfg, opt)
  batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # [1, B, T]
  state, m = step(state, batch)  # compile
  m['loss'].block_until_ready()
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  m['loss'].block_until_ready()
  return batch['tokens'].size * steps / (time.perf_counter() - t)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--data_dir', default=os.path.join(ROOT, '.cache', 'data'))
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                               'data_throughput.json'))
  args = p.parse_args()

  split = pipeline.open_split(args.data_dir, 'train')
  results = {}
  for task in pipeline.TASKS:
    pipe = pipeline.Pipeline(split, pipeline.DataConfig.for_task(task),
                             seq_len=args.seq_len,
                             batch_size=args.batch_size, seed=0)
    pipe.batch(0)  # warm caches (documents for instructions)
    t = time.perf_counter()
    for s in range(args.steps):
      pipe.batch(s)
    dt = time.perf_counter() - t
    results[task] = args.batch_size * args.seq_len * args.steps / dt

  causal = pipeline.Pipeline(split, pipeline.DataConfig(),
                             seq_len=args.seq_len,
                             batch_size=args.batch_size).batch(0)
  consumed = training_tokens_per_s(causal, args.steps)

  print(f'training consumes {consumed:,.0f} tokens/s '
        f'(default run, {args.batch_size}x{args.seq_len})')
  print(f'{"task":<22}{"tokens/s":>14}{"x training":>12}')
  rows = {}
  for task, tps in results.items():
    rows[task] = {'tokens_per_s': tps, 'ratio_to_training': tps / consumed}
    print(f'{task:<22}{tps:>14,.0f}{tps / consumed:>12.1f}')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'training_tokens_per_s': consumed, 'tasks': rows,
               'batch_size': args.batch_size, 'seq_len': args.seq_len}, f,
              indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
