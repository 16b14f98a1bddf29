"""The train state: its one layout, its initialisation and its shardings.

  state = {'params':    the weights the step computes with,
           'opt_state': the optax state (Adam's mu and nu mirror params),
           'loss_ema':  float32 running mean of the loss (spike detection),
           'bad_steps': int32 consecutive skipped steps}

With 16-bit weights (`ModelConfig.param_dtype = 'bfloat16'`, GLM-130B's
scheme) 'params' and the gradients are bf16 and the optimiser state is
`{'master': float32 weights, 'inner': the optax state of the master}`;
both are laid out like the parameters, and ZeRO-1 splits them over `data`.
Checkpoints hold the master weights, not the bf16 copy (`to_saved`,
`from_saved`). Orbax checkpoints of a run (`W/checkpoints/`) hold exactly
`to_saved(state)`; the trainer, `glm plan` and the tests all build it here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from glm.model import transformer
from glm.model.config import ModelConfig
from glm.parallel import mesh as mesh_lib


def _cast(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda a: a.astype(dtype), tree)


def new_state(params: Any, opt: optax.GradientTransformation,
              param_dtype: str = 'float32') -> dict:
  """A fresh state around float32 `params` (arrays, or ShapeDtypeStructs
  under `jax.eval_shape`)."""
  if param_dtype == 'float32':
    opt_state = opt.init(params)
  else:
    master = _cast(params, jnp.float32)
    params = _cast(master, jnp.dtype(param_dtype))
    opt_state = {'master': master, 'inner': opt.init(master)}
  return {'params': params, 'opt_state': opt_state,
          'loss_ema': jnp.float32(0), 'bad_steps': jnp.int32(0)}


def has_master(state: dict) -> bool:
  opt_state = state.get('opt_state')
  return isinstance(opt_state, dict) and 'master' in opt_state


def float32_params(state: dict) -> Any:
  """The full-precision weights: the master copy when there is one."""
  return state['opt_state']['master'] if has_master(state) else state['params']


def to_saved(state: dict) -> dict:
  """What a checkpoint holds: the state without the bf16 weight copy when
  master weights exist (they are what the run restores from)."""
  if not has_master(state):
    return state
  return {k: v for k, v in state.items() if k != 'params'}


def from_saved(saved: dict, like: dict) -> dict:
  """The state `to_saved` came from; `like` gives the weight dtype."""
  if 'params' in saved:
    return saved
  dtype = jax.tree.leaves(like['params'])[0].dtype
  return {'params': _cast(saved['opt_state']['master'], dtype), **saved}


def abstract_state(cfg: ModelConfig, opt: optax.GradientTransformation
                   ) -> dict:
  """ShapeDtypeStructs of the state, without allocating anything."""
  return jax.eval_shape(lambda p: new_state(p, opt, cfg.param_dtype),
                        transformer.abstract_params(cfg))


def state_specs(state: dict, cfg: ModelConfig,
                mc: mesh_lib.MeshConfig) -> dict:
  """PartitionSpecs of every leaf (of a state or of `to_saved(state)`):
  parameters by the rule table, optimiser leaves, master weights included,
  like the parameter they mirror (+ `data` with ZeRO-1), the rest
  replicated."""
  pspecs = mesh_lib.param_specs(transformer.logical_axes(cfg))
  specs = {k: jax.tree.map(lambda _: jax.sharding.PartitionSpec(), v)
           for k, v in state.items()}
  if 'params' in state:
    specs['params'] = pspecs
  if 'opt_state' in state:
    specs['opt_state'] = mesh_lib.mirror_specs(
        state['opt_state'], float32_params(state) if has_master(state)
        else state['params'], pspecs, mc)
  return specs


def state_shardings(state: dict, cfg: ModelConfig, mc: mesh_lib.MeshConfig,
                    mesh: jax.sharding.Mesh) -> dict:
  return mesh_lib.to_shardings(state_specs(state, cfg, mc), mesh)


def init_state(cfg: ModelConfig, opt: optax.GradientTransformation, *,
               seed: int, params: Any = None,
               mesh_cfg: mesh_lib.MeshConfig | None = None,
               mesh: jax.sharding.Mesh | None = None) -> dict:
  """The initial state: `params` if given (fine-tuning), else initialised
  from `seed`; with a mesh, built in place already sharded."""

  def make(params):
    if params is None:
      params = transformer.init_params(cfg, jax.random.PRNGKey(seed))
    return new_state(params, opt, cfg.param_dtype)

  if mesh is None:
    return jax.jit(make)(params)  # one program, not one dispatch per op
  shardings = state_shardings(jax.eval_shape(make, params), cfg, mesh_cfg,
                              mesh)
  return jax.jit(make, out_shardings=shardings)(params)
