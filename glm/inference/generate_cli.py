"""`glm generate`: continuations of prompts from a checkpoint.

Input lines are `glm score`'s ({"tokens": [ids]} or {"text": "..."}; every
other field is passed through); each output line adds "new_tokens" (the
eos is not included) and, where the checkpoint has a tokenizer, "new_text".
`--prompt TEXT` prints the continuation instead. Prompts are sorted by
length and decoded in batches whose prompt length is rounded up to a bucket,
so a file compiles a handful of shapes. The eos is the tokenizer's, or the
converted Hugging Face config's `eos_token_id`.

GLM blank infilling (`--mode`): 'infill' fills every [MASK], [sMASK] and
[gMASK] of each prompt, left to right (`glm.inference.infill`; a prompt
without one gets [gMASK] appended); 'continue' continues every prompt;
'auto' (the default) infills the prompts that hold a blank and continues
the others. An infilled line adds "infilled_tokens", "spans" (one
{"mask", "start", "tokens"} per blank, in text order; "text" too with a
tokenizer) and, with a tokenizer, "infilled" (the text with its blanks
filled); `--prompt` prints the infilled text.
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
from glm.inference import infill as infill_lib
from glm.inference import scoring
from glm.model import checkpoint


MODES = ('auto', 'continue', 'infill')


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
  mode: str = 'auto'

  def check(self) -> generate_lib.Sampling:
    sampling = generate_lib.Sampling(self.temperature, self.top_k, self.top_p)
    sampling.check()
    for name in ('max_new_tokens', 'num_beams', 'batch_size'):
      if getattr(self, name) < 1:
        raise UserError(f'--{name}={getattr(self, name)} must be >= 1.')
    if self.mode not in MODES:
      raise UserError(f'--mode={self.mode!r} is not one of {MODES}.')
    if self.num_beams > 1 and self.mode == 'infill':
      raise UserError(f'--num_beams={self.num_beams}: blank infilling decodes '
                      'greedily or samples; drop --num_beams.')
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


def in_batches(prompts, options: Options, max_len: int, decode, *,
               what: str = 'glm generate') -> list:
  """decode(batch, length, n) over length-sorted batches of
  `options.batch_size` prompts (the last one padded to that size, its
  length rounded up to a bucket); the results in input order."""
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[Any] = [None] * len(prompts)
  t0 = last = time.time()
  for n, start in enumerate(range(0, len(order), options.batch_size)):
    if time.time() - last > 10:  # progress on long files
      last = time.time()
      print(f'{what}: {start}/{len(prompts)} prompts, '
            f'{last - t0:.0f}s', file=sys.stderr, flush=True)
    idx = order[start:start + options.batch_size]
    batch = [prompts[i] for i in idx]
    batch += [batch[-1]] * (options.batch_size - len(batch))  # one shape
    length = scoring.bucket(max(len(p) for p in batch), max_len)
    for i, row in zip(idx, decode(batch, length, n)):
      out[i] = row
  return out


def decode_all(cfg, params, prompts, options: Options, eos_id) -> list:
  """New tokens for every prompt, in input order."""
  sampling = options.check()

  def decode(batch, length, n):
    if options.num_beams > 1:
      return beam.beam_search(
          cfg, params, batch, max_new_tokens=options.max_new_tokens,
          num_beams=options.num_beams, length_penalty=options.length_penalty,
          eos_id=eos_id, length=length)
    return generate_lib.generate(
        cfg, params, batch, max_new_tokens=options.max_new_tokens,
        sampling=sampling, seed=options.seed + n, eos_id=eos_id,
        length=length)
  return in_batches(prompts, options, cfg.max_len, decode)


def infill_all(cfg, params, prompts, options: Options,
               ids: infill_lib.BlankIds) -> list:
  """`infill.infill`'s result for every prompt, in input order."""
  sampling = options.check()

  def decode(batch, length, n):
    del length  # each round buckets its own Part A length
    return infill_lib.infill(
        cfg, params, batch, ids, max_new_tokens=options.max_new_tokens,
        sampling=sampling, seed=options.seed + 1000 * n,
        bucket=lambda m: scoring.bucket(m, cfg.max_len))
  return in_batches(prompts, options, cfg.max_len, decode)


def _blank_ids(checkpoint_dir, tokenizer, options, prompts) -> tuple:
  """(ids or None, which prompts to infill)."""
  if options.mode == 'continue':
    return None, [False] * len(prompts)
  special = None
  if tokenizer is not None:
    from glm.data import objectives  # pylint: disable=g-import-not-at-top
    special = objectives.SpecialIds.from_tokenizer(tokenizer)
  if special is None or not special.has_infilling:
    if options.mode == 'infill':
      raise UserError(f'--mode=infill needs the [MASK] / [gMASK] / <sop> ids '
                      f'of a glm tokenizer and checkpoint {checkpoint_dir!r} '
                      'has none; use --mode=continue.')
    return None, [False] * len(prompts)
  ids = infill_lib.BlankIds.from_special(special)
  if options.mode == 'infill':
    return ids, [True] * len(prompts)
  return ids, [any(t in ids.blanks for t in p) for p in prompts]


def _infilled_row(row: dict, result: dict, tokenizer) -> dict:
  row = {**row, 'infilled_tokens': result['tokens'],
         'spans': [dict(s) for s in result['spans']]}
  if tokenizer is not None:
    row['infilled'] = tokenizer.decode(result['tokens'])
    for span in row['spans']:
      span['text'] = tokenizer.decode(span['tokens'])
  return row


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
  tokenizer = scoring.checkpoint_tokenizer(checkpoint_dir)
  rows = _read(checkpoint_dir, cfg, tokenizer, input_path, prompt, options)
  prompts = [t for t, _ in rows]
  ids, blank = _blank_ids(checkpoint_dir, tokenizer, options, prompts)
  _, params = checkpoint.load(checkpoint_dir)
  results: list[Any] = [None] * len(rows)
  for want_blank, fill in ((False, decode_all), (True, infill_all)):
    idx = [i for i, b in enumerate(blank) if b == want_blank]
    if idx:
      extra = ids if want_blank else _eos_id(checkpoint_dir, tokenizer)
      for i, r in zip(idx, fill(cfg, params, [prompts[i] for i in idx],
                                options, extra)):
        results[i] = r
  if prompt is not None:
    toks = results[0]['tokens'] if blank[0] else prompts[0] + results[0]
    print(tokenizer.decode(toks))
    return 1
  lines = []
  for (_, obj), b, res in zip(rows, blank, results):
    if b:
      lines.append(_infilled_row(obj, res, tokenizer))
      continue
    row = {**obj, 'new_tokens': res}
    if tokenizer is not None:
      row['new_text'] = tokenizer.decode(res)
    lines.append(row)
  scoring.write_jsonl_atomic(output_path, lines)
  print(f'generated for {len(rows)} prompts -> {output_path}',
        file=sys.stderr)
  return len(rows)
