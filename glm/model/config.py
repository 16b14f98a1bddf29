"""The frozen model configuration shared by every module of the Transformer.

One `ModelConfig` describes a BLOOM causal decoder, a GLM-130B General Language
Model and a UL2 / PaLM-2-style prefix-LM decoder: the three seed families are
combinations of the switches below (see `configs/models/*.gin`). Gin binds the
fields at the edge (`ModelConfig.hidden = 1024`); layers only ever receive the
resulting frozen object.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import gin

from glm.errors import UserError

POSITIONS = ('alibi', 'rope', 'rope2d', 'learned', 'none')
NORM_LAYOUTS = ('pre', 'post', 'deepnorm')
NORM_TYPES = ('layernorm', 'rmsnorm')
MLP_ACTIVATIONS = ('gelu', 'geglu', 'swiglu')
DTYPES = ('float32', 'bfloat16', 'mixed', 'auto')  # see glm.model.layers
PARAM_DTYPES = ('float32', 'bfloat16')
ATTENTION_IMPLS = ('xla', 'blockwise', 'pallas', 'auto')  # see glm.model.attention
QUANT_BITS = (0, 8, 4)                                 # see glm.model.quant
QUANT_MATMUL_IMPLS = ('xla', 'pallas', 'auto')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')


class ConfigError(UserError):
  """A model configuration value that is out of range, with the fix."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the Transformer. All fields are plain JSON values."""

  # Sizes.
  vocab_size: int = 256            # real vocabulary entries
  vocab_pad_multiple: int = 128    # embedding rows are padded up to this
  hidden: int = 64
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 0                # 0 means hidden // num_heads
  mlp_dim: int = 256               # width of the FFN (per half for GLUs)
  max_len: int = 2048              # longest sequence the model accepts

  # Positions.
  position: str = 'alibi'          # one of POSITIONS
  rope_fraction: float = 1.0       # share of head dims rotated by 1D RoPE
  rope_base: float = 10000.0

  # Normalisation.
  norm_layout: str = 'pre'         # 'pre' (pre-LN), 'post' (plain post-LN)
                                   # or 'deepnorm' (post-LN, alpha and beta)
  norm_type: str = 'layernorm'     # or 'rmsnorm'
  norm_eps: float = 1e-5
  embed_norm: bool = False         # LayerNorm right after the embedding
  final_norm: bool = True

  # Feed-forward and projections.
  mlp_activation: str = 'gelu'     # one of MLP_ACTIVATIONS
  use_bias: bool = True

  # Embeddings.
  tie_embeddings: bool = True
  embed_grad_shrink: float = 1.0   # GLM-130B's alpha; 1.0 disables it
  init_std: float = 0.02
  dropout_rate: float = 0.0        # on attention and FFN outputs (training)

  # Numerics and compilation.
  dtype: str = 'float32'           # compute policy (DTYPES)
  param_dtype: str = 'float32'     # training weights and gradients; with
                                   # 'bfloat16', fp32 masters in the optimiser
  scan_layers: bool = True
  scan_unroll: int = 0             # layers per scan iteration; 0: auto
  remat_policy: str = 'none'       # one of REMAT_POLICIES
  attention_impl: str = 'xla'      # one of ATTENTION_IMPLS
  quant_bits: int = 0              # 0 float; 8 / 4 weight-only (glm quantize)
  quant_matmul_impl: str = 'xla'   # one of QUANT_MATMUL_IMPLS

  def __post_init__(self):
    _check_choice('position', self.position, POSITIONS)
    _check_choice('norm_layout', self.norm_layout, NORM_LAYOUTS)
    _check_choice('norm_type', self.norm_type, NORM_TYPES)
    _check_choice('mlp_activation', self.mlp_activation, MLP_ACTIVATIONS)
    _check_choice('dtype', self.dtype, DTYPES)
    _check_choice('param_dtype', self.param_dtype, PARAM_DTYPES)
    _check_choice('remat_policy', self.remat_policy, REMAT_POLICIES)
    _check_choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _check_choice('quant_matmul_impl', self.quant_matmul_impl,
                  QUANT_MATMUL_IMPLS)
    if self.quant_bits not in QUANT_BITS:
      raise ConfigError(f'ModelConfig.quant_bits={self.quant_bits!r} is not '
                        f'one of {QUANT_BITS} (0: float weights).')
    for name in ('vocab_size', 'vocab_pad_multiple', 'hidden', 'num_layers',
                 'num_heads', 'mlp_dim', 'max_len'):
      if getattr(self, name) < 1:
        raise ConfigError(f'ModelConfig.{name}={getattr(self, name)} must be '
                         'a positive integer.')
    if not self.head_dim and self.hidden % self.num_heads:
      raise ConfigError(
          f'ModelConfig.hidden={self.hidden} is not divisible by num_heads='
          f'{self.num_heads}; set head_dim explicitly or change num_heads.')
    if self.position == 'rope2d' and self.dims_per_head % 4:
      raise ConfigError(
          f'2D RoPE needs a head dim divisible by 4, got {self.dims_per_head}; '
          'change hidden or num_heads.')
    if self.position == 'rope' and (self.rotary_dims < 2
                                    or self.rotary_dims % 2):
      raise ConfigError(
          f'rope_fraction={self.rope_fraction} of head dim '
          f'{self.dims_per_head} gives {self.rotary_dims} rotary dims; it must '
          'be a positive even number.')
    if self.scan_unroll < 0:
      raise ConfigError(f'ModelConfig.scan_unroll={self.scan_unroll} must be '
                        '>= 0 (0: all layers on CPU, 1 elsewhere).')
    odd = [f'{n}={v}' for n, v in (('hidden', self.hidden),
                                   ('mlp_dim', self.mlp_dim),
                                   ('head dim', self.dims_per_head)) if v % 2]
    if self.quant_bits == 4 and odd:
      raise ConfigError(f'INT4 packs two weights per byte along the input '
                        f'dims, which must be even, not {", ".join(odd)}; '
                        'use --bits 8.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f'dropout_rate={self.dropout_rate} must be in [0, 1).')
    if not 0.0 < self.embed_grad_shrink <= 1.0:
      raise ConfigError(f'embed_grad_shrink={self.embed_grad_shrink} must be '
                       'in (0, 1]; 1.0 disables the shrink.')

  # Derived sizes --------------------------------------------------------------

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.hidden // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_pad_multiple
    return -(-self.vocab_size // m) * m

  @property
  def rotary_dims(self) -> int:
    """Head dims rotated by 1D RoPE (an even number)."""
    return int(self.dims_per_head * self.rope_fraction) // 2 * 2

  @property
  def gmask_positions(self) -> str:
    """Where a [gMASK] blank's generated tokens sit (training and
    generation alike): 'continue' (|A|, |A| + 1, ...: GLM-130B's 1D RoPE)
    or 'mask' (every one at the mask's index, with rising block positions
    under 2D RoPE: GLM)."""
    return 'continue' if self.position == 'rope' else 'mask'

  @property
  def deepnorm_alpha(self) -> float:
    """DeepNorm residual scale alpha = sqrt(2N) (GLM-130B); 1 for plain
    post-LN."""
    if self.norm_layout == 'post':
      return 1.0
    return math.sqrt(2.0 * self.num_layers)

  @property
  def deepnorm_init_scale(self) -> float:
    """DeepNorm init gain beta = (2N)^-1/2 on FFN, value and output."""
    return (2.0 * self.num_layers) ** -0.5

  @property
  def is_gated(self) -> bool:
    return self.mlp_activation in ('geglu', 'swiglu')

  # Serialisation --------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'ModelConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f'unknown ModelConfig fields {unknown}; known fields '
                       f'are {sorted(known)}.')
    return cls(**d)

  def replace(self, **kwargs) -> 'ModelConfig':
    return dataclasses.replace(self, **kwargs)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f'ModelConfig.{name}={value!r} is not one of {choices}.')
