"""Attention implementations: forward + backward time and temporary memory.

For each implementation (`'xla'`, the materialised-bias path; `'blockwise'`,
the scan over key blocks), each pattern (BLOOM: causal + ALiBi; GLM: a
bidirectional prefix of half the row, packed with a second sequence) and
each length T = S, one process compiles `jax.grad` of sum(attention(q, k, v)
* g) with respect to q, k, v, reads the compiled executable's temporary
memory (`memory_analysis().temp_size_in_bytes`), and times the compiled
function (median of `--reps` runs, implementations interleaved).

  .venv/bin/python benchmarks/attention.py [--lengths 256,1024,4096,8192]

Goals: at T = 8192 the blockwise path's temporary memory is at most 1/8 of
the 'xla' path's; on CPU it is at least as fast as 'xla' for T >= 1024.
Prints a table and writes benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from glm.model import attention as attention_lib
from glm.model import positions

import report  # benchmarks/report.py, next to this script

IMPLS = ('xla', 'blockwise')


def make_spec(pattern: str, length: int, heads: int):
  """The spec of one row of `length` tokens (batch 1)."""
  slots = jnp.arange(length, dtype=jnp.int32)[None]
  seg = jnp.ones((1, length), jnp.int32)
  if pattern == 'bloom':  # causal LM with ALiBi
    return attention_lib.AttentionSpec(
        q_segment_ids=seg, kv_segment_ids=seg, q_slots=slots,
        kv_slots=slots, q_positions=slots, kv_positions=slots,
        alibi_slopes=jnp.asarray(positions.alibi_slopes(heads)))
  # GLM: two packed sequences, each with a bidirectional first half.
  half = length // 2
  seg = jnp.where(slots < half, 1, 2).astype(jnp.int32)
  start = jnp.where(slots < half, 0, half)
  prefix = (slots - start) < (jnp.where(slots < half, half, length - half)
                              // 2)
  return attention_lib.AttentionSpec(
      q_segment_ids=seg, kv_segment_ids=seg, q_slots=slots, kv_slots=slots,
      q_positions=slots - start, kv_positions=slots - start, kv_prefix=prefix)


def compiled(impl: str, spec, q, k, v, g):
  def loss(q, k, v):
    return jnp.sum(attention_lib.attention(q, k, v, spec, impl=impl) * g)
  fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return fn.lower(q, k, v).compile()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--lengths', default='256,1024,2048,4096,8192')
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--head_dim', type=int, default=64)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--out', default=os.path.join(report.RESULTS,
                                               'attention.json'))
  args = p.parse_args()
  h, d = args.heads, args.head_dim
  results, table = {}, {}
  for pattern in ('bloom', 'glm'):
    for length in (int(x) for x in args.lengths.split(',')):
      keys = jax.random.split(jax.random.PRNGKey(0), 4)
      q, k, v, g = (jax.random.normal(kk, (1, length, h, d)) for kk in keys)
      spec = make_spec(pattern, length, h)
      fns = {impl: compiled(impl, spec, q, k, v, g) for impl in IMPLS}
      times = {impl: [] for impl in IMPLS}
      for impl, fn in fns.items():
        jax.block_until_ready(fn(q, k, v))  # warm-up
      for _ in range(args.reps):
        for impl, fn in fns.items():
          t = time.perf_counter()
          jax.block_until_ready(fn(q, k, v))
          times[impl].append(time.perf_counter() - t)
      row = {}
      for impl, fn in fns.items():
        row[f'{impl}_s'] = float(np.median(times[impl]))
        row[f'{impl}_temp_bytes'] = int(fn.memory_analysis()
                                        .temp_size_in_bytes)
      row['blockwise_over_xla_speed'] = row['xla_s'] / row['blockwise_s']
      row['blockwise_over_xla_temp'] = (row['blockwise_temp_bytes']
                                        / row['xla_temp_bytes'])
      name = f'{pattern}_T{length}'
      results[name] = row
      table[f'{name}_xla_ms'] = row['xla_s'] * 1e3
      table[f'{name}_blockwise_ms'] = row['blockwise_s'] * 1e3
      table[f'{name}_speed_ratio'] = row['blockwise_over_xla_speed']
      table[f'{name}_temp_ratio'] = row['blockwise_over_xla_temp']
      print(f'{name}: xla {row["xla_s"] * 1e3:.1f} ms, '
            f'{row["xla_temp_bytes"] / 2**20:.0f} MiB; blockwise '
            f'{row["blockwise_s"] * 1e3:.1f} ms, '
            f'{row["blockwise_temp_bytes"] / 2**20:.0f} MiB', flush=True)
  report.write(table, args.out, extra={
      'results': results, 'settings': vars(args),
      'devices': [str(x) for x in jax.devices()],
      'goals': {'temp_ratio_at_8192': 1 / 8, 'cpu_speed_ratio_from_1024': 1.0}})


if __name__ == '__main__':
  main()
