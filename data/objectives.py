"""Training objectives as pure NumPy example builders: shared parts and causal.

Every builder turns one window of source tokens (a 1D int32 array cut from a
tokenized document) into one unpacked example: a dict of equal-length 1D
arrays plus a few scalars. Packing several examples into a sequence and
batching happen elsewhere; nothing here uses TF, seqio or JAX.

Example fields (n is the example length):
  tokens             [n] int32  the model input.
  targets            [n] int32  targets[i] is the token to predict at i.
  loss_mask          [n] int32  1 where the loss counts.
  position_ids       [n] int32  the (first) position of each token.
  block_position_ids [n] int32  GLM's second position (0 elsewhere).
  prefix_len         int        key j is visible from query i iff j <= i or
                                j < prefix_len (0: plain causal).
  objective          str        'causal', 'mask', 'smask', 'gmask', 'ul2_r',
                                'ul2_x' or 'ul2_s'.
  denoiser           dict|None  UL2 only: {'mean_span': mu,
                                'noise_density': r}.

Causal LM, window [a b c d] (T + 1 = 4 tokens):
  tokens             a b c
  targets            b c d
  loss_mask          1 1 1
  position_ids       0 1 2
  block_position_ids 0 0 0      prefix_len 0

The other objectives live in `glm_objective` (GLM blank infilling: [MASK],
[sMASK], [gMASK]) and `ul2_objective` (UL2's mixture of seven denoisers).
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import numpy as np

from glm.data.errors import DataError

Example = dict[str, Any]

ARRAY_FIELDS = ('tokens', 'targets', 'loss_mask', 'position_ids',
                'block_position_ids')
OBJECTIVES = ('causal', 'mask', 'smask', 'gmask', 'ul2_r', 'ul2_x', 'ul2_s')
MIN_SENTINELS = 100

# SpecialIds field -> the piece name in `Tokenizer.special_ids`.
PIECE_NAMES = {
    'pad': '<pad>', 'eos': '</s>', 'mask': '[MASK]', 'smask': '[sMASK]',
    'gmask': '[gMASK]', 'sop': '<sop>', 'eop': '<eop>', 'nlu': '[NLU]',
    'nlg': '[NLG]', 's2s': '[S2S]',
}
_PIECE_NAMES = PIECE_NAMES  # The earlier private name, still read elsewhere.


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids of the special tokens the objectives write.

  `sentinels[k]` is `<extra_id_k>`, the k-th UL2 span sentinel.
  """
  pad: int
  eos: int
  mask: int
  smask: int
  gmask: int
  sop: int
  eop: int
  nlu: int
  nlg: int
  s2s: int
  sentinels: tuple[int, ...]

  def __post_init__(self):
    if len(self.sentinels) < MIN_SENTINELS:
      raise DataError(f'SpecialIds needs at least {MIN_SENTINELS} sentinels, '
                      f'got {len(self.sentinels)}.')
    ids = [getattr(self, f) for f in PIECE_NAMES] + list(self.sentinels)
    if len(set(ids)) != len(ids):
      raise DataError(f'SpecialIds must all differ; got {self}.')

  @classmethod
  def from_mapping(cls, special_ids: Mapping[str, int]) -> 'SpecialIds':
    """From a piece name -> id mapping such as `Tokenizer.special_ids`."""
    sentinel_names = [f'<extra_id_{k}>' for k in range(MIN_SENTINELS)]
    missing = [n for n in list(PIECE_NAMES.values()) + sentinel_names
               if n not in special_ids]
    if missing:
      raise DataError(f'special_ids lacks {missing[:3]} ({len(missing)} '
                      'missing); train the tokenizer with '
                      'tokenizer.train_tokenizer, which reserves them.')
    k = MIN_SENTINELS
    while f'<extra_id_{k}>' in special_ids:
      k += 1
    return cls(**{f: int(special_ids[n]) for f, n in PIECE_NAMES.items()},
               sentinels=tuple(int(special_ids[f'<extra_id_{i}>'])
                               for i in range(k)))

  @classmethod
  def from_tokenizer(cls, tok) -> 'SpecialIds':
    """From a tokenizer's `special_ids`. A tokenizer with only pad and eos
    (a Hugging Face BLOOM one) gets distinct negative placeholders for the
    rest, which `has_infilling` reports: causal and instruction data need
    nothing more, the GLM and UL2 objectives refuse it."""
    ids = tok.special_ids
    if all(n in ids for n in PIECE_NAMES.values()):
      return cls.from_mapping(ids)
    fields = [f for f in PIECE_NAMES if f not in ('pad', 'eos')]
    return cls(pad=int(ids['<pad>']), eos=int(ids['</s>']),
               **{f: -1 - i for i, f in enumerate(fields)},
               sentinels=tuple(range(-1 - len(fields),
                                     -1 - len(fields) - MIN_SENTINELS, -1)))

  @property
  def has_infilling(self) -> bool:
    """Whether the GLM / UL2 special tokens are real ids."""
    return self.mask >= 0 and min(self.sentinels) >= 0


def check_source(source, *, min_length: int, objective: str) -> np.ndarray:
  """`source` as a 1D int32 array of at least `min_length` tokens, or raises."""
  source = np.asarray(source)
  if source.ndim != 1:
    raise DataError(f'{objective}: the source must be 1D, got shape '
                    f'{source.shape}.')
  if source.size == 0:
    raise DataError(f'{objective}: the source is empty; it needs at least '
                    f'{min_length} tokens.')
  if source.size < min_length:
    raise DataError(f'{objective}: a source of L={source.size} tokens is too '
                    f'short; it needs at least {min_length}.')
  if source.dtype.kind not in 'iu':
    raise DataError(f'{objective}: the source must hold integer token ids, '
                    f'got dtype {source.dtype}.')
  return source.astype(np.int32, copy=False)


def make_example(*, tokens, targets, loss_mask, position_ids,
                 block_position_ids, prefix_len: int, objective: str,
                 denoiser: dict[str, Any] | None = None) -> Example:
  """Assembles an example dict, casting to int32 and checking lengths."""
  if objective not in OBJECTIVES:
    raise ValueError(f'{objective=} is not one of {OBJECTIVES}.')
  arrays = dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
                position_ids=position_ids,
                block_position_ids=block_position_ids)
  example = {k: np.asarray(v, np.int32) for k, v in arrays.items()}
  lengths = {k: v.shape for k, v in example.items()}
  n = example['tokens'].shape
  if len(n) != 1 or any(s != n for s in lengths.values()):
    raise ValueError(f'example arrays must be 1D of one length; got {lengths}.')
  if not 0 <= prefix_len <= n[0]:
    raise ValueError(f'{prefix_len=} is outside [0, {n[0]}].')
  example.update(prefix_len=int(prefix_len), objective=objective,
                 denoiser=denoiser)
  return example


def prefix_lm_mask(n: int, prefix_len: int) -> np.ndarray:
  """[n, n] bool: query i sees key j iff j <= i or j < prefix_len."""
  i = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  return (j <= i) | (j < prefix_len)


def causal_example(window) -> Example:
  """Next-token prediction on a window of T + 1 tokens (see module doc)."""
  window = check_source(window, min_length=2, objective='causal')
  t = window.size - 1
  return make_example(
      tokens=window[:-1], targets=window[1:], loss_mask=np.ones(t),
      position_ids=np.arange(t), block_position_ids=np.zeros(t),
      prefix_len=0, objective='causal')
