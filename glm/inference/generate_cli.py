"""`glm generate`: continuations of prompts from a checkpoint.

Input lines are `glm score`'s ({"tokens": [ids]} or {"text": "..."}; every
other field is passed through); each output line adds "new_tokens" (the
eos is not included) and, where the checkpoint has a tokenizer, "new_text".
`--prompt TEXT` prints the continuation instead. Prompts are sorted by
length and decoded in batches whose prompt length is rounded up to a bucket,
so a file compiles a handful of shapes. The eos is the tokenizer's, or the
converted Hugging Face config's `eos_token_id`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from glm.errors import UserError
from glm.inference import beam
from glm.inference import generate as generate_lib
from glm.inference import scoring
from glm.model import checkpoint


@dataclasses.dataclass(frozen=True)
class Options:
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 1
  length_penalty: float = 1.0
  seed: int = 0
  batch_size: int = 8

  def check(self) -> generate_lib.Sampling:
    sampling = generate_lib.Sampling(self.temperature, self.top_k, self.top_p)
    sampling.check()
    for name in ('max_new_tokens', 'num_beams', 'batch_size'):
      if getattr(self, name) < 1:
        raise UserError(f'--{name}={getattr(self, name)} must be >= 1.')
    if self.num_beams > 1 and (self.temperature or self.top_k
                               or self.top_p < 1.0):
      raise UserError(f'--num_beams={self.num_beams} searches '
                      'deterministically; drop --temperature, --top_k and '
                      '--top_p, or use --num_beams=1 to sample.')
    return sampling


def _eos_id(checkpoint_dir: str, tokenizer: Any | None) -> int | None:
  if tokenizer is not None:
    return tokenizer.eos_id
  hf = checkpoint.read_manifest(checkpoint_dir)['meta'].get('hf_config')
  return (hf or {}).get('eos_token_id')


def _read(checkpoint_dir, cfg, tokenizer, input_path, prompt, options):
  if prompt is not None:
    if tokenizer is None:
      raise UserError(f'--prompt needs a tokenizer and checkpoint '
                      f'{checkpoint_dir!r} has none; pass token ids with '
                      '--input instead.')
    rows = [(tokenizer.encode(prompt), {'text': prompt})]
    if not rows[0][0]:
      raise UserError('--prompt is empty after tokenization; give some text.')
  else:
    if not os.path.isfile(input_path):
      raise UserError(f'input {input_path!r} does not exist.')
    rows = scoring.read_rows(input_path, cfg, tokenizer)
  if cfg.position == 'learned':
    for n, (toks, _) in enumerate(rows, 1):
      if len(toks) + options.max_new_tokens > cfg.max_len:
        raise UserError(
            f'prompt {n}: {len(toks)} tokens + --max_new_tokens='
            f'{options.max_new_tokens} exceeds max_len={cfg.max_len} '
            '(learned positions); ask for fewer tokens.')
  return rows


def decode_all(cfg, params, prompts, options: Options, eos_id) -> list:
  """New tokens for every prompt, in input order."""
  sampling = options.check()
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[list[int]] = [[] for _ in prompts]
  t0 = last = time.time()
  for n, start in enumerate(range(0, len(order), options.batch_size)):
    if time.time() - last > 10:  # progress on long files
      last = time.time()
      print(f'glm generate: {start}/{len(prompts)} prompts, '
            f'{last - t0:.0f}s', file=sys.stderr, flush=True)
    idx = order[start:start + options.batch_size]
    batch = [prompts[i] for i in idx]
    batch += [batch[-1]] * (options.batch_size - len(batch))  # one shape
    length = scoring.bucket(max(len(p) for p in batch), cfg.max_len)
    if options.num_beams > 1:
      new = beam.beam_search(
          cfg, params, batch, max_new_tokens=options.max_new_tokens,
          num_beams=options.num_beams, length_penalty=options.length_penalty,
          eos_id=eos_id, length=length)
    else:
      new = generate_lib.generate(
          cfg, params, batch, max_new_tokens=options.max_new_tokens,
          sampling=sampling, seed=options.seed + n, eos_id=eos_id,
          length=length)
    for i, row in zip(idx, new):
      out[i] = row
  return out


def run(checkpoint_dir: str, *, input_path: str | None = None,
        output_path: str | None = None, prompt: str | None = None,
        options: Options = Options()) -> int:
  """The `glm generate` command. Returns the number of prompts."""
  options.check()
  if (prompt is None) == (input_path is None):
    raise UserError('give either --prompt TEXT or --input IN.jsonl with '
                    '--output OUT.jsonl.')
  if input_path is not None and output_path is None:
    raise UserError('--input needs --output OUT.jsonl.')
  cfg = checkpoint.load_config(checkpoint_dir)
  tok_path = checkpoint.tokenizer_path(checkpoint_dir)
  tokenizer = None
  if tok_path:
    from glm.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = Tokenizer(tok_path)
  rows = _read(checkpoint_dir, cfg, tokenizer, input_path, prompt, options)
  _, params = checkpoint.load(checkpoint_dir)
  new = decode_all(cfg, params, [t for t, _ in rows], options,
                   _eos_id(checkpoint_dir, tokenizer))
  if prompt is not None:
    print(tokenizer.decode(rows[0][0] + new[0]))
    return 1
  results = []
  for (_, obj), toks in zip(rows, new):
    row = {**obj, 'new_tokens': toks}
    if tokenizer is not None:
      row['new_text'] = tokenizer.decode(toks)
    results.append(row)
  scoring.write_jsonl_atomic(output_path, results)
  print(f'generated for {len(rows)} prompts -> {output_path}',
        file=sys.stderr)
  return len(rows)
