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

On a GPU or TPU the default implementations add 'pallas' (the compiled
kernel), and on a GPU `jax.nn.dot_product_attention(implementation='cudnn')`
(causal mask only: cuDNN takes no ALiBi slopes or per-example prefixes, so
it runs the plain causal pattern as a speed yardstick) and tokamax where it
is installed; each row then also gives dense-equivalent TFLOP/s
(14 B H T S D flops for forward + backward, however much a mask skips).
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

CPU_IMPLS = ('xla', 'blockwise')
DEVICE_IMPLS = ('xla', 'blockwise', 'pallas', 'cudnn', 'tokamax')


def attention_fn(impl: str, spec):
  """(q, k, v) -> out for one implementation, or None where unavailable."""
  if impl in attention_lib.IMPLEMENTATIONS:
    return lambda q, k, v: attention_lib.attention(q, k, v, spec, impl=impl)
  if impl == 'cudnn' and jax.default_backend() == 'gpu':
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation='cudnn')
  if impl == 'tokamax':
    try:
      import tokamax  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v,
                                                         is_causal=True)
  return None


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


def compiled(fn, q, k, v, g):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * g)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grad.lower(q, k, v).compile()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--lengths', default='256,1024,2048,4096,8192')
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--head_dim', type=int, default=64)
  p.add_argument('--reps', type=int, default=5)
  on_cpu = jax.default_backend() == 'cpu'
  p.add_argument('--impls', default=','.join(CPU_IMPLS if on_cpu
                                             else DEVICE_IMPLS))
  p.add_argument('--dtype', default='float32' if on_cpu else 'bfloat16')
  p.add_argument('--out', default=os.path.join(report.RESULTS,
                                               'attention.json'))
  args = p.parse_args()
  h, d = args.heads, args.head_dim
  results, table = {}, {}
  for pattern in ('bloom', 'glm'):
    for length in (int(x) for x in args.lengths.split(',')):
      keys = jax.random.split(jax.random.PRNGKey(0), 4)
      q, k, v, g = (jax.random.normal(kk, (1, length, h, d)) for kk in keys)
      q, k, v = (a.astype(args.dtype) for a in (q, k, v))
      spec = make_spec(pattern, length, h)
      fns = {impl: attention_fn(impl, spec)
             for impl in args.impls.split(',')}
      fns = {impl: compiled(fn, q, k, v, g) for impl, fn in fns.items()
             if fn is not None}
      times = {impl: [] for impl in fns}
      for impl, fn in fns.items():
        jax.block_until_ready(fn(q, k, v))  # warm-up
      for _ in range(args.reps):
        for impl, fn in fns.items():
          t = time.perf_counter()
          jax.block_until_ready(fn(q, k, v))
          times[impl].append(time.perf_counter() - t)
      row, name = {}, f'{pattern}_T{length}'
      flops = 14 * h * length * length * d
      for impl, fn in fns.items():
        row[f'{impl}_s'] = float(np.median(times[impl]))
        row[f'{impl}_temp_bytes'] = int(fn.memory_analysis()
                                        .temp_size_in_bytes)
        table[f'{name}_{impl}_ms'] = row[f'{impl}_s'] * 1e3
        if not on_cpu:
          row[f'{impl}_tflops'] = flops / row[f'{impl}_s'] / 1e12
          table[f'{name}_{impl}_tflops'] = row[f'{impl}_tflops']
      if 'blockwise' in fns and 'xla' in fns:
        row['blockwise_over_xla_speed'] = row['xla_s'] / row['blockwise_s']
        row['blockwise_over_xla_temp'] = (row['blockwise_temp_bytes']
                                          / row['xla_temp_bytes'])
        table[f'{name}_speed_ratio'] = row['blockwise_over_xla_speed']
        table[f'{name}_temp_ratio'] = row['blockwise_over_xla_temp']
      results[name] = row
      print(name + ': ' + '; '.join(
          f'{impl} {row[impl + "_s"] * 1e3:.1f} ms, '
          f'{row[impl + "_temp_bytes"] / 2**20:.0f} MiB' for impl in fns),
            flush=True)
  report.write(table, args.out, extra={
      'results': results, 'settings': vars(args),
      'devices': [str(x) for x in jax.devices()],
      'goals': {'temp_ratio_at_8192': 1 / 8, 'cpu_speed_ratio_from_1024': 1.0}})


if __name__ == '__main__':
  main()
