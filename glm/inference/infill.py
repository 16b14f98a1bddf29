"""GLM blank infilling: fill every [MASK], [sMASK] and [gMASK] of a text.

A prompt is laid out as training lays out an example (`glm.data.
glm_objective`): the text with its blanks is Part A, seen bidirectionally;
`<sop>` follows and the blank's tokens are decoded one by one (KV cache,
`generate.decode`) until `<eop>` or eos. A prompt without a blank gets a
[gMASK] at its end. Blanks are filled left to right, each result spliced
into the text before the next blank is laid out, so a later blank sees the
earlier ones filled.

Positions (`ModelConfig.gmask_positions`, the same rule training used):
  'mask'      every token of the blank takes its mask's index in Part A, and
              block positions 1, 2, ... along the blank (`<sop>` = 1; read
              by 2D RoPE: GLM);
  'continue'  (1D RoPE) a [gMASK] blank continues Part A: |A|, |A| + 1, ...
              (GLM-130B); [MASK] and [sMASK] blanks still take the mask's
              index.

Layout of one round (`layout`), rows left-padded to Part A length P:
  slots    0 .. P-1      P       P+1 .. P+N
  tokens   pad.. A       <sop>   the blank's tokens
  prefix   A's slots (bidirectional); the rest causal by slot.

Usage:
  ids = infill.BlankIds.from_special(objectives.SpecialIds.from_tokenizer(t))
  rows = infill.infill(cfg, params, [t.encode('Paris is the [MASK] of
                       France.')], ids, max_new_tokens=16)
  rows[0]['tokens'], rows[0]['spans']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from glm.errors import UserError
from glm.inference import generate as generate_lib
from glm.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class BlankIds:
  """The token ids infilling reads and writes."""
  mask: int
  smask: int
  gmask: int
  sop: int
  eop: int
  eos: int | None = None

  @classmethod
  def from_special(cls, special: Any) -> 'BlankIds':
    """From `glm.data.objectives.SpecialIds`."""
    return cls(mask=special.mask, smask=special.smask, gmask=special.gmask,
               sop=special.sop, eop=special.eop, eos=special.eos)

  @property
  def blanks(self) -> tuple[int, int, int]:
    return (self.mask, self.smask, self.gmask)

  @property
  def stop(self) -> tuple[int, ...]:
    return (self.eop,) if self.eos is None else (self.eop, self.eos)

  def name(self, token: int) -> str:
    return {self.mask: '[MASK]', self.smask: '[sMASK]',
            self.gmask: '[gMASK]'}[token]


def with_blank(tokens: Sequence[int], ids: BlankIds) -> list[int]:
  """The prompt itself if it holds a blank, else with [gMASK] appended."""
  tokens = [int(t) for t in tokens]
  if any(t in ids.blanks for t in tokens):
    return tokens
  return tokens + [ids.gmask]


def first_blank(tokens: Sequence[int], ids: BlankIds,
                start: int = 0) -> int | None:
  """Index of the first blank at or after `start`, or None."""
  for i in range(start, len(tokens)):
    if tokens[i] in ids.blanks:
      return i
  return None


def layout(cfg: ModelConfig, rows: Sequence[tuple[Sequence[int], int]],
           ids: BlankIds, max_new_tokens: int,
           length: int | None = None) -> dict[str, np.ndarray]:
  """The batch of one round: Part A of each row (tokens, index of the blank
  to fill), left-padded to P (`length`, at least the longest), then `<sop>`.

  Returns `tokens` [B, P + 1] and the per-slot arrays [B, S] (S = P + 1 +
  `max_new_tokens`) that `generate.decode` reads: `segment_ids` (0 on
  padding), `position_ids`, `block_position_ids` and `prefix` (Part A).
  """
  p = max([length or 0] + [len(a) for a, _ in rows])
  s = p + 1 + max_new_tokens
  b = len(rows)
  tokens = np.zeros((b, p + 1), np.int32)
  tokens[:, p] = ids.sop
  out = {k: np.zeros((b, s), np.int32) for k in
         ('segment_ids', 'position_ids', 'block_position_ids')}
  prefix = np.zeros((b, s), bool)
  after = np.arange(s - p, dtype=np.int32)           # 0 at <sop>
  for r, (part_a, blank) in enumerate(rows):
    n_a = len(part_a)
    if not 0 <= blank < n_a or part_a[blank] not in ids.blanks:
      raise ValueError(f'row {r}: index {blank} is not a blank of Part A.')
    pad = p - n_a
    tokens[r, pad:p] = part_a
    out['segment_ids'][r, pad:] = 1
    out['position_ids'][r, pad:p] = np.arange(n_a)
    continues = (part_a[blank] == ids.gmask
                 and cfg.gmask_positions == 'continue')
    out['position_ids'][r, p:] = n_a + after if continues else blank
    out['block_position_ids'][r, p:] = after + 1
    prefix[r, pad:p] = True
  return {'tokens': tokens, **out, 'prefix': prefix}


def infill(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
           ids: BlankIds, *, max_new_tokens: int,
           sampling: generate_lib.Sampling = generate_lib.Sampling(),
           seed: int = 0, bucket: Callable[[int], int] | None = None
           ) -> list[dict[str, Any]]:
  """Every blank of every prompt filled, left to right (one batch).

  Args:
    cfg, params: the model.
    prompts: token ids; a prompt without a blank gets [gMASK] appended.
    ids: the special ids (`BlankIds.from_special`).
    max_new_tokens: the most tokens one blank may take.
    sampling, seed: as for `generate.generate`; round k uses `seed + k`.
    bucket: rounds Part A's length up (fewer compiled shapes).

  Returns:
    Per prompt {'tokens': the text with every blank filled, 'spans': one
    {'mask': '[MASK]' | '[sMASK]' | '[gMASK]', 'start': index of the span
    in 'tokens', 'tokens': its ids} per blank, in text order}.
  """
  if not prompts or any(len(x) == 0 for x in prompts):
    raise UserError('infill needs non-empty prompts.')
  texts = [with_blank(p, ids) for p in prompts]
  cursor = [0] * len(texts)
  spans: list[list[dict]] = [[] for _ in texts]
  for round_ in range(max(len(t) for t in texts) + 1):
    pending = [(i, first_blank(texts[i], ids, cursor[i]))
               for i in range(len(texts))]
    pending = [(i, m) for i, m in pending if m is not None]
    if not pending:
      break
    longest = max(len(texts[i]) for i, _ in pending)
    # Part A, <sop> and the blank: positions reach longest + max_new_tokens.
    generate_lib.check_request(cfg, longest + 1, max_new_tokens, sampling)
    rows = [(texts[i], m) for i, m in pending]
    rows += [rows[-1]] * (len(texts) - len(rows))    # one batch shape
    lay = layout(cfg, rows, ids, max_new_tokens,
                 bucket(longest) if bucket else None)
    new = generate_lib.decode(cfg, params, lay, max_new_tokens=max_new_tokens,
                              sampling=sampling, seed=seed + round_,
                              stop=ids.stop)
    for (i, m), span in zip(pending, new):
      spans[i].append({'mask': ids.name(texts[i][m]), 'start': m,
                       'tokens': span})
      texts[i] = texts[i][:m] + span + texts[i][m + 1:]
      cursor[i] = m + len(span)
  return [{'tokens': t, 'spans': s} for t, s in zip(texts, spans)]
