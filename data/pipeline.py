"""Deterministic example, row and batch construction for every objective.

One `Pipeline` turns a tokenized corpus split into model batches for a task
mixture. Everything is a pure function of (seed, key): the example
`example(task, i)`, the packed row `row(step, r)` and the batch `batch(step)`
never depend on what was asked before, so a run resumed at step k sees exactly
the batches an uninterrupted run sees, without replaying the data.

Rows, per task (each row draws its task from the mixture rates):
  causal_lm            one window of T + 1 tokens: a full row, no padding.
  glm_blank_infilling  one objective per row from `glm_rates` (GLM-130B:
                       30% [MASK], 70% [gMASK]): a [gMASK] row holds one
                       example of a T - 2 token window; [MASK] / [sMASK] rows
                       pack `pack_factor` examples of T / pack_factor tokens
                       (GLM-130B packs 4 x 512 into 2048), block-diagonal.
  ul2_mixture          one denoiser per row: a full-size example, then
                       shorter ones filling the rest of the row.
  instruction          prompted examples packed up to T / pack_factor each.

Batch fields (all [B, T]): tokens, targets, loss_mask, segment_ids (0 = pad),
position_ids, block_position_ids, prefix_mask. They are what
`glm.model.transformer.Transformer` and `glm.training.losses` read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Mapping

import numpy as np

from glm.data import corpus
from glm.data.errors import DataError
from glm.data import glm_objective
from glm.data import instructions
from glm.data import objectives
from glm.data import packing
from glm.data import token_stream
from glm.data import tokenizer as tokenizer_lib
from glm.data import ul2_objective


TASKS = ('causal_lm', 'glm_blank_infilling', 'ul2_mixture', 'instruction')
GLM130B_RATES = {'mask': 0.3, 'gmask': 0.7}
MIN_UL2_FILL = 16  # shortest window packed after a row's first UL2 example


def _task_id(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], 'little')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How examples are made; gin binds it at the edge (train, preview)."""
  mixture: tuple[tuple[str, float], ...] = (('causal_lm', 1.0),)
  glm_rates: tuple[tuple[str, float], ...] = tuple(GLM130B_RATES.items())
  ul2_rates: tuple[float, ...] | None = None  # None: uniform over the seven
  pack_factor: int = 4
  mask_ratio: float = 0.15

  def __post_init__(self):
    names = [n for n, _ in self.mixture]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
      raise DataError(f'mixture tasks {unknown or names} must be some of '
                      f'{TASKS}.')
    rates = np.array([r for _, r in self.mixture], float)
    if (rates < 0).any() or rates.sum() <= 0:
      raise DataError(f'mixture rates {dict(self.mixture)} must be '
                      'non-negative with a positive sum.')
    if self.pack_factor < 1:
      raise DataError(f'pack_factor={self.pack_factor} must be >= 1.')

  @classmethod
  def for_task(cls, task: str, **kwargs) -> 'DataConfig':
    return cls(mixture=((task, 1.0),), **kwargs)


class SplitData:
  """One tokenized corpus split: the token stream, sentence ends, documents."""

  def __init__(self, corpus_dir: str, tok, split: str,
               cache_dir: str | None = None):
    self.tok = tok
    self.split = split
    self.corpus_dir = corpus_dir
    self.cache_dir = cache_dir
    self.stream = token_stream.load_token_stream(corpus_dir, tok, split,
                                                 cache_dir)
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    self.sentence_end = glm_objective.sentence_end_table(pieces)[self.stream]
    self.special = objectives.SpecialIds.from_tokenizer(tok)

  @functools.cached_property
  def documents(self) -> list[instructions.Document]:
    return [instructions.Document(d['lang'], d['text'])
            for d in corpus.iter_documents(self.corpus_dir, self.split)]

  def window(self, rng: np.random.Generator, length: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """A random window of `length` tokens and its sentence-end flags."""
    if len(self.stream) < length:
      raise DataError(f'the {self.split} split has {len(self.stream)} '
                      f'tokens, fewer than one window of {length}; build a '
                      'larger corpus or use a shorter SEQ_LEN.')
    start = int(rng.integers(0, len(self.stream) - length + 1))
    return (self.stream[start:start + length],
            self.sentence_end[start:start + length])


class Pipeline:
  """Examples, packed rows and batches of a task mixture over one split."""

  def __init__(self, data: SplitData, config: DataConfig, *, seq_len: int,
               batch_size: int = 1, seed: int = 0,
               gmask_positions: str = 'mask'):
    """`gmask_positions` is the model's (`ModelConfig.gmask_positions`):
    where a [gMASK] span's Part B sits, see `glm_objective`."""
    self.data = data
    self.gmask_positions = gmask_positions
    self.config = config
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.seed = seed
    self.special = data.special
    self._tasks = [n for n, _ in config.mixture]
    rates = np.array([r for _, r in config.mixture], float)
    needs = [n for n, r in config.mixture
             if r > 0 and n in ('glm_blank_infilling', 'ul2_mixture')]
    if needs and not self.special.has_infilling:
      raise DataError(
          f'task {needs[0]} needs the GLM / UL2 special tokens ([MASK], '
          f'<sop>, <extra_id_0>, ...), which tokenizer '
          f'{data.tok.model_path} lacks; use causal_lm or instruction data '
          'with it, or a glm tokenizer.')
    self._task_p = rates / rates.sum()
    self._glm_rates = dict(config.glm_rates)
    self._sub_len = seq_len // config.pack_factor
    used = [o for o, r in self._glm_rates.items() if r > 0]
    packed_objs = [o for o in used if o != 'gmask']
    self._glm_window = {
        'gmask': glm_objective.max_glm_window(seq_len, ('gmask',)),
    }
    if packed_objs:
      window = glm_objective.max_glm_window(self._sub_len, packed_objs,
                                            config.mask_ratio)
      self._glm_window.update({o: window for o in packed_objs})
    self._ul2_window = ul2_objective.max_ul2_window(seq_len)
    # Prompts need room: T / pack_factor, but at least min(T, 128) tokens.
    self._instruction_len = max(self._sub_len, min(seq_len, 128))

  # Examples -----------------------------------------------------------------

  def _rng(self, *key: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, *key])

  def _glm(self, rng, objective: str) -> dict:
    window, ends = self.data.window(rng, self._glm_window[objective])
    if objective == 'smask' and not ends[:-1].any():
      objective = 'mask'  # one sentence only: nothing whole to take out
    ex = glm_objective.glm_example(window, self.special, rng,
                                   objective=objective, sentence_end=ends,
                                   mask_ratio=self.config.mask_ratio,
                                   gmask_positions=self.gmask_positions)
    ex['source_tokens'] = window
    return ex

  def _ul2(self, rng, denoiser) -> dict:
    window, _ = self.data.window(rng, self._ul2_window)
    ex = ul2_objective.ul2_example(window, self.special, rng,
                                   denoiser=denoiser)
    ex['source_tokens'] = window
    return ex

  def _ul2_row(self, rng, denoiser) -> list[dict]:
    """One full-size example, then shorter ones of the same denoiser that
    fill the rest of the row exactly (each example's length is fixed by its
    window), down to windows of MIN_UL2_FILL tokens."""
    examples = [self._ul2(rng, denoiser)]
    used = len(examples[0]['tokens'])
    while self.seq_len - used >= MIN_UL2_FILL:
      try:
        length = ul2_objective.max_ul2_window(self.seq_len - used, (denoiser,))
      except ValueError:
        break
      if length < MIN_UL2_FILL:
        break
      window, _ = self.data.window(rng, length)
      ex = ul2_objective.ul2_example(window, self.special, rng,
                                     denoiser=denoiser)
      ex['source_tokens'] = window
      examples.append(ex)
      used += len(ex['tokens'])
    return examples

  def _causal(self, rng) -> dict:
    window, _ = self.data.window(rng, self.seq_len + 1)
    ex = objectives.causal_example(window)
    ex['source_tokens'] = window
    return ex

  def _instruction(self, rng) -> dict:
    return instructions.instruction_example(
        rng, self.data.documents, self.data.tok, self.special,
        max_len=self._instruction_len)

  def _ul2_denoiser(self, rng):
    return ul2_objective.sample_denoiser(rng, self.config.ul2_rates)

  def example(self, task: str, index: int) -> dict:
    """The index-th unpacked example of `task` (objective drawn as in rows)."""
    rng = self._rng(1, _task_id(task), index)
    if task == 'causal_lm':
      ex = self._causal(rng)
    elif task == 'glm_blank_infilling':
      obj = glm_objective.sample_glm_objective_mix(rng, self._glm_rates)
      ex = self._glm(rng, obj)
    elif task == 'ul2_mixture':
      ex = self._ul2(rng, self._ul2_denoiser(rng))
    elif task == 'instruction':
      ex = self._instruction(rng)
    else:
      raise DataError(f'task {task!r} is not one of {TASKS}.')
    ex['task'] = task
    return ex

  # Rows and batches -----------------------------------------------------------

  def row(self, step: int, index: int) -> tuple[dict[str, np.ndarray],
                                                list[dict]]:
    """Row `index` of batch `step`: (packed arrays, the examples in it)."""
    rng = self._rng(2, step, index)
    task = self._tasks[int(rng.choice(len(self._tasks), p=self._task_p))]
    pad = self.special.pad
    if task == 'causal_lm':
      make = lambda: self._causal(rng)
    elif task == 'glm_blank_infilling':
      obj = glm_objective.sample_glm_objective_mix(rng, self._glm_rates)
      make = lambda: self._glm(rng, obj)
      if obj == 'gmask':
        ex = make()
        return packing.pack([ex], self.seq_len, pad_id=pad), [
            dict(ex, task=task)]
    elif task == 'ul2_mixture':
      examples = self._ul2_row(rng, self._ul2_denoiser(rng))
      return packing.pack(examples, self.seq_len, pad_id=pad), [
          dict(e, task=task) for e in examples]
    else:
      make = lambda: self._instruction(rng)
    row, examples = packing.fill_row(make, self.seq_len, pad_id=pad)
    return row, [dict(e, task=task) for e in examples]

  def batch(self, step: int, rows: int | None = None
            ) -> dict[str, np.ndarray]:
    """[B, T] arrays for one training step; a pure function of (seed, step).

    `rows` overrides the batch size (a batch-size ramp); row r of a step is
    the same whatever the number of rows asked for.
    """
    return self.rows(step, range(rows or self.batch_size))

  def rows(self, step: int, indices) -> dict[str, np.ndarray]:
    """Rows `indices` of step `step` as a [len(indices), T] batch (each host
    of a multi-process run builds only the rows its devices hold)."""
    return packing.stack_rows([self.row(step, r)[0] for r in indices])

  def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
    """n fixed held-out batches (keys disjoint from training steps)."""
    return [self.batch(-(i + 1) % (2 ** 31)) for i in range(n)]


def language_eval_batches(data: SplitData, *, seq_len: int, batch_size: int,
                          num_batches: int) -> dict[str, list[dict]]:
  """Causal-LM batches per language of a (held-out) split.

  Each language's documents are tokenized and concatenated with eos; its
  first num_batches * batch_size non-overlapping windows of seq_len + 1 make
  its batches. Languages with less text than one batch are left out.
  """
  by_lang: dict[str, list[int]] = {}
  for doc in data.documents:
    by_lang.setdefault(doc.lang, []).extend(
        data.tok.encode(doc.text) + [data.special.eos])
  out = {}
  for lang, ids in sorted(by_lang.items()):
    stream = np.asarray(ids, np.int32)
    windows = min((len(stream) - 1) // seq_len, num_batches * batch_size)
    n_batches = windows // batch_size
    if not n_batches:
      continue
    batches = []
    for b in range(n_batches):
      rows = []
      for r in range(batch_size):
        start = (b * batch_size + r) * seq_len
        ex = objectives.causal_example(stream[start:start + seq_len + 1])
        rows.append(packing.pack([ex], seq_len, pad_id=data.special.pad))
      batches.append(packing.stack_rows(rows))
    out[lang] = batches
  return out


def preview_record(example: Mapping[str, Any],
                   special: objectives.SpecialIds) -> dict[str, Any]:
  """The JSON schema of `glm data preview` for one unpacked example."""
  ints = lambda a: [int(x) for x in np.asarray(a)]
  special_ids = {name: int(getattr(special, field)) for field, name in
                 objectives.PIECE_NAMES.items()}
  special_ids['sentinels'] = [int(s) for s in special.sentinels]
  return {
      'task': example['task'],
      'objective': example['objective'],
      'denoiser': example.get('denoiser'),
      'source_tokens': ints(example['source_tokens']),
      'tokens': ints(example['tokens']),
      'targets': ints(example['targets']),
      'loss_mask': ints(example['loss_mask']),
      'position_ids': ints(example['position_ids']),
      'block_position_ids': ints(example['block_position_ids']),
      'prefix_len': int(example['prefix_len']),
      'special_ids': special_ids,
  }


def open_split(data_dir: str, split: str, *, vocab_size: int = 4096,
               seed: int = 0, tokenizer=None) -> SplitData:
  """Builds (if needed) the corpus and tokenizer under data_dir; loads a split.
  With `tokenizer` (e.g. a checkpoint's) that one is used, its token streams
  cached under data_dir/streams."""
  corpus_dir = os.path.join(data_dir, 'corpus')
  corpus.ensure_corpus(corpus_dir)
  if tokenizer is not None:
    return SplitData(corpus_dir, tokenizer, split,
                     cache_dir=os.path.join(data_dir, 'streams'))
  tok_path = tokenizer_lib.ensure_tokenizer(
      corpus_dir, os.path.join(data_dir, f'spm_{vocab_size}'),
      vocab_size=vocab_size, seed=seed)
  return SplitData(corpus_dir, tokenizer_lib.Tokenizer(tok_path), split)
