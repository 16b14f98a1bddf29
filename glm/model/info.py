"""Parameter and FLOP counts from shapes alone (no weights are allocated).

`flops_per_token` is the training cost (forward + backward = 3 x forward) of
one token at sequence length T, PaLM-style (Chowdhery et al. 2022, App. B):
  forward = 2 * (non-embedding params + E * V_padded)   # matmuls + logits
          + 4 * L * H * D * T                           # QK^T and AV
Norm and bias parameters are counted in the first term, as PaLM does.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from glm.model.config import ModelConfig
from glm.model import transformer


# Parameter tables indexed by token or position id rather than multiplied.
_EMBEDDING_LEAVES = ('embedding', 'position_embedding', 'lm_head')


def count_params(cfg: ModelConfig) -> dict[str, int]:
  shapes = transformer.abstract_params(cfg)
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    n = int(np.prod(leaf.shape))
    total += n
    if getattr(path[-1], 'key', None) in _EMBEDDING_LEAVES:
      embedding += n
  return {'params': total, 'embedding_params': embedding,
          'non_embedding_params': total - embedding}


def info(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
  seq_len = seq_len or cfg.max_len
  counts = count_params(cfg)
  attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.dims_per_head * seq_len
  forward = (2 * (counts['non_embedding_params']
                  + cfg.hidden * cfg.padded_vocab_size) + attn_flops)
  return {
      **counts,
      'flops_per_token': 3 * forward,
      'forward_flops_per_token': forward,
      'seq_len': seq_len,
      'vocab_size': cfg.vocab_size,
      'padded_vocab_size': cfg.padded_vocab_size,
      'num_layers': cfg.num_layers,
      'hidden': cfg.hidden,
      'num_heads': cfg.num_heads,
      'head_dim': cfg.dims_per_head,
      'mlp_dim': cfg.mlp_dim,
      'position': cfg.position,
      'norm_layout': cfg.norm_layout,
      'mlp_activation': cfg.mlp_activation,
  }
