"""The `'pallas'` and `'auto'` attention implementations.

`'pallas'` runs `glm.pallas_kernels.flash_attention` on an `AttentionSpec`:
the Triton kernel on CUDA (and ROCm) GPUs, the Mosaic kernel on TPUs, and the
GPU kernel in interpret mode elsewhere (CPU tests). The choice is made per
lowering platform with `lax.platform_dependent`, so a step exported from
this CPU machine for 'cuda' or 'tpu' carries that platform's kernel.

`'auto'` (`glm.model.attention.auto_attention`) is the kernel on GPU and
TPU; on CPU it is `'xla'` for rows shorter
than `AUTO_BLOCKWISE_FROM` keys and `'blockwise'` from there on (where
benchmarks/attention.py measures the blockwise path as fast or faster and
its memory no longer grows with T x S).

Under a mesh (`jax.set_mesh` plus `nn.logical_axis_rules`) a kernel call
is opaque to the SPMD partitioner, so it runs inside `jax.shard_map` over
the mesh axes that the logical axes 'batch' and 'heads' map to (data, fsdp
and tensor by default): every device runs the kernel on its own batch and
head shard, and axes already manual (the pipeline's) are left alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from glm.pallas_kernels import attention as pallas_kernels

AUTO_BLOCKWISE_FROM = 1024


def kernel_options(spec) -> dict:
  """An AttentionSpec as `flash_attention`'s keyword arguments."""
  return dict(
      q_segment_ids=spec.q_segment_ids, kv_segment_ids=spec.kv_segment_ids,
      q_slots=spec.q_slots, kv_slots=spec.kv_slots, kv_prefix=spec.kv_prefix,
      q_positions=spec.q_positions, kv_positions=spec.kv_positions,
      alibi_slopes=spec.alibi_slopes, causal=spec.causal)


def _kernel(q, k, v, spec):
  options = kernel_options(spec)

  def on(backend, interpret=False):
    return lambda q_, k_, v_: pallas_kernels.flash_attention(
        q_, k_, v_, backend=backend, interpret=interpret, **options)

  return jax.lax.platform_dependent(
      q, k, v, cuda=on('gpu'), rocm=on('gpu'), tpu=on('tpu'),
      default=on('gpu', interpret=True))


def pallas_attention(q, k, v, spec):
  """q [B, T, H, D], k, v [B, S, H, D] -> [B, T, H, D] through the kernel
  of the lowering platform, shard-mapped under a mesh."""
  return over_mesh(_kernel, q, k, v, spec)


def describe(impl: str, length: int) -> str:
  """What `impl` runs for rows of `length` tokens on this backend."""
  if impl != 'auto':
    return impl
  if jax.default_backend() == 'cpu':
    return ('auto: blockwise' if length >= AUTO_BLOCKWISE_FROM
            else 'auto: xla') + f' (CPU, {length} tokens)'
  return f'auto: pallas ({jax.default_backend()} kernel)'


def over_mesh(fn, q, k, v, spec):
  """fn(q, k, v, spec) per batch x head shard of the current mesh (or
  directly, with no mesh or no axis rules)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, spec)
  batch, heads = nn.logical_to_mesh_axes(('batch', 'heads'))
  manual = set(getattr(mesh, 'manual_axes', ()))

  def free(axes, size):
    """The automatic mesh axes of a logical axis, if they divide its size
    (a shape-only trace with a [1, 8] dummy batch shards nothing)."""
    axes = axes if isinstance(axes, tuple) else (axes,)
    kept = tuple(a for a in axes if a is not None and a not in manual
                 and mesh.shape[a] > 1)
    ways = 1
    for a in kept:
      ways *= mesh.shape[a]
    return kept if kept and size % ways == 0 else None

  batch, heads = free(batch, q.shape[0]), free(heads, q.shape[2])
  if batch is None and heads is None:
    return fn(q, k, v, spec)
  act = P(batch, None, heads, None)
  spec_specs = jax.tree.map(
      lambda a: P(heads) if a.ndim == 1 else P(batch, None), spec)
  # Every automatic axis goes manual (Mosaic calls must not be left to the
  # partitioner); axes in neither spec see replicated inputs.
  names = set(mesh.axis_names) - manual
  return jax.shard_map(fn, mesh=mesh, in_specs=(act, act, act, spec_specs),
                       out_specs=act, axis_names=names,
                       check_vma=False)(q, k, v, spec)
