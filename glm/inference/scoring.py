"""Per-token log-probabilities of sequences under a checkpoint (`glm score`).

Input lines: {"tokens": [ids]} or {"text": "..."} (the latter needs a
checkpoint with a tokenizer). Output lines, in input order:
  {"tokens": [...], "logprobs": [null, lp_1, ..., lp_{n-1}]}
with lp_i = log p(token_i | tokens before i), computed in float32.

Sequences are sorted by length and scored in padded batches whose length is
rounded up to a bucket, so a file compiles a handful of shapes only.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm.errors import UserError
from glm.files import write_text_atomic
from glm.model import checkpoint
from glm.model.config import ModelConfig
from glm.model.transformer import Transformer


class ScoreInputError(UserError):
  """An input line that cannot be scored, with the fix."""


def read_inputs(path: str, cfg: ModelConfig,
                tokenizer: Any | None) -> list[list[int]]:
  """Parses and validates every line before any compute."""
  return [toks for toks, _ in read_rows(path, cfg, tokenizer)]


def read_rows(path: str, cfg: ModelConfig, tokenizer: Any | None
              ) -> list[tuple[list[int], dict]]:
  """Every line's token ids and its JSON object (`glm score` and
  `glm generate` inputs), all validated before any compute."""
  seqs = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ScoreInputError(f'{where}: not JSON ({e.msg}); each line must '
                              'be {"tokens": [...]} or {"text": "..."}.'
                              ) from None
      if not isinstance(obj, dict):
        raise ScoreInputError(f'{where}: expected a JSON object with '
                              '"tokens" or "text".')
      if 'tokens' in obj:
        toks = obj['tokens']
        if (not isinstance(toks, list)
            or not all(isinstance(t, int) and not isinstance(t, bool)
                       for t in toks)):
          raise ScoreInputError(f'{where}: "tokens" must be a list of '
                                'integer ids.')
      elif 'text' in obj:
        if tokenizer is None:
          raise ScoreInputError(
              f'{where}: "text" given but the checkpoint has no tokenizer; '
              'pass {"tokens": [ids]} instead.')
        toks = tokenizer.encode(obj['text'])
      else:
        raise ScoreInputError(f'{where}: no "tokens" or "text" field.')
      if not toks:
        raise ScoreInputError(f'{where}: empty sequence; give at least one '
                              'token.')
      bad = [t for t in toks if not 0 <= t < cfg.vocab_size]
      if bad:
        raise ScoreInputError(
            f'{where}: token id {bad[0]} is outside the vocab [0, '
            f'{cfg.vocab_size}); use ids from this checkpoint\'s tokenizer.')
      if len(toks) > cfg.max_len:
        raise ScoreInputError(
            f'{where}: sequence of {len(toks)} tokens is longer than the '
            f'model allows (max_len={cfg.max_len}); split it into pieces.')
      seqs.append((toks, obj))
  return seqs


def bucket(n: int, max_len: int) -> int:
  b = 16
  while b < n:
    b *= 2
  return min(b, max_len)


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(cfg: ModelConfig, params: Any, tokens: jax.Array,
                    segment_ids: jax.Array) -> jax.Array:
  """[B, T] -> [B, T-1] log p(tokens[:, i+1] | tokens[:, :i+1])."""
  logits = Transformer(cfg).apply(
      {'params': params}, {'tokens': tokens, 'segment_ids': segment_ids})
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def score(cfg: ModelConfig, params: Any, seqs: Sequence[list[int]], *,
          batch_size: int = 8) -> list[list[float | None]]:
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
  out: list[list[float | None]] = [[] for _ in seqs]
  t0 = last = time.time()
  for start in range(0, len(order), batch_size):
    if time.time() - last > 10:  # progress on long files
      last = time.time()
      print(f'glm score: {start}/{len(seqs)} sequences, '
            f'{last - t0:.0f}s', file=sys.stderr, flush=True)
    idx = order[start:start + batch_size]
    length = bucket(max(len(seqs[i]) for i in idx), cfg.max_len)
    tokens = np.zeros((batch_size, length), np.int32)
    segs = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(idx):
      tokens[row, :len(seqs[i])] = seqs[i]
      segs[row, :len(seqs[i])] = 1
    lp = np.asarray(_token_logprobs(cfg, params, tokens, segs))
    for row, i in enumerate(idx):
      n = len(seqs[i])
      out[i] = [None] + [float(x) for x in lp[row, :n - 1]]
  return out


def write_jsonl_atomic(path: str, rows: Sequence[dict]) -> None:
  write_text_atomic(path, ''.join(json.dumps(r) + '\n' for r in rows))


def checkpoint_tokenizer(checkpoint_dir: str):
  """The checkpoint's tokenizer (glm's SentencePiece or a Hugging Face
  tokenizer.json), or None."""
  tok_path = checkpoint.tokenizer_path(checkpoint_dir)
  if not tok_path:
    return None
  from glm.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  return hf_tokenizer.open_tokenizer(tok_path)


def run(checkpoint_dir: str, input_path: str, output_path: str, *,
        batch_size: int = 8) -> int:
  """The `glm score` command. Returns the number of sequences scored."""
  cfg = checkpoint.load_config(checkpoint_dir)
  tokenizer = checkpoint_tokenizer(checkpoint_dir)
  if not os.path.isfile(input_path):
    raise ScoreInputError(f'input {input_path!r} does not exist.')
  seqs = read_inputs(input_path, cfg, tokenizer)
  _, params = checkpoint.load(checkpoint_dir)
  logprobs = score(cfg, params, seqs, batch_size=batch_size)
  write_jsonl_atomic(output_path, [{'tokens': s, 'logprobs': lp}
                                   for s, lp in zip(seqs, logprobs)])
  print(f'scored {len(seqs)} sequences -> {output_path}', file=sys.stderr)
  return len(seqs)
