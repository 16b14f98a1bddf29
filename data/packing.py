"""Packing unpacked examples into fixed-length rows with segment ids.

An unpacked example (see `glm.data.objectives`) is a dict of 1D arrays of one
length n -- tokens, targets, loss_mask, position_ids, block_position_ids --
plus a scalar prefix_len. A packed row of length T concatenates examples and
adds:

  segment_ids  [T] int32  1, 2, ... per example; 0 on padding
  prefix_mask  [T] bool   True on each example's own bidirectional prefix

Positions are the examples' own (they restart at every segment), so the
model's attention is block-diagonal and every packed example keeps its own
prefix: exactly what the example would see alone.

  row = pack([ex1, ex2], seq_len=8)
  tokens       a a a b b b . .
  segment_ids  1 1 1 2 2 2 0 0
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from glm.data.errors import DataError

ARRAY_FIELDS = ('tokens', 'targets', 'loss_mask', 'position_ids',
                'block_position_ids')
ROW_FIELDS = ARRAY_FIELDS + ('segment_ids', 'prefix_mask')


def example_length(example: dict) -> int:
  return int(len(example['tokens']))


def pack(examples: Sequence[dict], seq_len: int, *, pad_id: int = 0
         ) -> dict[str, np.ndarray]:
  """Concatenates examples into one row of seq_len, padding the rest."""
  total = sum(example_length(e) for e in examples)
  if total > seq_len:
    raise DataError(f'examples of {total} tokens do not fit a row of '
                    f'seq_len={seq_len}; pack fewer or shorter examples.')
  row = {
      'tokens': np.full(seq_len, pad_id, np.int32),
      'targets': np.full(seq_len, pad_id, np.int32),
      'loss_mask': np.zeros(seq_len, np.int32),
      'position_ids': np.zeros(seq_len, np.int32),
      'block_position_ids': np.zeros(seq_len, np.int32),
      'segment_ids': np.zeros(seq_len, np.int32),
      'prefix_mask': np.zeros(seq_len, bool),
  }
  at = 0
  for seg, ex in enumerate(examples, 1):
    n = example_length(ex)
    for field in ARRAY_FIELDS:
      row[field][at:at + n] = ex[field]
    row['segment_ids'][at:at + n] = seg
    row['prefix_mask'][at:at + int(ex['prefix_len'])] = True
    at += n
  return row


def fill_row(next_example: Callable[[], dict], seq_len: int, *,
             pad_id: int = 0, max_examples: int = 64
             ) -> tuple[dict[str, np.ndarray], list[dict]]:
  """Greedily packs examples from `next_example` until the next one does not
  fit; that one is dropped (rows stay a pure function of their generator).

  Returns (row, the examples in it).
  """
  taken: list[dict] = []
  used = 0
  while len(taken) < max_examples:
    ex = next_example()
    n = example_length(ex)
    if n > seq_len:
      raise DataError(f'an example of {n} tokens is longer than '
                      f'seq_len={seq_len}; size windows to the sequence.')
    if used + n > seq_len:
      break
    taken.append(ex)
    used += n
    if used == seq_len:
      break
  return pack(taken, seq_len, pad_id=pad_id), taken


def stack_rows(rows: Sequence[dict[str, np.ndarray]]
               ) -> dict[str, np.ndarray]:
  """[T] rows -> a [B, T] batch."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
