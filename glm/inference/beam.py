"""Beam search with a length penalty, on the KV cache of
`glm.inference.generate`.

Each prompt gets K = num_beams rows (the batch is B x K; the prompts are
prefilled once per row). At every step each live beam proposes every
token, candidates score the sum of their tokens' log-probabilities, and the
K best of the K x V candidates survive; their caches are gathered from the
beams they extend. A beam that has emitted `eos_id` is finished: it stays in
the beam with its score unchanged (its only continuation is a filler token
at log-probability 0) and competes with the live ones until the end.

The answer of each prompt is the beam with the best
  score / n ** length_penalty
where n counts its new tokens up to and including the eos (length_penalty
0 ranks by the raw sum, larger values favour longer answers: the GNMT /
Hugging Face convention). With no eos in play and K = V^(n - 1) the search
is exhaustive over n new tokens (tests check it against brute force).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm.errors import UserError
from glm.inference import generate as generate_lib
from glm.model.config import ModelConfig


def _select(scores, seqs, done, lengths, logp, i, eos_id):
  """One beam step. scores, done, lengths [B, K]; seqs [B, K, N];
  logp [B, K, V]. Returns the new beams and the origin [B, K] of each."""
  b, k, v = logp.shape
  if eos_id is not None:  # a finished beam only continues with a filler
    filler = jnp.where(jnp.arange(v) == eos_id, 0.0, -jnp.inf)
    logp = jnp.where(done[..., None], filler, logp)
  cand = (scores[..., None] + logp).reshape(b, k * v)
  scores, flat = jax.lax.top_k(cand, k)                    # [B, K]
  origin, tok = flat // v, (flat % v).astype(jnp.int32)
  seqs = jnp.take_along_axis(seqs, origin[..., None], 1).at[:, :, i].set(tok)
  was_done = jnp.take_along_axis(done, origin, 1)
  lengths = jnp.take_along_axis(lengths, origin, 1) + (~was_done)
  if eos_id is not None:
    done = was_done | (tok == eos_id)
  else:
    done = was_done
  return scores, seqs, done, lengths, origin


def _reorder(cache, origin):
  """Gathers every cache array's rows [B K] from the beams `origin`."""
  b, k = origin.shape
  rows = (jnp.arange(b)[:, None] * k + origin).reshape(-1)
  # Cache arrays are [..., B K, S, H, D] (a leading layer axis when scanned).
  return jax.tree.map(lambda a: jnp.take(a, rows, axis=a.ndim - 4), cache)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _beam_search(cfg: ModelConfig, params: Any, lay: dict, max_new: int,
                 num_beams: int, length_penalty: float, eos_id: int | None):
  """-> (seqs [B, K, N], normalised scores [B, K], lengths [B, K])."""
  k = num_beams
  b = lay['tokens'].shape[0]
  p = lay['tokens'].shape[1]
  lay = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), lay)
  logits, cache, feed = generate_lib.prefill(cfg, params, lay, max_new)
  logp = jax.nn.log_softmax(logits).reshape(b, k, -1)
  # All K rows hold the same prompt: only the first may propose at first.
  scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
  seqs = jnp.zeros((b, k, max_new), jnp.int32)
  done = jnp.zeros((b, k), bool)
  lengths = jnp.zeros((b, k), jnp.int32)
  scores, seqs, done, lengths, origin = _select(
      scores, seqs, done, lengths, logp, 0, eos_id)
  cache = _reorder(cache, origin)

  def more(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def step(carry):
    i, cache, scores, seqs, done, lengths = carry
    logits, cache = feed(cache, seqs[:, :, i - 1].reshape(-1), p + i - 1)
    logp = jax.nn.log_softmax(logits).reshape(b, k, -1)
    scores, seqs, done, lengths, origin = _select(
        scores, seqs, done, lengths, logp, i, eos_id)
    return i + 1, _reorder(cache, origin), scores, seqs, done, lengths

  _, _, scores, seqs, done, lengths = jax.lax.while_loop(
      more, step, (jnp.int32(1), cache, scores, seqs, done, lengths))
  norm = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** (
      length_penalty)
  return seqs, norm, lengths


def beam_search(cfg: ModelConfig, params: Any,
                prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                num_beams: int, length_penalty: float = 1.0,
                eos_id: int | None = None, length: int | None = None
                ) -> list[list[int]]:
  """The best beam's new tokens for each prompt, cut before the eos."""
  if num_beams < 1:
    raise UserError(f'num_beams={num_beams} must be >= 1.')
  if not prompts or any(len(x) == 0 for x in prompts):
    raise UserError('beam search needs non-empty prompts.')
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  lay = generate_lib.layout(prompts, max_new_tokens, length)
  lay = {name: jnp.asarray(a) for name, a in lay.items()}
  cfg, params = generate_lib.decoding_layout(cfg, params)
  seqs, norm, lengths = (np.asarray(a) for a in _beam_search(
      cfg, params, lay, max_new_tokens, num_beams, float(length_penalty),
      eos_id))
  rows = []
  for row in range(len(prompts)):
    best = int(np.argmax(norm[row]))
    new = seqs[row, best, :lengths[row, best]].tolist()
    if eos_id is not None and eos_id in new:
      new = new[:new.index(eos_id)]
    rows.append(new)
  return rows
