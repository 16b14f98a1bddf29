"""Pipeline parallelism: GPipe and circular schedules over the `pipeline` axis.

The stacked layer parameters [L, ...] are cut into S x R chunks of L / (S R)
consecutive layers (S stages = the `pipeline` mesh axis, R repeats). Chunk
(r, s) holds layers (r S + s) L/(S R) ... and lives on stage s, so with R = 1
(GPipe) stage s holds one contiguous block and with R > 1 (circular, as in
MaxText / Praxis) every microbatch loops R times around the ring of stages.

Inside `jax.shard_map` (manual over `pipeline` only; data, fsdp and tensor stay
automatic, so the stage body is still data- and tensor-parallel) every stage
runs the same program: a `lax.scan` over T = M R + S - 1 ticks. At tick t
stage s works on item i = t - s (microbatch i mod M, repeat i div M); the
stage body is `vmap`ped over the local stage dimension of the parameters; the
result moves to the next stage with `lax.ppermute` (the last stage feeds stage
0 for the next repeat, held in a buffer until stage 0 is free). The share of
idle (stage, tick) slots is the bubble (S - 1) / (M R + S - 1).

Microbatches carry their own attention context: segment ids, prefix masks,
position ids and GLM's 2D block positions are indexed per item and turned into
the attention spec and RoPE tables inside the stage, so every family and
objective runs pipelined. The result equals the plain layer scan up to float
rounding.

The model is not imported here: the Transformer hands its layer function, its
attention-context builder and its remat wrapper to a `PipelineRunner`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from glm.parallel.mesh import MeshConfig


def stage_params(layer_params: Any, stages: int, repeats: int) -> Any:
  """[L, ...] stacked layers -> [S, R, L / (S R), ...] chunks per stage."""
  def split(a):
    per = a.shape[0] // (stages * repeats)
    a = a.reshape(repeats, stages, per, *a.shape[1:])  # [R, S, C, ...]
    return jnp.swapaxes(a, 0, 1)                        # [S, R, C, ...]
  return jax.tree.map(split, layer_params)


@dataclasses.dataclass(frozen=True)
class PipelineRunner:
  """The `pipeline` a `glm.model.transformer.Transformer` takes: runs its
  stacked layers over the mesh's `pipeline` axis (`run_layers`)."""
  mesh_cfg: MeshConfig
  mesh: Mesh

  def __call__(self, layer_params, x, fields, *, layer_fn, context_fn, remat,
               rng):
    return run_layers(self.mesh_cfg, self.mesh, layer_params, x, fields,
                      layer_fn=layer_fn, context_fn=context_fn, remat=remat,
                      rng=rng)


def run_layers(mc: MeshConfig, mesh: Mesh, layer_params: Any, x: jax.Array,
               fields: dict, *, layer_fn: Callable, context_fn: Callable,
               remat: Callable | None, rng: jax.Array | None) -> jax.Array:
  """Runs the layer stack pipelined. x: [B, T, E] -> [B, T, E].

  layer_params: one layer's parameters stacked on a leading [L] axis.
  fields: the batch fields [B, ...] the attention context is built from.
  layer_fn(params_of_one_layer, x [mb, T, E], ctx, key) -> x applies one
    layer (key: that layer's dropout key, or None).
  context_fn(fields of one microbatch) -> ctx, the attention context.
  remat: None, or a wrapper (`jax.checkpoint` with a policy) applied to the
    stage body.
  """
  s_count, repeats, m_count = mc.pipeline, mc.repeats, mc.num_microbatches
  items = m_count * repeats
  ticks = items + s_count - 1
  num_layers = jax.tree.leaves(layer_params)[0].shape[0]
  chunk = num_layers // (s_count * repeats)
  b = x.shape[0]
  mb = b // m_count

  def micro(a):  # [B, ...] -> [M, mb, ...]
    return a.reshape(m_count, mb, *a.shape[1:])

  # Activations cross stages in float32: XLA CPU cannot partition the
  # bfloat16 ppermute / psum of this loop (it aborts while compiling).
  xs = micro(x).astype(jnp.float32)
  fields = {k: micro(v) for k, v in fields.items()}
  params = stage_params(layer_params, s_count, repeats)

  def stage_body(p, rep, inp, field_m, key):
    """One stage's chunk of layers on one microbatch.

    p: [R, C, ...] this stage's chunks; the repeat's chunk is sliced here,
    inside the (rematerialised) body, so the scan over ticks keeps no
    per-tick copy of the weights.
    """
    p = jax.tree.map(lambda a: a[rep], p)  # [C, ...]
    ctx = context_fn(field_m)

    def layer(h, xs_j):
      p_j, j = xs_j
      k = None if key is None else jax.random.fold_in(key, j)
      return layer_fn(p_j, h, ctx, k), None

    out, _ = jax.lax.scan(layer, inp.astype(x.dtype), (p, jnp.arange(chunk)))
    return out.astype(jnp.float32)

  if remat is not None:
    stage_body = remat(stage_body)

  def per_stage(params, xs, fields, rng):
    # params: [1, R, C, ...] (this stage's slice); xs: [M, mb, T, E].
    stage = jax.lax.axis_index('pipeline')
    ring = [(j, (j + 1) % s_count) for j in range(s_count)]

    def tick(carry, t):
      cur, circ, out = carry
      # Stage 0 files what the last stage sent for the next repeat of item
      # t - S, then reads its input: a fresh microbatch or a circulated one.
      back = t - s_count
      slot = jnp.mod(back, m_count)
      circ = jnp.where((stage == 0) & (back >= 0),
                       circ.at[slot].set(cur), circ)
      fresh = jnp.where(t < m_count, xs[jnp.minimum(t, m_count - 1)],
                        circ[jnp.mod(t, m_count)])
      inp = jnp.where(stage == 0, fresh, cur)

      item = t - stage
      valid = (item >= 0) & (item < items)
      item_c = jnp.clip(item, 0, items - 1)
      rep, m = item_c // m_count, jnp.mod(item_c, m_count)
      field_m = {k: v[m] for k, v in fields.items()}
      key = None
      if rng is not None:  # one key per (microbatch, global layer index)
        key = jax.random.fold_in(jax.random.fold_in(rng, m),
                                 (rep * s_count + stage) * chunk)
      # vmap over the local stage dimension (size 1 per pipeline device).
      # With one repeat the chunk index is static: the weights stay a loop
      # invariant of the tick scan instead of a per-tick residual.
      y = jax.vmap(stage_body, in_axes=(0, None, None, None, None))(
          params, 0 if repeats == 1 else rep, inp, field_m, key)[0]
      y = jnp.where(valid, y, inp)

      done = valid & (stage == s_count - 1) & (rep == repeats - 1)
      out = jnp.where(done, out.at[m].set(y), out)
      cur = jax.lax.ppermute(y, 'pipeline', ring)
      return (cur, circ, out), None

    zeros = jnp.zeros_like(xs)
    (_, _, out), _ = jax.lax.scan(tick, (jnp.zeros_like(xs[0]), zeros, zeros),
                                  jnp.arange(ticks))
    # Only the last stage holds the outputs; share them with every stage.
    out = jnp.where(stage == s_count - 1, out, 0.0)
    return jax.lax.psum(out, 'pipeline')

  param_specs = jax.tree.map(lambda _: P('pipeline'), params)
  field_specs = {k: P() for k in fields}
  args, specs = (params, xs, fields), (param_specs, P(), field_specs)
  if rng is None:
    body = lambda p, x, f: per_stage(p, x, f, None)
  else:
    body, args, specs = per_stage, args + (rng,), specs + (P(),)
  run = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(),
                      axis_names={'pipeline'}, check_vma=False)
  out = run(*args)
  return out.reshape(b, *out.shape[2:]).astype(x.dtype)
