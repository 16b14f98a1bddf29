"""The jitted train and eval steps.

  train_step(state, batch [A, B, T], rng) -> (state, metrics)
  eval_step(params, batch [B, T]) -> (loss sum, token count, correct count)

The train step accumulates gradients over A micro-batches (token-weighted),
then applies the update unless the loss or the gradients are not finite, or
the loss spikes (`FailurePolicy`); such steps leave the state unchanged but
count in `bad_steps`. With a mesh both run sharded (`ShardedStep`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from glm.model.config import ModelConfig
from glm.model import transformer
from glm.parallel import mesh as mesh_lib
from glm.parallel import pipeline
from glm.training import losses
from glm.training import state as state_lib



@dataclasses.dataclass(frozen=True)
class FailurePolicy:
  """What to do with bad steps (GLM-130B fought loss spikes)."""
  max_bad_steps: int = 5          # stop after this many consecutive skips
  spike_factor: float = 0.0       # skip when loss > factor * running mean; 0: off
  ema_decay: float = 0.99         # running mean of the loss


def make_model(cfg: ModelConfig, mesh_cfg: mesh_lib.MeshConfig | None = None,
               mesh: jax.sharding.Mesh | None = None
               ) -> transformer.Transformer:
  """The Transformer, its layer stack pipelined when the mesh has stages."""
  if mesh is not None and mesh_cfg is not None and mesh_cfg.pipeline > 1:
    return transformer.Transformer(cfg, pipeline.PipelineRunner(mesh_cfg,
                                                                mesh))
  return transformer.Transformer(cfg)


def make_train_step(cfg: ModelConfig, opt: optax.GradientTransformation, *,
                    z_loss: float = 0.0, policy: FailurePolicy = FailurePolicy(),
                    mesh_cfg: mesh_lib.MeshConfig | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    donate: bool = True):
  """Returns jitted (train_step, eval_step); see the module docstring.

  The train step donates its input state (`donate`): parameters and
  optimiser moments are updated in place instead of being held twice, so
  a state passed in must not be used again (use the one returned).

  With a `mesh`, both run sharded: parameters, gradients and optimiser state
  as `glm.training.state.state_shardings` says (FSDP, ZeRO-1, tensor,
  pipeline stages), activations by the logical constraints in the model, the
  batch split over the data axes; the layer stack is pipelined when
  `mesh_cfg.pipeline` > 1.
  """
  sharded = mesh is not None
  if sharded:
    mesh_cfg = mesh_cfg or mesh_lib.MeshConfig()
    param_shardings = mesh_lib.to_shardings(
        mesh_lib.param_specs(transformer.logical_axes(cfg)), mesh)
  model = make_model(cfg, mesh_cfg, mesh)

  def loss_sums(params, batch, rng):
    kw = {} if rng is None else {'deterministic': False,
                                 'rngs': {'dropout': rng}}
    x, w = model.apply({'params': params}, batch, output_layer=False, **kw)
    return losses.output_loss(x, w, batch['targets'], batch['loss_mask'],
                              vocab_size=cfg.vocab_size, z_loss=z_loss)

  def micro_grads(params, micro, rng):
    (total, count), grads = jax.value_and_grad(loss_sums, has_aux=True)(
        params, micro, rng)
    return total, count, grads

  def accumulate(params, batch, rng):
    """Summed loss, token count and gradients over the A micro-batches."""
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    key = lambda i: None if rng is None else jax.random.fold_in(rng, i)
    if num_micro == 1:  # no zeroed accumulator, no loop
      return micro_grads(params, jax.tree.map(lambda x: x[0], batch), key(0))

    def body(carry, xs):
      micro, i = xs
      total, count, grads = carry
      t, c, g = micro_grads(params, micro, key(i))
      return (total + t, count + c,
              jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (total, count, grads), _ = jax.lax.scan(
        body, (jnp.float32(0), jnp.float32(0), zeros),
        (batch, jnp.arange(num_micro)))
    return total, count, grads

  def train_step(state, batch, rng=None):
    """rng: the step's dropout key (fold_in(seed key, step)), or None."""
    params = state['params']
    total, count, grads = accumulate(params, batch, rng)
    count = jnp.maximum(count, 1.0)
    loss = total / count
    # Gradients keep the weights' dtype (bf16 with 16-bit weights).
    grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)
    if sharded:  # gradients live where their parameters live
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.global_norm(
        jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ema = state['loss_ema']
    spike = ((policy.spike_factor > 0) & (ema > 0)
             & (loss > policy.spike_factor * ema))
    ok = finite & ~spike

    def update(_):
      new_ema = jnp.where(ema > 0, policy.ema_decay * ema
                          + (1 - policy.ema_decay) * loss, loss)
      if not state_lib.has_master(state):
        updates, new_opt = opt.update(grads, state['opt_state'], params)
        return optax.apply_updates(params, updates), new_opt, new_ema
      # 16-bit weights: AdamW steps the float32 master copy (in the sharded
      # optimiser state); the step's weights are its bf16 rounding.
      master = state['opt_state']['master']
      g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
      updates, inner = opt.update(g32, state['opt_state']['inner'], master)
      master = optax.apply_updates(master, updates)
      new_params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
      return new_params, {'master': master, 'inner': inner}, new_ema

    # A bad step runs no optimiser update at all (one branch executes), and
    # leaves parameters, moments and the loss mean as they were.
    new_params, new_opt, new_ema = jax.lax.cond(
        ok, update, lambda _: (params, state['opt_state'], ema), None)
    bad_steps = jnp.where(ok, 0, state['bad_steps'] + 1)
    new_state = {'params': new_params, 'opt_state': new_opt,
                 'loss_ema': new_ema, 'bad_steps': bad_steps}
    return new_state, {'loss': loss, 'grad_norm': grad_norm, 'skipped': ~ok,
                       'nonfinite': ~finite, 'tokens': count,
                       'bad_steps': bad_steps}

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch)
    total, count = losses.cross_entropy(logits, batch['targets'],
                                        batch['loss_mask'])
    # Teacher-forced top-1 accuracy of the counted tokens (padded-vocab
    # logits are the float32 minimum and never win).
    hit = jnp.argmax(logits, axis=-1) == batch['targets']
    correct = jnp.sum(hit * batch['loss_mask'].astype(jnp.float32))
    return total, count, correct

  if not sharded:
    return (jax.jit(train_step, donate_argnums=0 if donate else ()),
            jax.jit(eval_step))
  return (ShardedStep(train_step, cfg, mesh_cfg, mesh, state_out=True,
                      donate=donate),
          ShardedStep(eval_step, cfg, mesh_cfg, mesh, state_out=False))


class ShardedStep:
  """jit with the state's shardings, traced under the mesh and axis rules.

  The output state keeps the shardings of `state.state_shardings` (they are
  computed from the first state it sees); inputs keep theirs.
  """

  def __init__(self, fn, cfg, mesh_cfg, mesh, *, state_out: bool,
               donate: bool = False):
    self.fn, self.cfg, self.mesh_cfg, self.mesh = fn, cfg, mesh_cfg, mesh
    self.state_out, self.donate = state_out, donate
    self.jitted = None

  def _jit(self, state):
    out = None
    if self.state_out:
      out = (state_lib.state_shardings(state, self.cfg, self.mesh_cfg,
                                       self.mesh), None)
    return jax.jit(self.fn, out_shardings=out,
                   donate_argnums=0 if self.donate else ())

  def __call__(self, *args):
    if self.jitted is None:
      self.jitted = self._jit(args[0])
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.rules()):
      return self.jitted(*args)

  def lower(self, *args):
    """Lowers without running (for `glm plan` style checks)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.rules()):
      return self._jit(args[0]).lower(*args)

  def export(self, *args, platforms: tuple[str, ...],
             disabled_checks=()) -> jax.export.Exported:
    """`jax.export` of the step for other platforms (e.g. 'cuda', 'tpu'),
    from any host: the model's 'pallas' / 'auto' attention picks each
    platform's kernel (pass `glm.pallas_kernels.attention.EXPORT_CHECKS` for the
    Triton kernel's custom call). The exported function takes and returns
    flat lists of leaves (`jax.tree.leaves` of the arguments and of the
    result): optax's state classes have no export serialization."""
    leaves, tree = jax.tree.flatten(args)
    jitted = self._jit(args[0])

    def flat(*xs):
      return jax.tree.leaves(jitted(*jax.tree.unflatten(tree, xs)))

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.rules()):
      return jax.export.export(jax.jit(flat), platforms=platforms,
                               disabled_checks=disabled_checks)(*leaves)
