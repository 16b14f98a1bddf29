"""A plain NumPy (float64) forward pass of the glm Transformer, for tests.

Written from the published formulas of BLOOM, GLM-130B and T5/UL2 (ALiBi,
DeepNorm, GeGLU, RoPE, GLM's masks), not from the glm modules, so that the
parity tests in `test_model_reference.py` catch wiring mistakes in glm. It is
deliberately slow and explicit: one loop over layers, dense [B, H, T, S]
scores, no fused anything.

Letters: B batch, T query length, S key length, E embed, H heads, D head dim,
F mlp width, V padded vocabulary.

Entry points:
  alibi_slopes_reference(n)         -> [n] float64 slopes (BLOOM's rule).
  random_params_like(shapes, seed)  -> large random float32 params.
  default_position_ids_reference(.) -> [B, T] positions restarting per segment.
  attention_mask_reference(.)       -> [B, T, S] bool visibility.
  forward(cfg, params, batch)       -> [B, T, V] float64 logits.

`params` is the *unscanned* tree (`layers_0`, `layers_1`, ...); pass scanned
params through `glm.model.transformer.unstack_layers` first. `cfg` is a
`glm.model.config.ModelConfig` (only its plain fields are read).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

F32_MIN = float(np.finfo(np.float32).min)


# ALiBi -----------------------------------------------------------------------


def alibi_slopes_reference(n: int) -> np.ndarray:
  """ALiBi slopes for n heads, BLOOM / Megatron-DeepSpeed's rule.

  Power of two n: start = 2^(-8/n), slope_i = start^i, i = 1..n. Otherwise,
  c = 2^floor(log2 n): the c power-of-two slopes for c, then
  (2^(-8/(2c)))^k for k = 1, 3, 5, ... until n slopes.
  """
  if n < 1:
    raise ValueError(f'{n=} must be positive')
  c = 1
  while c * 2 <= n:
    c *= 2
  start = 2.0 ** (-8.0 / c)
  slopes = [start ** i for i in range(1, c + 1)]
  start2 = 2.0 ** (-8.0 / (2 * c))
  k = 1
  while len(slopes) < n:
    slopes.append(start2 ** k)
    k += 2
  return np.asarray(slopes, np.float64)


# Positions and masks ---------------------------------------------------------


def default_position_ids_reference(tokens: np.ndarray,
                                   segment_ids: np.ndarray | None
                                   ) -> np.ndarray:
  """0, 1, 2, ... along each row, restarting whenever the segment id changes."""
  b, t = tokens.shape
  pos = np.zeros((b, t), np.int64)
  for r in range(b):
    for i in range(t):
      if i == 0 or (segment_ids is not None
                    and segment_ids[r, i] != segment_ids[r, i - 1]):
        pos[r, i] = 0
      else:
        pos[r, i] = pos[r, i - 1] + 1
  return pos


def _prefix_flags(batch: Mapping[str, Any], b: int, t: int) -> np.ndarray:
  """[B, T] bool: True on the bidirectional prefix (GLM Part A / UL2 inputs)."""
  if batch.get('prefix_mask') is not None:
    return np.asarray(batch['prefix_mask'], bool)
  if batch.get('prefix_len') is not None:
    plen = np.asarray(batch['prefix_len'])
    return np.arange(t)[None, :] < plen[:, None]
  return np.zeros((b, t), bool)


def attention_mask_reference(batch: Mapping[str, Any]) -> np.ndarray:
  """[B, T, S] bool: may query i attend key j.

  GLM's rule: causal (tril), then the prefix columns made visible
  (GLM: Part A bidirectional, Part B sees all of A and itself causally);
  packed sequences are block-diagonal. Padding (segment 0) is treated as its
  own block so its rows stay finite; real tokens never see it.
  """
  tokens = np.asarray(batch['tokens'])
  b, t = tokens.shape
  seg = batch.get('segment_ids')
  seg = np.ones((b, t), np.int64) if seg is None else np.asarray(seg)
  prefix = _prefix_flags(batch, b, t)
  mask = np.zeros((b, t, t), bool)
  for r in range(b):
    for i in range(t):
      for j in range(t):
        causal_or_prefix = j <= i or prefix[r, j]
        mask[r, i, j] = causal_or_prefix and seg[r, i] == seg[r, j]
  return mask


def _rotate_pairs(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
  """Rotate-half (NeoX) RoPE over all of x's last axis R (even).

  Dim k (k < R/2) is paired with dim k + R/2 and the pair, read as the complex
  number x_k + i x_{k+R/2}, is multiplied by exp(i * pos * base^(-2k/R)).
  x: [B, T, H, R]; pos: [B, T].
  """
  r = x.shape[-1]
  half = r // 2
  freq = base ** (-2.0 * np.arange(half) / r)  # [R/2]
  theta = pos[:, :, None, None].astype(np.float64) * freq  # [B, T, 1, R/2]
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * theta)
  return np.concatenate([z.real, z.imag], axis=-1)


# Building blocks -------------------------------------------------------------


def _norm(cfg, p: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  if cfg.norm_type == 'layernorm':
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * p['scale'] + p['bias']
  if cfg.norm_type == 'rmsnorm':
    assert 'bias' not in p, 'an RMSNorm has no bias'
    ms = (x ** 2).mean(-1, keepdims=True)
    return x / np.sqrt(ms + cfg.norm_eps) * p['scale']
  raise ValueError(cfg.norm_type)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                  * (x + 0.044715 * x ** 3)))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_exact(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _mlp(cfg, p: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """x [B, T, E] -> [B, T, E]."""
  if cfg.mlp_activation == 'gelu':
    h = x @ p['wi']  # [B, T, F]
    if cfg.use_bias:
      h = h + p['wi_bias']
    h = gelu_tanh(h)
  else:
    wi = p['wi']  # [E, 2, F]: index 0 = x1 (linear), 1 = x2 (activated)
    x1 = x @ wi[:, 0, :]
    x2 = x @ wi[:, 1, :]
    if cfg.use_bias:
      x1 = x1 + p['wi_bias'][0]
      x2 = x2 + p['wi_bias'][1]
    if cfg.mlp_activation == 'geglu':
      h = x1 * gelu_exact(x2)
    elif cfg.mlp_activation == 'swiglu':
      h = x1 * silu(x2)
    else:
      raise ValueError(cfg.mlp_activation)
  y = h @ p['wo']
  if cfg.use_bias:
    y = y + p['wo_bias']
  return y


def _attention(cfg, p: Mapping[str, np.ndarray], x: np.ndarray,
               mask: np.ndarray, pos: np.ndarray, block_pos: np.ndarray
               ) -> np.ndarray:
  """x [B, T, E] -> [B, T, E]; mask [B, T, S]; pos, block_pos [B, T]."""
  b, t, _ = x.shape

  def proj(name):
    y = np.einsum('bte,ehd->bthd', x, p[name])
    if cfg.use_bias:
      y = y + p[name + '_bias']
    return y

  q, k, v = proj('query'), proj('key'), proj('value')  # [B, T, H, D]
  n_heads, d = q.shape[2], q.shape[3]

  if cfg.position == 'rope':
    r = int(d * cfg.rope_fraction) // 2 * 2
    q = np.concatenate([_rotate_pairs(q[..., :r], pos, cfg.rope_base),
                        q[..., r:]], -1)
    k = np.concatenate([_rotate_pairs(k[..., :r], pos, cfg.rope_base),
                        k[..., r:]], -1)
  elif cfg.position == 'rope2d':
    h2 = d // 2
    q = np.concatenate([_rotate_pairs(q[..., :h2], pos, cfg.rope_base),
                        _rotate_pairs(q[..., h2:], block_pos, cfg.rope_base)],
                       -1)
    k = np.concatenate([_rotate_pairs(k[..., :h2], pos, cfg.rope_base),
                        _rotate_pairs(k[..., h2:], block_pos, cfg.rope_base)],
                       -1)

  scores = np.einsum('bthd,bshd->bhts', q, k) / math.sqrt(d)
  if cfg.position == 'alibi':
    slopes = alibi_slopes_reference(n_heads)  # [H]
    # slope * (j - i) for j <= i; keys a prefix lets a query see ahead get
    # the symmetric penalty -slope * (j - i).
    rel = pos[:, None, :].astype(np.float64) - pos[:, :, None]  # [B, T, S]
    bias = np.where(rel <= 0, rel, -rel)
    scores = scores + slopes[None, :, None, None] * bias[:, None]
  m = mask[:, None, :, :]
  scores = np.where(m, scores, -np.inf)
  mx = scores.max(-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  w = np.where(m, np.exp(scores - mx), 0.0)
  w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  o = np.einsum('bhts,bshd->bthd', w, v)
  y = np.einsum('bthd,hde->bte', o, p['out'])
  if cfg.use_bias:
    y = y + p['out_bias']
  return y


# The model -------------------------------------------------------------------


def random_params_like(shapes: Mapping[str, Any], seed: int = 0,
                       kernel_std: float = 0.3) -> dict[str, Any]:
  """Large random float32 params with the structure of `shapes`.

  Kernels N(0, kernel_std), embedding / position tables N(0, 1), norm scales
  N(1, 0.4), biases N(0, 0.3): far from glm's init, so attention is peaked
  and a swapped or missing term shows up in the logits. `shapes` is any
  nested mapping whose leaves have `.shape` (e.g. glm's abstract params).
  """
  rng = np.random.default_rng(seed)

  def fill(tree):
    out = {}
    for name in sorted(tree):
      leaf = tree[name]
      if isinstance(leaf, Mapping):
        out[name] = fill(leaf)
        continue
      if name == 'scale':
        v = rng.normal(1.0, 0.4, leaf.shape)
      elif name == 'bias' or name.endswith('_bias'):
        v = rng.normal(0.0, 0.3, leaf.shape)
      elif name in ('embedding', 'position_embedding'):
        v = rng.normal(0.0, 1.0, leaf.shape)
      else:
        v = rng.normal(0.0, kernel_std, leaf.shape)
      out[name] = v.astype(np.float32)
    return out

  return fill(shapes)


def to_numpy64(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: to_numpy64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def expected_param_keys(cfg) -> set[str]:
  """Top-level param names an unscanned glm model must have (strict)."""
  keys = {'embed'} | {f'layers_{i}' for i in range(cfg.num_layers)}
  if cfg.embed_norm:
    keys.add('embed_norm')
  if cfg.final_norm:
    keys.add('final_norm')
  if cfg.position == 'learned':
    keys.add('position_embedding')
  if not cfg.tie_embeddings:
    keys.add('lm_head')
  return keys


def _check_layer_keys(cfg, layer: Mapping[str, Any]) -> None:
  assert set(layer) == {'input_norm', 'post_attention_norm', 'attention',
                        'mlp'}, sorted(layer)
  attn = {'query', 'key', 'value', 'out'}
  mlp = {'wi', 'wo'}
  if cfg.use_bias:
    attn |= {'query_bias', 'key_bias', 'value_bias', 'out_bias'}
    mlp |= {'wi_bias', 'wo_bias'}
  assert set(layer['attention']) == attn, sorted(layer['attention'])
  assert set(layer['mlp']) == mlp, sorted(layer['mlp'])
  norm = {'scale', 'bias'} if cfg.norm_type == 'layernorm' else {'scale'}
  for name in ('input_norm', 'post_attention_norm'):
    assert set(layer[name]) == norm, (name, sorted(layer[name]))


def forward(cfg, params: Mapping[str, Any],
            batch: Mapping[str, Any]) -> np.ndarray:
  """Logits [B, T, V_padded] in float64; padded vocab entries = float32 min."""
  p = to_numpy64(params)
  assert set(p) == expected_param_keys(cfg), (sorted(p),
                                              sorted(expected_param_keys(cfg)))
  tokens = np.asarray(batch['tokens'])
  b, t = tokens.shape
  seg = batch.get('segment_ids')
  seg = None if seg is None else np.asarray(seg)
  pos = batch.get('position_ids')
  pos = (default_position_ids_reference(tokens, seg) if pos is None
         else np.asarray(pos, np.int64))
  block_pos = batch.get('block_position_ids')
  block_pos = (np.zeros((b, t), np.int64) if block_pos is None
               else np.asarray(block_pos, np.int64))
  mask = attention_mask_reference(batch)

  table = p['embed']['embedding']  # [V, E]
  x = table[tokens]  # [B, T, E]
  if cfg.position == 'learned':
    x = x + p['position_embedding'][pos]
  if cfg.embed_norm:
    x = _norm(cfg, p['embed_norm'], x)

  alpha = math.sqrt(2.0 * cfg.num_layers) if cfg.norm_layout == 'deepnorm' else 1.0
  for i in range(cfg.num_layers):
    lp = p[f'layers_{i}']
    _check_layer_keys(cfg, lp)
    if cfg.norm_layout == 'pre':
      x = x + _attention(cfg, lp['attention'], _norm(cfg, lp['input_norm'], x),
                         mask, pos, block_pos)
      x = x + _mlp(cfg, lp['mlp'], _norm(cfg, lp['post_attention_norm'], x))
    elif cfg.norm_layout in ('post', 'deepnorm'):
      a = _norm(cfg, lp['input_norm'], x)
      x = alpha * a + _attention(cfg, lp['attention'], a, mask, pos, block_pos)
      bb = _norm(cfg, lp['post_attention_norm'], x)
      x = alpha * bb + _mlp(cfg, lp['mlp'], bb)
    else:
      raise ValueError(cfg.norm_layout)

  if cfg.final_norm:
    x = _norm(cfg, p['final_norm'], x)
  if cfg.tie_embeddings:
    logits = x @ table.T  # [B, T, V]
  else:
    logits = x @ p['lm_head']
  v = logits.shape[-1]
  logits = np.where(np.arange(v) < cfg.vocab_size, logits, F32_MIN)
  return logits
