"""Generation with a KV cache: prefill, then one token per step, in one
compiled function.

A batch of prompts of different lengths is left-padded to the longest, P
tokens, so that every row's next token goes to the same cache slot: the
padding slots are segment 0 (no query sees them) and each row's positions
count from its first real token, which makes the padding exact for ALiBi,
RoPE and learned positions alike. The cache has S = P + max_new_tokens
slots per layer (`Attention._cache`: the 'cache' collection, [B, H, S, D]
per layer, logical axes batch, heads, length, kv; decoding runs the layers
unscanned, see `decoding_layout`). Every slot a
row will fill is marked visible from the start; causality by slot keeps the
slots not yet written out of sight.

  prefill  the P prompt tokens at cache slots 0..P-1, logits of slot P-1
  decode   a `lax.while_loop`: the newest token at slot P + i, its logits,
           the next token; until `max_new_tokens` or every row has emitted
           `eos_id`.

Strategies (`Sampling`): greedy (temperature 0), temperature, top-k and
top-p (nucleus), in that order; sampling draws from `jax.random` keys split
from `seed`, so a seed fixes the output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm.errors import UserError
from glm.model.config import ModelConfig
from glm.model.transformer import Transformer, unstack_layers


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 keep every token."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def check(self) -> None:
    if self.temperature < 0:
      raise UserError(f'temperature={self.temperature} must be >= 0 '
                      '(0 is greedy).')
    if self.top_k < 0:
      raise UserError(f'top_k={self.top_k} must be >= 0 (0 keeps all).')
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f'top_p={self.top_p} must be in (0, 1] (1 keeps all).')


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """[B, V] float32 logits scaled by the temperature, with the tokens that
  top-k and then top-p rule out set to -inf."""
  logits = logits / sampling.temperature
  neg = jnp.full_like(logits, -jnp.inf)
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]             # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs   # mass of the better ones
    keep = before < sampling.top_p                # the first always stays
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def next_token(logits: jax.Array, key: jax.Array,
               sampling: Sampling) -> jax.Array:
  """[B, V] float32 -> [B] int32."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling)
                                ).astype(jnp.int32)


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> Any:
  """A zero KV cache of `length` slots (unboxed; its logical axes are
  `cache_axes`), without running the model."""
  boxed = _abstract_cache(cfg, batch_size, length)
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(boxed))


def cache_axes(cfg: ModelConfig, batch_size: int, length: int) -> Any:
  """The cache's logical axis names, one tuple per array."""
  return nn.get_partition_spec(_abstract_cache(cfg, batch_size, length))


def _abstract_cache(cfg, batch_size, length):
  zeros = jnp.zeros((batch_size, 1), jnp.int32)
  batch = {'tokens': zeros, 'position_ids': zeros, 'cache_index': 0,
           'kv_segment_ids': jnp.zeros((batch_size, length), jnp.int32),
           'kv_positions': jnp.zeros((batch_size, length), jnp.int32)}
  return jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.PRNGKey(0), batch)['cache'])


def layout(prompts: Sequence[Sequence[int]], max_new_tokens: int,
           length: int | None = None) -> dict[str, np.ndarray]:
  """Left-padded prompts [B, P] (P = `length`, default the longest) and the
  cache's per-slot arrays [B, S]: `segment_ids` (1 on every slot the row
  uses, 0 on padding) and `position_ids` (0.. from the row's first real
  token)."""
  p = length or max(len(x) for x in prompts)
  s = p + max_new_tokens
  tokens = np.zeros((len(prompts), p), np.int32)
  pad = np.array([p - len(x) for x in prompts], np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, pad[row]:] = prompt
  slots = np.arange(s, dtype=np.int32)[None, :]
  return {'tokens': tokens,
          'segment_ids': (slots >= pad[:, None]).astype(np.int32),
          'position_ids': np.maximum(slots - pad[:, None], 0).astype(np.int32)}


def decoding_layout(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """The layers as separate params and caches for decoding: each layer's
  cache is then its own buffer, which the decode loop updates in place (a
  cache stacked over the scanned layers is sliced and restacked at every
  token, a copy of the whole cache; benchmarks/generate_throughput.py
  measured 1.5-2x slower tokens at batch 1). Call it outside `jit`: slices
  of stacked params inside the compiled decode loop are not hoisted out of
  it. The unstacked params are a copy of the weights while decoding."""
  if not cfg.scan_layers:
    return cfg, params
  return (cfg.replace(scan_layers=False),
          unstack_layers(params, cfg.num_layers))


def prefill(cfg: ModelConfig, params: Any, lay: dict, max_new: int):
  """Runs the prompts of `lay` (`layout`) into a fresh cache. Returns the
  logits [B, V] that choose the first new token, the cache and
  `step(cache, tokens [B], slot) -> (logits [B, V], cache)`, which feeds one
  token per row at cache slot `slot`.

  Besides `layout`'s arrays, `lay` may hold per-slot [B, S]
  `block_position_ids` (2D RoPE) and `prefix` (bool: keys every query of
  the row sees, e.g. GLM's Part A), as `infill.layout` writes them."""
  model = Transformer(cfg)
  tokens = lay['tokens']
  b, p = tokens.shape
  per_slot = {k: lay[k] for k in ('segment_ids', 'position_ids',
                                  'block_position_ids') if k in lay}
  kv = {'kv_segment_ids': lay['segment_ids'],
        'kv_positions': lay['position_ids']}
  if 'prefix' in lay:
    kv['kv_prefix'] = lay['prefix']

  def forward(cache, tok, slot):
    t = tok.shape[1]
    batch = {k: jax.lax.dynamic_slice_in_dim(v, slot, t, axis=1)
             for k, v in per_slot.items()}
    logits, new = model.apply(
        {'params': params, 'cache': cache},
        {**batch, **kv, 'tokens': tok, 'cache_index': slot},
        mutable=['cache'])
    return logits[:, -1], new['cache']                      # [B, V]

  def step(cache, tok, slot):
    return forward(cache, tok[:, None], slot)

  logits, cache = forward(init_cache(cfg, b, p + max_new), tokens, 0)
  return logits, cache, step


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(cfg: ModelConfig, params: Any, lay: dict, key: jax.Array,
              max_new: int, sampling: Sampling, stop: tuple[int, ...]):
  """-> new tokens [B, max_new] (after a stop id: whatever was sampled)."""
  b, p = lay['tokens'].shape
  logits, cache, feed = prefill(cfg, params, lay, max_new)
  key, sub = jax.random.split(key)
  first = next_token(logits, sub, sampling)
  out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
  stop_ids = jnp.asarray(stop, jnp.int32)
  done = jnp.isin(first, stop_ids)

  def more(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def step(carry):
    i, cache, tok, key, done, out = carry
    logits, cache = feed(cache, tok, p + i - 1)             # tok's slot
    key, sub = jax.random.split(key)
    nxt = next_token(logits, sub, sampling)
    done = done | jnp.isin(nxt, stop_ids)
    return i + 1, cache, nxt, key, done, out.at[:, i].set(nxt)

  carry = (jnp.int32(1), cache, first, key, done, out)
  return jax.lax.while_loop(more, step, carry)[-1]


def generate(cfg: ModelConfig, params: Any,
             prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0,
             eos_id: int | None = None, length: int | None = None
             ) -> list[list[int]]:
  """New tokens for each prompt (one batch), cut before the first eos.
  `length` pads the prompts to a fixed P (fewer compiled shapes)."""
  if not prompts or any(len(x) == 0 for x in prompts):
    raise UserError('generate needs non-empty prompts.')
  check_request(cfg, max(len(x) for x in prompts), max_new_tokens, sampling)
  lay = layout(prompts, max_new_tokens, length)
  return decode(cfg, params, lay, max_new_tokens=max_new_tokens,
                sampling=sampling, seed=seed,
                stop=() if eos_id is None else (eos_id,))


def check_request(cfg: ModelConfig, longest: int, max_new_tokens: int,
                  sampling: Sampling) -> None:
  """One-line errors for a request the model cannot serve."""
  sampling.check()
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  if cfg.position == 'learned' and longest + max_new_tokens > cfg.max_len:
    raise UserError(
        f'prompt {longest} + {max_new_tokens} new tokens exceeds '
        f'max_len={cfg.max_len} (learned positions); shorten the prompt or '
        'ask for fewer tokens.')


def decode(cfg: ModelConfig, params: Any, lay: dict, *, max_new_tokens: int,
           sampling: Sampling = Sampling(), seed: int = 0,
           stop: tuple[int, ...] = ()) -> list[list[int]]:
  """The new tokens of every row of a laid-out batch (`layout`,
  `infill.layout`), each cut before its first `stop` id."""
  lay = {k: jnp.asarray(v) for k, v in lay.items()}
  cfg, params = decoding_layout(cfg, params)
  out = np.asarray(_generate(cfg, params, lay, jax.random.PRNGKey(seed),
                             max_new_tokens, sampling, tuple(stop)))
  rows = []
  for row in out.tolist():
    cut = [i for i, t in enumerate(row) if t in stop]
    rows.append(row[:cut[0]] if cut else row)
  return rows
