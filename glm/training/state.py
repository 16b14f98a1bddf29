"""The train state: its one layout, its initialisation and its shardings.

  state = {'params':    the model's float32 parameters,
           'opt_state': the optax state (Adam's mu and nu mirror params),
           'loss_ema':  float32 running mean of the loss (spike detection),
           'bad_steps': int32 consecutive skipped steps}

Orbax checkpoints of a run (`W/checkpoints/`) hold exactly this tree; the
trainer, `glm plan` and the tests all build it here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from glm.model.config import ModelConfig
from glm.model import transformer
from glm.parallel import mesh as mesh_lib



def new_state(params: Any, opt: optax.GradientTransformation) -> dict:
  """A fresh state around `params` (arrays or ShapeDtypeStructs under
  `jax.eval_shape`)."""
  return {'params': params, 'opt_state': opt.init(params),
          'loss_ema': jnp.float32(0), 'bad_steps': jnp.int32(0)}


def abstract_state(cfg: ModelConfig, opt: optax.GradientTransformation
                   ) -> dict:
  """ShapeDtypeStructs of the state, without allocating anything."""
  return jax.eval_shape(lambda: new_state(transformer.abstract_params(cfg),
                                          opt))


def state_specs(state: dict, cfg: ModelConfig,
                mc: mesh_lib.MeshConfig) -> dict:
  """PartitionSpecs of every leaf: parameters by the rule table, optimiser
  leaves like the parameter they mirror (+ `data` with ZeRO-1), the rest
  replicated."""
  pspecs = mesh_lib.param_specs(transformer.logical_axes(cfg))
  specs = {k: jax.tree.map(lambda _: jax.sharding.PartitionSpec(), v)
           for k, v in state.items()}
  specs['params'] = pspecs
  if 'opt_state' in state:
    specs['opt_state'] = mesh_lib.mirror_specs(
        state['opt_state'], state['params'], pspecs, mc)
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
    return new_state(params, opt)

  if mesh is None:
    return make(params)
  shardings = state_shardings(jax.eval_shape(make, params), cfg, mesh_cfg,
                              mesh)
  return jax.jit(make, out_shardings=shardings)(params)
