"""GLM autoregressive blank infilling: [MASK], [sMASK] and [gMASK] examples.

Spans of the source are cut out. Part A is the source with each span replaced
by one mask token; Part B lists the spans in a random order, each as input
`<sop> + span` and target `span + <eop>`. The example is A ++ B with a prefix
mask of |A| (A bidirectional and blind to B; B sees A and itself causally)
and the loss on Part B only.

Worked example, source [a b c d e f], spans (b c) and (e), Part B order
(e), (b c); M is the mask token, S <sop>, E <eop>:
  tokens             a M d M f | S e | S b c
  targets            a M d M f | e E | b c E
  loss_mask          0 0 0 0 0 | 1 1 | 1 1 1
  position_ids       0 1 2 3 4 | 3 3 | 1 1 1   (B: its mask's index in A)
  block_position_ids 0 0 0 0 0 | 1 2 | 1 2 3   (1..l+1 along a span)
  prefix_len 5 (= |A|). Its length is L + 2 * (number of spans).
With `gmask_positions='continue'` (GLM-130B's 1D RoPE) a [gMASK] span's
Part B takes positions |A|, |A| + 1, ... instead of its mask's index, so a
[gMASK] example reads like a causal continuation.

Span choice (DESIGN section 4):
  mask   Lengths are iid Poisson(lambda) draws resampled until they fall in
         [1, max_span] (a truncated Poisson), drawn until their sum reaches
         M = round(mask_ratio * L) clipped to [1, L - 1]; the last length is
         cut so the sum is exactly M. The lengths are shuffled (so the cut
         span sits anywhere) and placed uniformly among all layouts in which
         no two spans touch ("stars and bars" over the unmasked tokens).
  smask  The sentences (a sentence ends at each True of `sentence_end`, and
         the text after the last True is one more) are shuffled and taken
         whole, in that order, until at least M tokens are masked. A sentence
         that would mask the whole source is left out, so at least one token
         always stays in Part A; hence a source needs >= 2 sentences.
  gmask  One span ending at the end of the source, its length uniform in
         [max(1, ceil(gmask_min_ratio * L)), L - 1].
Every objective needs L >= 2, so that Part A keeps a source token.

Usage:
  special = objectives.SpecialIds.from_tokenizer(tok)
  example = glm_example(window, special, rng,
                        objective=sample_glm_objective(rng))
"""

from collections.abc import Mapping, Sequence
import math

import numpy as np

from glm.data.errors import DataError
from glm.data import objectives


GLM_OBJECTIVES = ('mask', 'smask', 'gmask')
GMASK_POSITIONS = ('mask', 'continue')
MIN_LENGTH = 2
SENTENCE_END_CHARS = '.?!;:。？！；…\n'
_NEWLINE_BYTE_PIECE = '<0x0A>'


def sentence_end_table(pieces: Sequence[str]) -> np.ndarray:
  """[V] bool: which vocabulary pieces end a sentence (for [sMASK]).

  A piece ends a sentence when its text, without trailing spaces, ends in one
  of `SENTENCE_END_CHARS` or it is the newline byte piece.

  Args:
    pieces: the piece of every id, e.g.
      `[tok.id_to_piece(i) for i in range(tok.vocab_size)]`.

  Returns:
    The table; `table[source]` is the `sentence_end` argument of
    `glm_example`.
  """
  def ends(piece: str) -> bool:
    if piece == _NEWLINE_BYTE_PIECE:
      return True
    text = piece.replace('\u2581', ' ')
    text = text.rstrip(' ') or text
    return bool(text) and text[-1] in SENTENCE_END_CHARS
  return np.array([ends(p) for p in pieces], dtype=bool)


def num_masked_tokens(length: int, mask_ratio: float) -> int:
  """M = round(mask_ratio * length) clipped to [1, length - 1]."""
  return int(min(max(round(mask_ratio * length), 1), length - 1))


def truncated_poisson_pmf(poisson_lambda: float, max_span: int) -> np.ndarray:
  """[max_span + 1] pmf of Poisson(lambda) conditioned on 1..max_span."""
  k = np.arange(max_span + 1)
  log_p = k * math.log(poisson_lambda) - poisson_lambda - np.array(
      [math.lgamma(x + 1) for x in k])
  p = np.exp(log_p)
  p[0] = 0.0
  return p / p.sum()


def sample_span_lengths(rng: np.random.Generator, num_masked: int, *,
                        poisson_lambda: float = 3.0,
                        max_span: int = 39) -> np.ndarray:
  """Truncated-Poisson span lengths, in draw order, summing to `num_masked`.

  Draws are resampled until they fall in [1, max_span] and taken until their
  sum reaches `num_masked`; the last one is cut to hit it exactly. (So draw j
  is an uncut truncated-Poisson draw whenever j * max_span < num_masked.)
  """
  if num_masked < 1:
    raise DataError(f'{num_masked=} must be >= 1.')
  if poisson_lambda <= 0 or max_span < 1:
    raise DataError(f'{poisson_lambda=} must be > 0 and {max_span=} >= 1.')
  batch = int(num_masked / max(poisson_lambda, 1.0)) + 8
  chunks, total = [], 0
  while total < num_masked:
    x = rng.poisson(poisson_lambda, size=batch)
    x = x[(x >= 1) & (x <= max_span)]
    chunks.append(x)
    total += int(x.sum())
  lengths = np.concatenate(chunks).astype(np.int64)
  cum = np.cumsum(lengths)
  k = int(np.searchsorted(cum, num_masked)) + 1
  lengths = lengths[:k]
  lengths[-1] -= cum[k - 1] - num_masked
  return lengths


def place_spans(rng: np.random.Generator, lengths: np.ndarray,
                length: int) -> np.ndarray:
  """Starts for spans of `lengths` (in this order), uniformly, none touching.

  The L - sum(lengths) unmasked tokens fall into k + 1 gaps, the k - 1 inner
  ones non-empty. Taking one token off each inner gap leaves F free tokens in
  k + 1 gaps; a uniformly random choice of k "bars" among F + k slots gives a
  uniformly random such composition, and span j starts at bars[j] + (the
  lengths before it).
  """
  k = len(lengths)
  free = length - int(np.sum(lengths)) - (k - 1)
  if free < 0:
    raise DataError(f'{k} spans of {int(np.sum(lengths))} tokens cannot be '
                    f'placed apart in L={length}.')
  bars = np.sort(rng.choice(free + k, size=k, replace=False))
  return bars + np.cumsum(lengths) - lengths


def mask_spans(rng, length, *, mask_ratio=0.15, poisson_lambda=3.0,
               max_span=39) -> tuple[np.ndarray, np.ndarray]:
  """([MASK]) (starts, lengths) sorted by start; see the module doc."""
  if not 0 < mask_ratio <= 0.5:
    raise DataError(f'{mask_ratio=} must be in (0, 0.5] so that the spans '
                    'fit apart.')
  lengths = sample_span_lengths(
      rng, num_masked_tokens(length, mask_ratio),
      poisson_lambda=poisson_lambda, max_span=max_span)
  lengths = rng.permutation(lengths)
  return place_spans(rng, lengths, length), lengths


def sentence_spans(rng, sentence_end, *,
                   mask_ratio=0.15) -> tuple[np.ndarray, np.ndarray]:
  """([sMASK]) (starts, lengths) of whole sentences, sorted by start."""
  sentence_end = np.asarray(sentence_end, dtype=bool)
  length = sentence_end.size
  ends = np.flatnonzero(sentence_end[:-1])
  ends = np.append(ends, length - 1)            # [S] last token of each
  starts = np.concatenate([[0], ends[:-1] + 1])
  if starts.size < 2:
    raise DataError(f'[sMASK] needs at least 2 sentences, got 1 in L={length} '
                    'tokens (no sentence end before the last token); use '
                    "objective='mask' for this window.")
  lengths = ends - starts + 1
  order = rng.permutation(starts.size)
  cum = np.cumsum(lengths[order])
  take = int(np.searchsorted(cum, num_masked_tokens(length, mask_ratio))) + 1
  if cum[take - 1] >= length:                   # would mask everything
    take -= 1
  chosen = np.sort(order[:take])
  return starts[chosen], lengths[chosen]


def gmask_span(rng, length, *,
               gmask_min_ratio=0.2) -> tuple[np.ndarray, np.ndarray]:
  """([gMASK]) one suffix span, length uniform in [ceil(r L), L - 1]."""
  if not 0 <= gmask_min_ratio < 1:
    raise DataError(f'{gmask_min_ratio=} must be in [0, 1).')
  low = min(max(math.ceil(gmask_min_ratio * length), 1), length - 1)
  span = int(rng.integers(low, length))          # uniform in [low, L - 1]
  return np.array([length - span]), np.array([span])


def _mask_id(objective: str, special: objectives.SpecialIds) -> int:
  return {'mask': special.mask, 'smask': special.smask,
          'gmask': special.gmask}[objective]


def glm_example(source, special: objectives.SpecialIds,
                rng: np.random.Generator, *, objective: str,
                sentence_end=None, mask_ratio: float = 0.15,
                poisson_lambda: float = 3.0, max_span: int = 39,
                gmask_min_ratio: float = 0.2,
                gmask_positions: str = 'mask') -> objectives.Example:
  """One GLM blank-infilling example from a source window (see module doc).

  Args:
    source: [L] int token ids, L >= 2.
    special: the special token ids.
    rng: the randomness (span choice and Part B order).
    objective: 'mask', 'smask' or 'gmask'.
    sentence_end: [L] bool, True at tokens that end a sentence; required for
      'smask' (see `sentence_end_table`).
    mask_ratio: fraction of tokens to mask ('mask', 'smask').
    poisson_lambda: mean of the untruncated span-length Poisson ('mask').
    max_span: the longest [MASK] span.
    gmask_min_ratio: the shortest [gMASK] span as a fraction of L.
    gmask_positions: 'mask' (Part B at the mask's index, GLM) or 'continue'
      (a [gMASK] span at |A|, |A| + 1, ..., GLM-130B's 1D RoPE).

  Returns:
    The example; length L + 2 * (number of spans), see `max_glm_length`.
  """
  if objective not in GLM_OBJECTIVES:
    raise DataError(f'{objective=} is not one of {GLM_OBJECTIVES}.')
  if gmask_positions not in GMASK_POSITIONS:
    raise DataError(f'{gmask_positions=} is not one of {GMASK_POSITIONS}.')
  source = objectives.check_source(source, min_length=MIN_LENGTH,
                                   objective=f'glm {objective}')
  length = source.size
  if objective == 'mask':
    starts, lengths = mask_spans(rng, length, mask_ratio=mask_ratio,
                                 poisson_lambda=poisson_lambda,
                                 max_span=max_span)
  elif objective == 'smask':
    if sentence_end is None or np.shape(sentence_end) != (length,):
      raise DataError("objective='smask' needs sentence_end of shape "
                      f'({length},), got {np.shape(sentence_end)}.')
    starts, lengths = sentence_spans(rng, sentence_end, mask_ratio=mask_ratio)
  else:
    starts, lengths = gmask_span(rng, length, gmask_min_ratio=gmask_min_ratio)
  return _layout(source, starts, lengths, _mask_id(objective, special),
                 special, rng, objective,
                 continue_positions=(objective == 'gmask'
                                     and gmask_positions == 'continue'))


def _layout(source, starts, lengths, mask_id, special, rng, objective, *,
            continue_positions=False) -> objectives.Example:
  """A ++ B from spans (starts, lengths) sorted by start, non-overlapping."""
  length, k, masked = source.size, starts.size, int(lengths.sum())
  # Part A: drop every span token but the first, which becomes the mask.
  edges = (np.bincount(starts, minlength=length + 1)
           - np.bincount(starts + lengths, minlength=length + 1))
  in_span = np.cumsum(edges[:-1]).astype(bool)            # [L]
  keep = ~in_span
  keep[starts] = True
  part_a = source.copy()
  part_a[starts] = mask_id
  part_a = part_a[keep]                                   # [L - M + k]
  mask_pos = starts - (np.cumsum(lengths) - lengths) + np.arange(k)  # [k]
  # Part B: spans in a random order; block j is [<sop>] + span / span + [<eop>].
  order = rng.permutation(k)
  b_len = lengths[order] + 1                              # [k]
  block = np.repeat(np.arange(k), b_len)                  # [M + k]
  t = np.arange(masked + k) - np.repeat(np.cumsum(b_len) - b_len, b_len)
  first = np.repeat(starts[order], b_len)
  b_in = np.where(t == 0, special.sop, source[first + np.maximum(t - 1, 0)])
  last = t == b_len[block] - 1
  b_tgt = np.where(last, special.eop,
                   source[np.minimum(first + t, length - 1)])
  n_a = part_a.size
  b_pos = np.repeat(mask_pos[order], b_len)               # [M + k]
  if continue_positions:                                  # one [gMASK] span
    b_pos = n_a + t
  return objectives.make_example(
      tokens=np.concatenate([part_a, b_in]),
      targets=np.concatenate([part_a, b_tgt]),
      loss_mask=np.concatenate([np.zeros(n_a), np.ones(masked + k)]),
      position_ids=np.concatenate([np.arange(n_a), b_pos]),
      block_position_ids=np.concatenate([np.zeros(n_a), t + 1]),
      prefix_len=n_a, objective=objective)


def reconstruct_source(example: objectives.Example,
                       special: objectives.SpecialIds) -> np.ndarray:
  """The source of a GLM example, rebuilt from Part A and Part B.

  Spans are located by the Part B position ids (not by searching Part A for
  mask ids), so this is exact even when the source itself holds mask ids.
  """
  n_a = example['prefix_len']
  part_a = example['tokens'][:n_a]
  b_tok = example['tokens'][n_a:]
  b_tgt = example['targets'][n_a:]
  heads = np.flatnonzero(example['block_position_ids'][n_a:] == 1)
  mask_ids = (special.mask, special.smask, special.gmask)
  spans = {}
  for j, head in enumerate(heads):
    end = heads[j + 1] if j + 1 < heads.size else b_tok.size
    pos = int(example['position_ids'][n_a + head])
    if pos >= n_a:  # gmask_positions='continue': the [gMASK] ends Part A
      pos = n_a - 1
    if (b_tok[head] != special.sop or b_tgt[end - 1] != special.eop
        or part_a[pos] not in mask_ids or pos in spans):
      raise DataError(f'Part B block {j} at {n_a + head} is malformed.')
    spans[pos] = b_tgt[head:end - 1]
  pieces, prev = [], 0
  for pos in sorted(spans):
    pieces += [part_a[prev:pos], spans[pos]]
    prev = pos + 1
  pieces.append(part_a[prev:])
  return np.concatenate(pieces).astype(np.int32)


def sample_glm_objective(rng: np.random.Generator,
                         mask_prob: float = 0.3) -> str:
  """GLM-130B's mix: 'mask' with probability `mask_prob`, else 'gmask'."""
  if not 0 <= mask_prob <= 1:
    raise DataError(f'{mask_prob=} must be in [0, 1].')
  return 'mask' if rng.random() < mask_prob else 'gmask'


def sample_glm_objective_mix(rng: np.random.Generator,
                             rates: Mapping[str, float]) -> str:
  """One of 'mask', 'smask', 'gmask' with probability proportional to rates.

  E.g. `rates={'mask': 0.3, 'smask': 0.2, 'gmask': 0.5}`; missing names get 0.
  """
  unknown = set(rates) - set(GLM_OBJECTIVES)
  p = np.array([float(rates.get(o, 0.0)) for o in GLM_OBJECTIVES])
  if unknown or (p < 0).any() or p.sum() <= 0:
    raise DataError(f'{rates=} must map some of {GLM_OBJECTIVES} to '
                    'non-negative rates with a positive sum.')
  return GLM_OBJECTIVES[int(rng.choice(len(p), p=p / p.sum()))]


def max_glm_length(length: int, objective: str,
                   mask_ratio: float = 0.15) -> int:
  """The longest example a source of `length` tokens can give.

  L + 2 * (most spans): one for [gMASK]; M for [MASK] and [sMASK] (every span
  has >= 1 token and spans stop once M tokens are masked).
  """
  if objective not in GLM_OBJECTIVES:
    raise DataError(f'{objective=} is not one of {GLM_OBJECTIVES}.')
  if length < MIN_LENGTH:
    raise DataError(f'glm {objective}: L={length} is below the minimum '
                    f'{MIN_LENGTH}.')
  if objective == 'gmask':
    return length + 2
  return length + 2 * num_masked_tokens(length, mask_ratio)


def max_glm_window(seq_len: int, objectives_used: Sequence[str] = ('mask',
                                                                  'gmask'),
                   mask_ratio: float = 0.15) -> int:
  """The longest source window whose examples always fit in `seq_len`."""
  def fits(length):
    return all(max_glm_length(length, o, mask_ratio) <= seq_len
               for o in objectives_used)
  if seq_len < MIN_LENGTH or not fits(MIN_LENGTH):
    raise DataError(f'{seq_len=} cannot hold any GLM example of '
                    f'{objectives_used}.')
  low, high = MIN_LENGTH, seq_len                # fits(low) holds
  while low < high:
    mid = (low + high + 1) // 2
    low, high = (mid, high) if fits(mid) else (low, mid - 1)
  return low
