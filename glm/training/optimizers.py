"""Optimisation recipes: AdamW, warmup + cosine schedules, batch-size ramps.

The seed recipes (configs/runs/bloom_recipe.gin, glm130b_recipe.gin):
  BLOOM-176B  AdamW b2 0.95, wd 0.1, clip 1.0, lr 6e-5 cosine to 6e-6,
              warmup 375M tokens, batch ramp, bf16 mixed precision.
  GLM-130B    AdamW (0.9, 0.95), eps 1e-8, wd 0.1, clip 1.0, warmup from 1e-7
              to 8e-5 over 0.5% of samples, cosine to 8e-6, batch ramp
              192 -> 4224, embedding gradient shrink 0.1 (a model switch).

Schedules are tables indexed by the optimiser step, computed on the host from
the tokens each step consumes, so warmup and decay can be counted in tokens
while the batch size ramps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glm.errors import UserError


class OptimizerError(UserError):
  """An optimiser or batch-ramp setting out of range, with the fix."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with a warmup + cosine schedule; gin binds it at the edge."""
  learning_rate: float = 3e-3       # peak
  init_lr: float = 0.0              # warmup starts here (GLM-130B: 1e-7)
  min_lr_ratio: float = 0.1         # cosine ends at ratio * peak
  warmup_steps: int = 0             # warmup length in steps, or ...
  warmup_tokens: int = 0            # ... in tokens (BLOOM: 375M); the larger
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False    # weight decay on embedding tables
  grad_clip: float = 1.0
  z_loss: float = 0.0               # coefficient of mean(logsumexp(logits)^2)

  def __post_init__(self):
    if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
      raise OptimizerError(f'learning_rate={self.learning_rate} must be > 0 '
                           f'and min_lr_ratio={self.min_lr_ratio} in [0, 1].')
    if self.warmup_steps < 0 or self.warmup_tokens < 0:
      raise OptimizerError(f'warmup_steps={self.warmup_steps} and '
                           f'warmup_tokens={self.warmup_tokens} must be >= 0.')


@dataclasses.dataclass(frozen=True)
class BatchRamp:
  """Global batch grows from `start` to the run's batch size over `steps`,
  in whole micro-batches (Megatron's rampup-batch-size)."""
  start: int = 0                    # 0 disables the ramp
  steps: int = 0

  def batch_sizes(self, batch_size: int, micro_batch: int,
                  train_steps: int) -> np.ndarray:
    """[train_steps] global batch size of every step."""
    sizes = np.full(train_steps, batch_size, np.int64)
    if not self.start or not self.steps:
      return sizes
    if self.start % micro_batch or self.start > batch_size:
      raise OptimizerError(
          f'batch ramp start={self.start} must be a multiple of the '
          f'micro-batch {micro_batch} and <= BATCH_SIZE={batch_size}.')
    frac = np.minimum(np.arange(train_steps) / self.steps, 1.0)
    raw = self.start + frac * (batch_size - self.start)
    return (np.floor(raw / micro_batch) * micro_batch).astype(np.int64)


def lr_table(cfg: OptimizerConfig, tokens_per_step: np.ndarray) -> np.ndarray:
  """[steps] learning rate of every step: a linear warmup from `init_lr`,
  counted in tokens when `warmup_tokens` is set (else steps), then cosine
  decay to `min_lr_ratio` x peak over the rest of the run's tokens.

  Step s trains at the rate reached after its own share of the warmup, so
  the first step already moves (a warmup of W steps from 0 gives peak / W,
  not 0) and the peak comes at step W - 1. A warmup longer than the run is
  kept as configured (the run ends before the peak): see `warmup_note`.
  """
  tokens = np.asarray(tokens_per_step, float)
  after = np.cumsum(tokens)          # tokens seen once step s is done
  before = after - tokens            # tokens seen when step s starts
  total = float(after[-1]) if len(tokens) else 0.0
  if cfg.warmup_tokens:
    warm = np.minimum(after / cfg.warmup_tokens, 1.0)
    warm_end = float(cfg.warmup_tokens)
  elif cfg.warmup_steps:
    warm = np.minimum((np.arange(len(tokens)) + 1) / cfg.warmup_steps, 1.0)
    warm_end = (float(before[cfg.warmup_steps])
                if cfg.warmup_steps < len(tokens) else total)
  else:
    warm, warm_end = np.ones(len(tokens)), 0.0
  peak, low = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
  progress = np.clip((before - warm_end) / max(total - warm_end, 1.0), 0, 1)
  cosine = low + 0.5 * (peak - low) * (1 + np.cos(math.pi * progress))
  lr = np.where(warm < 1.0, cfg.init_lr + warm * (peak - cfg.init_lr), cosine)
  return lr.astype(np.float32)


def warmup_note(cfg: OptimizerConfig, tokens_per_step: np.ndarray,
                lrs: np.ndarray) -> str | None:
  """A one-line warning when the warmup does not end within the run."""
  steps, total = len(tokens_per_step), int(np.sum(tokens_per_step))
  if cfg.warmup_tokens > total:
    what = f'warmup_tokens={cfg.warmup_tokens:,} is more than the run\'s '
    what += f'{total:,} tokens'
  elif cfg.warmup_steps > steps:
    what = f'warmup_steps={cfg.warmup_steps} is longer than the run '
    what += f'({steps} steps)'
  else:
    return None
  return (f'{what}: the learning rate rises to {float(lrs[-1]):.3g} at the '
          f'last step and never reaches its peak {cfg.learning_rate:.3g}; '
          'shorten the warmup or train longer.')


def decay_mask(params, decay_embeddings: bool):
  """True on matrices that weight decay applies to: not biases, not norm
  scales, and embedding tables only when asked."""
  tables = ('embedding', 'position_embedding')

  def keep(path, leaf):
    name = getattr(path[-1], 'key', '')
    if name in tables:
      return decay_embeddings
    # Layer-stacked params carry one extra leading axis.
    stacked = any(getattr(p, 'key', '') == 'layers' for p in path)
    return leaf.ndim - int(stacked) >= 2 and not name.endswith('bias')

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, lrs: np.ndarray
                   ) -> optax.GradientTransformation:
  """AdamW over the per-step learning-rate table `lrs`."""
  table = jnp.asarray(lrs)
  schedule = lambda count: table[jnp.minimum(count, len(lrs) - 1)]
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay,
                  mask=lambda p: decay_mask(p, cfg.decay_embeddings)))
