"""Building blocks: `dense`, norms, the feed-forward block, embeddings and
initialisers.

Einsum letters: B batch, T length, E embed (hidden), F mlp width, G the two
halves of a gated FFN, V padded vocabulary, H heads, D head dim.
Parameters are float32 (the block kernels are int8 with float32 scales in a
quantised model, `glm.model.quant`). `cfg.dtype` is a compute policy (`precision`):
'float32'; 'bfloat16', bf16 activations and matmuls (accelerators);
'mixed', bf16 matmul inputs with float32 accumulation and float32
elementwise work and residual stream (what torch autocast does, and what XLA
CPU runs fastest); 'auto', 'mixed' on CPU and 'bfloat16' elsewhere. Norms,
softmax, logits and losses are float32 under every policy.

Every product of an activation with a weight matrix in the model (q, k, v
and attention output, MLP in and out, the tied logits and the chunked output
loss) goes through `dense`, with the weight's logical axis names: the one
place where quantised weights or an int4 matmul kernel plug in.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import dataclasses
import functools

import jax
import jax.numpy as jnp

from glm.model import quant
from glm.model.config import ModelConfig

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Precision:
  """A compute policy: the dtype of activations (the residual stream and
  elementwise work) and of matmul inputs; matmuls accumulate in float32
  whenever their inputs are narrower than the activations."""
  name: str
  activation: Any
  matmul: Any

  @property
  def dense(self) -> dict:
    """`dense` keywords: matmul inputs in, activations out."""
    return {'dtype': self.matmul, 'out_dtype': self.activation}

  def describe(self) -> str:
    return {'float32': 'float32 throughout',
            'bfloat16': 'bf16 activations and matmuls, float32 norms, '
                        'softmax and loss',
            'mixed': 'bf16 matmul inputs, float32 accumulation and '
                     'elementwise work'}[self.name]


def resolve_dtype(dtype: str) -> str:
  """'auto' -> 'mixed' on CPU (bf16 x bf16 -> f32 dots are the fast ones
  there), 'bfloat16' on accelerators; other policies stay as they are."""
  if dtype != 'auto':
    return dtype
  return 'mixed' if jax.default_backend() == 'cpu' else 'bfloat16'


def precision(cfg: ModelConfig) -> Precision:
  name = resolve_dtype(cfg.dtype)
  f32, bf16 = jnp.float32, jnp.bfloat16
  activation, matmul = {'float32': (f32, f32), 'bfloat16': (bf16, bf16),
                        'mixed': (f32, bf16)}[name]
  return Precision(name, activation, matmul)


def compute_dtype(cfg: ModelConfig):
  """The activation dtype of the policy."""
  return precision(cfg).activation


def normal_init(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


def xavier_normal(gain: float, in_axis: Sequence[int],
                  out_axis: Sequence[int]) -> Initializer:
  """Xavier (Glorot) normal, std = gain * sqrt(2 / (fan_in + fan_out))."""
  return nn.initializers.variance_scaling(
      gain ** 2, 'fan_avg', 'normal', in_axis=tuple(in_axis),
      out_axis=tuple(out_axis))


def kernel_init(cfg: ModelConfig, *, scaled: bool, in_axis: Sequence[int],
                out_axis: Sequence[int]) -> Initializer:
  """Initialiser for a projection kernel.

  Pre-LN models draw from N(0, init_std). DeepNorm models use Xavier normal,
  with gain beta = (2N)^-1/2 on the `scaled` projections (FFN, value and
  attention output) as GLM-130B does.
  """
  if cfg.norm_layout == 'deepnorm':
    gain = cfg.deepnorm_init_scale if scaled else 1.0
    return xavier_normal(gain, in_axis, out_axis)
  return normal_init(cfg.init_std)


def dense(eqn: str, x: jax.Array, w: jax.Array, axes: Sequence[str | None],
          *, dtype, out_dtype=None) -> jax.Array:
  """The model's one weight product: einsum(eqn, x, w) in `dtype`.

  eqn: two operands, activation first, e.g. 'bte,ehd->bthd'.
  w: the weight, its dims named by `axes` (the logical axis names it was
    declared with, e.g. ('embed', 'heads', 'kv')), one per letter of the
    weight's term in eqn.
  dtype: the dtype both operands are cast to; out_dtype: the accumulation
    and result dtype (None: dtype's own, as jnp.einsum gives). When it is
    wider than dtype (the 'mixed' policy), the backward products take their
    inputs in dtype too and accumulate in out_dtype, as the forward does.
  """
  if isinstance(w, quant.Quantized):
    return quant.quantized_dense(eqn, x, w, dtype=dtype, out_dtype=out_dtype)
  operands, _ = eqn.split('->')
  w_letters = operands.split(',')[1]
  if not len(w_letters) == w.ndim == len(axes):
    raise ValueError(f'dense {eqn!r}: weight of shape {w.shape} with axes '
                     f'{tuple(axes)} does not match its term {w_letters!r}.')
  if out_dtype is not None and jnp.dtype(out_dtype) != jnp.dtype(dtype):
    return _mixed_einsum(eqn, jnp.dtype(dtype), jnp.dtype(out_dtype), x, w)
  return jnp.einsum(eqn, x.astype(dtype), w.astype(dtype),
                    preferred_element_type=out_dtype)


def _transposed(eqn: str) -> tuple[str, str]:
  """'x,w->o' -> ('o,w->x', 'x,o->w'): the products of the two gradients."""
  operands, o = eqn.split('->')
  x, w = operands.split(',')
  for term, others in ((x, w + o), (w, x + o)):
    if any(c not in others for c in term):
      raise ValueError(f'dense {eqn!r}: a letter of {term!r} appears in no '
                       'other term; its gradient is not one product.')
  return f'{o},{w}->{x}', f'{x},{o}->{w}'


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixed_einsum(eqn, dtype, out_dtype, x, w):
  return jnp.einsum(eqn, x.astype(dtype), w.astype(dtype),
                    preferred_element_type=out_dtype)


def _mixed_einsum_fwd(eqn, dtype, out_dtype, x, w):
  xc, wc = x.astype(dtype), w.astype(dtype)
  y = jnp.einsum(eqn, xc, wc, preferred_element_type=out_dtype)
  return y, (xc, wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _mixed_einsum_bwd(eqn, dtype, out_dtype, res, g):
  xc, wc, x_dt, w_dt = res
  dx_eqn, dw_eqn = _transposed(eqn)
  gc = g.astype(dtype)
  dx = jnp.einsum(dx_eqn, gc, wc, preferred_element_type=out_dtype)
  dw = jnp.einsum(dw_eqn, xc, gc, preferred_element_type=out_dtype)
  return dx.astype(x_dt.dtype), dw.astype(w_dt.dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def kernel(module: nn.Module, cfg: ModelConfig, name: str, init: Initializer,
           shape: tuple[int, ...], names: tuple[str, ...], *,
           contract: int) -> jax.Array | quant.Quantized:
  """A weight matrix whose first `contract` dims are the input: a float32
  param, or under `cfg.quant_bits` its int8 values (`name`) and float32
  per-output-channel scales (`name + '_scale'`), see `glm.model.quant`."""
  if not cfg.quant_bits:
    return param(module, name, init, shape, names)
  q = module.param(name, nn.with_logical_partitioning(
      nn.initializers.zeros, names),
                   quant.packed_shape(shape, cfg.quant_bits, contract),
                   jnp.int8)
  scale = param(module, f'{name}_scale', nn.initializers.ones,
                shape[contract:], names[contract:])
  return quant.Quantized(q, scale, cfg.quant_bits, cfg.quant_matmul_impl)


def param(module: nn.Module, name: str, init: Initializer,
          shape: tuple[int, ...], names: tuple[str | None, ...]) -> jax.Array:
  """A float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      jnp.float32)


class Norm(nn.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale only), computed in fp32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    xf = x.astype(jnp.float32)
    scale = param(self, 'scale', nn.initializers.ones, (cfg.hidden,),
                  ('embed',))
    if cfg.norm_type == 'rmsnorm':
      y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True)
                             + cfg.norm_eps)
      y = y * scale
    else:
      mean = jnp.mean(xf, -1, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
      bias = param(self, 'bias', nn.initializers.zeros, (cfg.hidden,),
                   ('embed',))
      y = y * scale + bias
    return y.astype(compute_dtype(cfg))


class Mlp(nn.Module):
  """Feed-forward block: GeLU (tanh), GeGLU (exact GELU) or SwiGLU.

  Gated variants project E -> 2F, split into halves (x1, x2) and return
  x1 * act(x2) projected back to E; the halves are a separate `glu` axis of
  the kernel so that tensor parallelism never splits them across devices.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    kw = precision(cfg).dense
    dt = kw['out_dtype']  # activations
    e, f = cfg.hidden, cfg.mlp_dim
    if cfg.is_gated:
      wi_axes = ('embed', 'glu', 'mlp')
      wi = kernel(self, cfg, 'wi', kernel_init(cfg, scaled=True, in_axis=[0],
                                               out_axis=[1, 2]),
                  (e, 2, f), wi_axes, contract=1)
      h = dense('bte,egf->gbtf', x, wi, wi_axes, **kw)
      if cfg.use_bias:
        bi = param(self, 'wi_bias', nn.initializers.zeros, (2, f),
                   ('glu', 'mlp'))
        h = h + bi.astype(dt)[:, None, None, :]
      x1, x2 = h[0], h[1]
      if cfg.mlp_activation == 'geglu':
        h = x1 * jax.nn.gelu(x2, approximate=False)
      else:
        h = x1 * jax.nn.silu(x2)
    else:
      wi_axes = ('embed', 'mlp')
      wi = kernel(self, cfg, 'wi', kernel_init(cfg, scaled=True, in_axis=[0],
                                               out_axis=[1]),
                  (e, f), wi_axes, contract=1)
      h = dense('bte,ef->btf', x, wi, wi_axes, **kw)
      if cfg.use_bias:
        h = h + param(self, 'wi_bias', nn.initializers.zeros, (f,),
                      ('mlp',)).astype(dt)
      h = jax.nn.gelu(h, approximate=True)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    wo_axes = ('mlp', 'embed')
    wo = kernel(self, cfg, 'wo', kernel_init(cfg, scaled=True, in_axis=[0],
                                             out_axis=[1]),
                (f, e), wo_axes, contract=1)
    y = dense('btf,fe->bte', h, wo, wo_axes, **kw)
    if cfg.use_bias:
      y = y + param(self, 'wo_bias', nn.initializers.zeros, (e,),
                    ('embed',)).astype(dt)
    return y


def shrink_gradient(x: jax.Array, alpha: float) -> jax.Array:
  """GLM-130B's embedding gradient shrink: value x, gradient alpha * grad."""
  if alpha == 1.0:
    return x
  return alpha * x + jax.lax.stop_gradient(x) * (1.0 - alpha)


EMBED_AXES = ('vocab', 'embed')  # the embedding table and the output matrix


class Embed(nn.Module):
  """Token embedding table [V, E]; `attend` gives tied output logits."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = param(self, 'embedding', normal_init(cfg.init_std),
                           (cfg.padded_vocab_size, cfg.hidden), EMBED_AXES)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # [B, T] -> [B, T, E]
    return jnp.take(self.embedding, tokens, axis=0).astype(
        compute_dtype(self.cfg))

  def attend(self, x: jax.Array) -> jax.Array:
    # [B, T, E] x [V, E] -> [B, T, V] in float32.
    dt = precision(self.cfg).matmul
    return tied_logits(x.astype(dt), self.embedding.astype(dt))


@jax.custom_vjp
def tied_logits(x: jax.Array, table: jax.Array) -> jax.Array:
  """Output logits with the embedding table: [B, T, E] x [V, E] -> [B, T, V].

  Float32 logits from x and table in the matmul dtype (the backward takes
  the logit gradient in that dtype too and accumulates in float32). The same
  product as autodiff's, but the backward computes
  the table gradient as (x^T g)^T: autodiff's g^T x makes XLA CPU lay the
  [B, T, V] logit gradient out transposed (a second, cache-hostile pass over
  the largest tensor of the step), which cost more than the matmuls.
  """
  return dense('bte,ve->btv', x, table, EMBED_AXES, dtype=table.dtype,
               out_dtype=jnp.float32)


def _tied_logits_fwd(x, table):
  return tied_logits(x, table), (x, table)


def _tied_logits_bwd(res, g):
  x, table = res  # g: [B, T, V] float32
  g = g.astype(table.dtype)
  dx = jnp.einsum('btv,ve->bte', g, table, preferred_element_type=jnp.float32)
  d_table = jnp.einsum('bte,btv->ev', x, g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), d_table.T.astype(table.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)
