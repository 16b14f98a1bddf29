"""The device mesh, its validation, and the shardings of a training state.

One mesh with four named axes, outermost first:

  pipeline  stages of the layer stack (glm.parallel.pipeline)
  data      data-parallel replicas (with `zero1`, optimiser state is split too)
  fsdp      data parallelism that also splits parameters, gradients and
            optimiser state (ZeRO-3 / FSDP)
  tensor    Megatron tensor parallelism (heads, FFN width, vocabulary)

Logical axis names on parameters and activations reach the mesh through the
one rule table `glm.parallel.partitioning.LOGICAL_AXIS_RULES`. On one device
every axis has size 1 and the run is the unsharded one.

  mesh_cfg = MeshConfig.parse('data=2,tensor=2,pipeline=2')
  mesh = make_mesh(mesh_cfg)                       # needs 8 devices
  specs = param_specs(transformer.logical_axes(cfg))
  shardings = to_shardings(specs, mesh)

This module knows nothing of the model beyond its config: parameter trees
and their logical axis names are passed in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from glm.errors import UserError
from glm.model.config import ModelConfig
from glm.parallel import partitioning

MESH_AXES = ('pipeline', 'data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # mesh axes the batch dimension is split over


class MeshError(UserError):
  """A mesh that does not fit the model, the batch or the devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes, ZeRO-1 and the pipeline schedule.

  data, fsdp, tensor, pipeline: axis sizes (their product is the number of
    devices).
  zero1: also split the optimiser state over the `data` replicas (BLOOM's
    ZeRO stage 1); parameters and gradients stay replicated on `data`.
  schedule: 'gpipe' or 'circular' (only used when pipeline > 1).
  microbatches: pipeline microbatches per micro-batch (0: one per stage).
  repeats: circular schedule only; each stage holds this many chunks of
    layers (layers are split into pipeline x repeats chunks).
  """
  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  pipeline: int = 1
  zero1: bool = False
  schedule: str = 'gpipe'
  microbatches: int = 0
  repeats: int = 1

  @property
  def shape(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape.values())

  @property
  def num_microbatches(self) -> int:
    return self.microbatches or self.pipeline

  @property
  def batch_shards(self) -> int:
    return self.data * self.fsdp

  def describe(self) -> str:
    text = ','.join(f'{a}={n}' for a, n in self.shape.items() if n > 1)
    return text or 'one device'

  @classmethod
  def parse(cls, text: str, **overrides) -> 'MeshConfig':
    """'data=2,tensor=2,pipeline=2' -> MeshConfig (axes left out are 1)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(','))):
      name, _, value = part.partition('=')
      name = name.strip()
      if name not in MESH_AXES:
        raise MeshError(f'--mesh {text!r}: unknown axis {name!r}; use '
                        f'{", ".join(MESH_AXES)} as in data=2,tensor=2.')
      try:
        sizes[name] = int(value)
      except ValueError:
        raise MeshError(f'--mesh {text!r}: {part!r} needs an integer size, '
                        'as in tensor=2.') from None
      if sizes[name] < 1:
        raise MeshError(f'--mesh {text!r}: {name}={sizes[name]} must be >= 1.')
    return dataclasses.replace(cls(), **{**overrides, **sizes})

  def bubble_fraction(self) -> float:
    """Idle share of the pipeline schedule: (S - 1) / (M * R + S - 1)."""
    s = self.pipeline
    if s == 1:
      return 0.0
    return (s - 1) / (self.num_microbatches * self.repeats + s - 1)


def validate(mc: MeshConfig, cfg: ModelConfig, *, micro_batch: int,
             num_devices: int | None = None) -> None:
  """Checks the mesh against devices, model and batch; one-line errors."""
  if num_devices is not None and mc.num_devices != num_devices:
    raise MeshError(
        f'mesh {mc.describe()} uses {mc.num_devices} devices but there are '
        f'{num_devices}; make the product of the axis sizes {num_devices}.')
  t = mc.tensor
  for what, n in (('num_heads', cfg.num_heads), ('mlp_dim', cfg.mlp_dim),
                  ('padded vocabulary', cfg.padded_vocab_size)):
    if n % t:
      fix = ('set ModelConfig.vocab_pad_multiple to a multiple of '
             f'{128 * t}' if what == 'padded vocabulary'
             else f'choose tensor dividing {n}')
      raise MeshError(f'{what}={n} is not divisible by tensor={t}; {fix}.')
  if cfg.hidden % mc.fsdp:
    raise MeshError(f'hidden={cfg.hidden} is not divisible by fsdp={mc.fsdp}; '
                    'choose fsdp dividing the hidden size.')
  if mc.schedule not in ('gpipe', 'circular'):
    raise MeshError(f'schedule={mc.schedule!r} is not gpipe or circular.')
  if mc.repeats < 1 or (mc.repeats > 1 and mc.schedule != 'circular'):
    raise MeshError(f'repeats={mc.repeats} needs schedule=circular and >= 1.')
  if mc.pipeline > 1:
    chunks = mc.pipeline * mc.repeats
    if cfg.num_layers % chunks:
      raise MeshError(
          f'num_layers={cfg.num_layers} does not split into pipeline='
          f'{mc.pipeline} x repeats={mc.repeats} = {chunks} equal chunks; '
          'change the pipeline size or repeats.')
    if not cfg.scan_layers:
      raise MeshError('pipeline parallelism needs ModelConfig.scan_layers = '
                      'True (the stages split the stacked layer axis).')
    m = mc.num_microbatches
    if m < mc.pipeline and mc.schedule == 'circular':
      raise MeshError(f'microbatches={m} is smaller than pipeline='
                      f'{mc.pipeline}; the circular schedule needs at least '
                      'one microbatch per stage.')
    if micro_batch % m:
      raise MeshError(f'micro-batch {micro_batch} is not divisible by '
                      f'{m} pipeline microbatches; pick a divisor.')
    rows = micro_batch // m
  else:
    rows = micro_batch
  if rows % mc.batch_shards:
    where = (f'pipeline microbatch of {rows} rows' if mc.pipeline > 1
             else f'micro-batch {rows}')
    raise MeshError(f'{where} is not divisible by data x fsdp = '
                    f'{mc.batch_shards}; change the batch or the mesh.')


def make_mesh(mc: MeshConfig,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all) with the four named axes."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) != mc.num_devices:
    raise MeshError(
        f'mesh {mc.describe()} uses {mc.num_devices} devices but there are '
        f'{len(devices)}; make the product of the axis sizes {len(devices)}.')
  grid = np.asarray(devices).reshape([mc.shape[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@gin.configurable('glm.mesh.axis_rules')
def rules(table=partitioning.LOGICAL_AXIS_RULES) -> tuple[tuple[str, Any], ...]:
  """The logical-axis -> mesh-axis rule table (replaceable in gin)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in table)


def logical_to_spec(names: tuple[str | None, ...]) -> P:
  return nn.logical_to_mesh_axes(names, rules())


def _spec_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def zero1_spec(spec: P, shape: tuple[int, ...], mesh_shape: dict[str, int]
               ) -> P:
  """Adds the `data` axis to the largest dimension it divides evenly.

  ZeRO-1: each data replica keeps 1/data of every optimiser-state tensor.
  Tensors with no evenly divisible dimension (scalars, tiny biases) stay as
  they are.
  """
  data = mesh_shape['data']
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if data == 1 or any('data' in _spec_axes(e) for e in entries):
    return spec
  best = None
  for i, (n, e) in enumerate(zip(shape, entries)):
    split = math.prod(mesh_shape[a] for a in _spec_axes(e))
    if n % (split * data) == 0 and (best is None or n > shape[best]):
      best = i
  if best is None:
    return spec
  entries[best] = _spec_axes(entries[best]) + ('data',)
  entries = [e[0] if isinstance(e, tuple) and len(e) == 1 else e
             for e in entries]
  return P(*entries)


def param_specs(logical_axes: Any) -> Any:
  """PartitionSpecs of the parameters from their logical axis names (a tree
  of name tuples, as `glm.model.transformer.logical_axes` gives)."""
  return jax.tree.map(logical_to_spec, logical_axes,
                      is_leaf=lambda x: isinstance(x, P))


def _path_key(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
               for k in path)


def mirror_specs(tree: Any, params: Any, pspecs: Any, mc: MeshConfig) -> Any:
  """PartitionSpecs for a tree whose leaves mirror parameters (optimiser
  state such as Adam's mu and nu).

  A leaf whose key path ends in a parameter's path and has its shape gets
  that parameter's spec (plus `data` with ZeRO-1); everything else (step
  counts, scalars) is replicated.
  """
  by_path = {_path_key(p): s for p, s in
             jax.tree_util.tree_flatten_with_path(
                 pspecs, is_leaf=lambda x: isinstance(x, P))[0]}
  shapes = {_path_key(p): np.shape(x) for p, x in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  depth = max(len(k) for k in by_path)

  def leaf_spec(path, x):
    key = _path_key(path)
    for n in range(min(depth, len(key)), 0, -1):
      spec = by_path.get(key[-n:])
      if spec is not None and shapes[key[-n:]] == np.shape(x):
        return zero1_spec(spec, np.shape(x), mc.shape) if mc.zero1 else spec
    return P()

  return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def to_shardings(specs: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int, *, leading: int = 1) -> P:
  """Spec of a batch field [A, B, ...] (leading = axes before B)."""
  return P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1)))


def batch_shardings(batch: dict, mesh: Mesh, *, leading: int = 1) -> dict:
  return {k: NamedSharding(mesh, batch_spec(np.ndim(v), leading=leading))
          for k, v in batch.items()}


def per_device_bytes(shape: Sequence[int], dtype, spec: P,
                     mesh_shape: dict[str, int]) -> int:
  """Bytes of one device's shard of an array with `spec` on a mesh."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  n = 1
  for dim, e in zip(shape, entries):
    split = math.prod(mesh_shape[a] for a in _spec_axes(e))
    n *= -(-dim // split)
  return n * np.dtype(dtype).itemsize


def local_rows(mesh: Mesh, micro: int) -> list[int]:
  """Rows of a micro-batch of `micro` rows held by this process's devices."""
  sharding = NamedSharding(mesh, P(BATCH_AXES))
  index_map = sharding.addressable_devices_indices_map((micro,))
  return sorted({r for idx in index_map.values() for r in range(micro)[idx[0]]})


def put_batch(make_rows, num_micro: int, micro: int, mesh: Mesh) -> dict:
  """Global [A, B, ...] micro-batch arrays built from this process's rows.

  make_rows(global_row_indices) -> {field: [n, ...] numpy}; global row
  a * B + r is row r of micro-batch a. Each process asks only for the rows
  its devices hold (all of them in a one-process run).
  """
  needed = local_rows(mesh, micro)
  pos = {r: i for i, r in enumerate(needed)}
  built = make_rows([a * micro + r for a in range(num_micro) for r in needed])
  out = {}
  for k, v in built.items():
    v = v.reshape(num_micro, len(needed), *v.shape[1:])  # [A, n, ...]

    def local(index, v=v):
      picked = v[index[0]][:, [pos[r] for r in range(micro)[index[1]]]]
      return picked[(slice(None), slice(None)) + tuple(index[2:])]

    shape = (num_micro, micro, *v.shape[2:])
    out[k] = jax.make_array_from_callback(
        shape, NamedSharding(mesh, batch_spec(len(shape))), local)
  return out


def put_global(batch: dict, mesh: Mesh, *, leading: int = 0) -> dict:
  """Global arrays from a batch every process holds in full (evaluation)."""
  return {k: jax.make_array_from_callback(
      np.shape(v), NamedSharding(mesh, batch_spec(np.ndim(v), leading=leading)),
      lambda index, v=v: np.asarray(v)[index]) for k, v in batch.items()}
