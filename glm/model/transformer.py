"""The Transformer decoder shared by BLOOM, GLM-130B and UL2-style models.

Usage, as a pure function:

  model = Transformer(cfg)
  params = model.init(rng, batch)['params']
  logits = model.apply({'params': params}, batch)   # [B, T, V] float32

Letters: B batch, T length, E embed, V padded vocabulary. Logits of the
padding rows of the vocabulary (ids >= cfg.vocab_size) are set to the float32
minimum so that softmax, loss and sampling never see them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm.model.attention import attention_context
from glm.model.attention import CONTEXT_FIELDS, Attention, AttentionContext
from glm.model.config import ModelConfig
from glm.model.layers import Embed, Mlp, Norm, dense, precision
from glm.model.layers import normal_init, param, shrink_gradient
from glm.model import positions


_ACT = ('batch', 'length', 'embed')

REMAT_POLICIES = {
    'full': None,  # save nothing, recompute the whole block
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """One layer: pre-LN or DeepNorm (post-LN) attention + feed-forward.

  With `cfg.dropout_rate` > 0 and deterministic=False, dropout applies to the
  attention and FFN outputs before they join the residual stream (BLOOM's
  hidden dropout); its keys come from the 'dropout' rng stream.
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, ctx: AttentionContext):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    attn = lambda h, c: drop(Attention(cfg, name='attention')(h, c))
    mlp = lambda h: drop(Mlp(cfg, name='mlp')(h))
    ln1 = Norm(cfg, name='input_norm')
    ln2 = Norm(cfg, name='post_attention_norm')
    if cfg.norm_layout in ('post', 'deepnorm'):
      # a = LN(x); x' = alpha*a + Attn(a); b = LN(x'); y = alpha*b + FFN(b)
      # (alpha = 1 is post-LN: each sum normalised by the next LN)
      alpha = cfg.deepnorm_alpha
      a = ln1(x)
      x = alpha * a + attn(a, ctx)
      b = ln2(x)
      x = alpha * b + mlp(b)
    else:
      x = x + attn(ln1(x), ctx)
      x = x + mlp(ln2(x))
    x = nn.with_logical_constraint(x, _ACT)
    return x, None


class Transformer(nn.Module):
  """Embedding -> [embedding LN] -> N blocks -> [final norm] -> logits.

  `pipeline`, when given, runs the scanned layer stack instead of the plain
  scan, on the same parameters: a callable
    pipeline(layer_params, x, fields, *, layer_fn, context_fn, remat, rng)
  such as `glm.parallel.pipeline.PipelineRunner` (stages over the mesh's
  `pipeline` axis). Initialise with the plain model (`init_params`).
  """
  cfg: ModelConfig
  pipeline: Callable[..., jax.Array] | None = None

  @nn.compact
  def __call__(self, batch: dict[str, jax.Array], *,
               deterministic: bool = True, output_layer: bool = True):
    """[B, T, V] float32 logits; with output_layer=False instead the final
    hidden states [B, T, E] and the output matrix [V, E] (what
    `losses.output_loss` takes, so that the logits are never materialised)."""
    cfg = self.cfg
    deterministic = deterministic or cfg.dropout_rate == 0.0
    tokens = batch['tokens']
    if batch.get('position_ids') is None:  # once, for embeddings and attention
      batch = dict(batch, position_ids=positions.default_position_ids(
          tokens, batch.get('segment_ids')))
    embed = Embed(cfg, name='embed')
    x = embed(tokens)  # [B, T, E]
    x = shrink_gradient(x, cfg.embed_grad_shrink)
    if cfg.position == 'learned':
      table = param(self, 'position_embedding', normal_init(cfg.init_std),
                    (cfg.max_len, cfg.hidden), ('position', 'embed'))
      x = x + jnp.take(table, batch['position_ids'], axis=0).astype(x.dtype)
    if cfg.embed_norm:
      x = Norm(cfg, name='embed_norm')(x)
    x = nn.with_logical_constraint(x, _ACT)

    ctx = attention_context(cfg, batch)
    block = Block
    if cfg.remat_policy != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    if self.pipeline is not None:
      if ctx.cache_index is not None:
        raise ValueError('decoding with a KV cache runs without pipeline '
                         'stages; build the Transformer without `pipeline`.')
      x = self._pipelined_layers(x, batch, deterministic)
    elif cfg.scan_layers:
      x, _ = nn.scan(
          block, variable_axes={'params': 0, 'cache': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast,), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'},
          unroll=scan_unroll(cfg),
      )(cfg, deterministic, name='layers')(x, ctx)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, deterministic, name=f'layers_{i}')(x, ctx)

    if cfg.final_norm:
      x = Norm(cfg, name='final_norm')(x)
    dt = precision(cfg).matmul  # the output layer's input dtype
    head_axes = ('embed', 'vocab')
    if not cfg.tie_embeddings:
      w = param(self, 'lm_head', normal_init(cfg.init_std),
                (cfg.hidden, cfg.padded_vocab_size), head_axes)
    if not output_layer:
      table = embed.embedding if cfg.tie_embeddings else w.T  # [V, E]
      return x.astype(dt), table.astype(dt)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = dense('bte,ev->btv', x, w, head_axes, dtype=dt,
                     out_dtype=jnp.float32)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    if cfg.padded_vocab_size != cfg.vocab_size:
      real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
    return logits


  def _pipelined_layers(self, x, batch, deterministic):
    layer_params = self.get_variable('params', 'layers')
    if layer_params is None:
      raise ValueError('a pipelined Transformer cannot initialise parameters;'
                       ' use transformer.init_params(cfg, rng).')
    cfg = self.cfg

    def layer_fn(p, h, ctx, key):
      rngs = None if key is None else {'dropout': key}
      return Block(cfg, deterministic).apply({'params': p}, h, ctx,
                                             rngs=rngs)[0]

    remat = None
    if cfg.remat_policy != 'none':
      remat = functools.partial(jax.checkpoint,
                                policy=REMAT_POLICIES[cfg.remat_policy])
    fields = {k: batch[k] for k in CONTEXT_FIELDS if batch.get(k) is not None}
    rng = None if deterministic else self.make_rng('dropout')
    return self.pipeline(
        layer_params, x, fields, layer_fn=layer_fn,
        context_fn=functools.partial(attention_context, cfg), remat=remat,
        rng=rng)


def scan_unroll(cfg: ModelConfig) -> int:
  """Layers per iteration of the scanned stack (`cfg.scan_unroll`; 0 is
  auto). The parameters stay stacked either way. Auto unrolls every layer
  on CPU, where XLA runs a rolled layer loop up to 1.3x slower (each layer's
  saved activations are copied into stacked buffers), and keeps one layer
  per iteration on accelerators, where compile time matters more."""
  if cfg.scan_unroll:
    return min(cfg.scan_unroll, cfg.num_layers)
  return cfg.num_layers if jax.default_backend() == 'cpu' else 1


def dummy_batch(cfg: ModelConfig, batch_size: int = 1,
                length: int = 8) -> dict[str, jax.Array]:
  """A batch of zeros with every field the model reads (for init/shapes)."""
  del cfg
  return {'tokens': jnp.zeros((batch_size, length), jnp.int32)}


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Initialises unboxed float32 parameters.

  Jitted: one compiled program instead of a dispatch (and a tiny compile) per
  initialiser op, which made start-up seconds slower; the values agree with
  op-by-op initialisation up to float rounding.
  """
  variables = Transformer(cfg).init(rng, dummy_batch(cfg))
  return nn.unbox(variables['params'])


def abstract_params(cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the parameters, without allocating any weights."""
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.PRNGKey(0), dummy_batch(cfg))['params'])
  return nn.unbox(boxed)


def logical_axes(cfg: ModelConfig) -> Any:
  """A pytree of logical-axis-name tuples, one per parameter."""
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.PRNGKey(0), dummy_batch(cfg))['params'])
  return nn.get_partition_spec(boxed)


def unstack_layers(params: Any, num_layers: int) -> Any:
  """Scanned params ('layers' stacked on axis 0) -> layers_0..layers_{N-1}."""
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(num_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def stack_layers(params: Any, num_layers: int) -> Any:
  """layers_0..layers_{N-1} -> one 'layers' subtree stacked on axis 0."""
  params = dict(params)
  per_layer = [params.pop(f'layers_{i}') for i in range(num_layers)]
  params['layers'] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  return params
