"""UL2's mixture of denoisers as decoder-only (prefix-LM) examples.

A denoiser turns a source window into (inputs, targets):
  R / X  T5 span corruption (`random_spans_noise_mask`): each noise span is
         replaced in the inputs by one sentinel, <extra_id_0>, <extra_id_1>,
         ... in order; the targets list sentinel k + span k for every span,
         then eos.
  S      prefix LM: inputs = source[:p], targets = source[p:] + eos, with p
         uniform in [1, L - 1].
The paradigm token ([NLU] for R, [NLG] for X, [S2S] for S) is prepended to the
inputs. The example is seq = inputs ++ targets shifted by one: tokens =
seq[:-1], targets = seq[1:], prefix_len = len(inputs) (the inputs attend
bidirectionally), and the loss counts exactly where the target is a
target-side token, i.e. at positions i >= len(inputs) - 1.

Worked example, source [a b c d e f], noise spans (b c) and (f), R denoiser;
N is [NLU], X0 / X1 the sentinels, E eos:
  inputs  N a X0 d e X1          targets  X0 b c X1 f E
  tokens     N  a  X0 d  e  X1 X0 b  c  X1 f
  targets    a  X0 d  e  X1 X0 b  c  X1 f  E
  loss_mask  0  0  0  0  0  1  1  1  1  1  1
  position_ids 0..10, block_position_ids 0, prefix_len 6.
Its length is L + 2 * (number of spans) + 1 (S: L + 1); see `ul2_length`.

The seven denoisers (DESIGN section 4) are `DENOISERS`; `sample_denoiser`
draws one per example (uniformly by default).

Usage:
  special = objectives.SpecialIds.from_tokenizer(tok)
  example = ul2_example(window, special, rng,
                        denoiser=sample_denoiser(rng))
"""

from collections.abc import Mapping, Sequence
import dataclasses

import numpy as np

from glm.data.errors import DataError
from glm.data import objectives


MIN_LENGTH = 2
_PARADIGM_FIELDS = {'[NLU]': 'nlu', '[NLG]': 'nlg', '[S2S]': 's2s'}


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser.

  Attributes:
    name: a short unique name, e.g. 'x_mu64_r0.5'.
    kind: 'r' (regular span corruption), 'x' (extreme) or 's' (prefix LM).
    mean_span: mu, the mean noise span length; None for 's'.
    noise_density: r, the fraction of noise tokens; None for 's' (its target
      length is uniform, not a fixed fraction).
    paradigm: the paradigm token's piece name, '[NLU]', '[NLG]' or '[S2S]'.
  """
  name: str
  kind: str
  mean_span: float | None
  noise_density: float | None
  paradigm: str

  def paradigm_id(self, special: objectives.SpecialIds) -> int:
    return getattr(special, _PARADIGM_FIELDS[self.paradigm])

  @property
  def objective(self) -> str:
    return f'ul2_{self.kind}'

  def metadata(self) -> dict[str, float | None]:
    """The example's `denoiser` field."""
    return {'mean_span': self.mean_span, 'noise_density': self.noise_density}


def _span_denoiser(kind: str, mean_span: float,
                   noise_density: float) -> Denoiser:
  return Denoiser(f'{kind}_mu{mean_span:g}_r{noise_density:g}', kind,
                  float(mean_span), float(noise_density),
                  '[NLU]' if kind == 'r' else '[NLG]')


DENOISERS = (
    _span_denoiser('r', 3, 0.15),
    _span_denoiser('r', 8, 0.15),
    _span_denoiser('x', 3, 0.5),
    _span_denoiser('x', 8, 0.5),
    _span_denoiser('x', 64, 0.15),
    _span_denoiser('x', 64, 0.5),
    Denoiser('s_prefix_lm', 's', None, None, '[S2S]'),
)
DENOISERS_BY_NAME = {d.name: d for d in DENOISERS}


def sample_denoiser(rng: np.random.Generator,
                    rates: Sequence[float] | Mapping[str, float] | None = None,
                    ) -> Denoiser:
  """One of `DENOISERS`, with probability proportional to `rates`.

  Args:
    rng: the randomness.
    rates: None (uniform, 1/7 each), 7 rates aligned with `DENOISERS`, or a
      name -> rate mapping (missing names get 0).
  """
  if rates is None:
    p = np.ones(len(DENOISERS))
  elif isinstance(rates, Mapping):
    unknown = set(rates) - set(DENOISERS_BY_NAME)
    if unknown:
      raise DataError(f'unknown denoisers {sorted(unknown)}; the names are '
                      f'{list(DENOISERS_BY_NAME)}.')
    p = np.array([float(rates.get(d.name, 0.0)) for d in DENOISERS])
  else:
    p = np.asarray(rates, dtype=np.float64)
    if p.shape != (len(DENOISERS),):
      raise DataError(f'rates has shape {p.shape}; give one rate per '
                      f'denoiser ({len(DENOISERS)}) or a name -> rate map.')
  if (p < 0).any() or p.sum() <= 0:
    raise DataError(f'{rates=} must be non-negative with a positive sum.')
  return DENOISERS[int(rng.choice(len(p), p=p / p.sum()))]


def noise_span_counts(length: int, noise_density: float,
                      mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of T5's span corruption of `length` tokens.

  noise = round(L * r) clipped to [1, L - 1]; spans = max(round(noise / mu),
  1), clipped to the non-noise count so every part can be non-empty.
  """
  if length < MIN_LENGTH:
    raise DataError(f'span corruption: L={length} is below the minimum '
                    f'{MIN_LENGTH}.')
  if not 0 < noise_density < 1 or mean_span <= 0:
    raise DataError(f'{noise_density=} must be in (0, 1) and {mean_span=} '
                    '> 0.')
  num_noise = int(min(max(np.round(length * noise_density), 1), length - 1))
  num_spans = max(int(np.round(num_noise / mean_span)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_composition(rng, total: int, parts: int) -> np.ndarray:
  """[parts] positive ints summing to `total`, uniform over compositions."""
  cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(length: int, noise_density: float,
                            mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
  """[L] bool noise mask as in T5: spans alternate, non-noise first.

  The noise and non-noise counts (`noise_span_counts`) are each split into
  `num_spans` positive parts by a uniformly random composition (distinct cut
  points chosen uniformly), and the parts are interleaved non-noise, noise,
  non-noise, ...; so the mask starts with non-noise and ends with noise.
  """
  num_noise, num_spans = noise_span_counts(length, noise_density, mean_span)
  noise = _random_composition(rng, num_noise, num_spans)
  nonnoise = _random_composition(rng, length - num_noise, num_spans)
  interleaved = np.stack([nonnoise, noise], axis=1).reshape(-1)  # [2 * S]
  return np.repeat(np.tile([False, True], num_spans), interleaved)


def _resolve(denoiser: Denoiser | str) -> Denoiser:
  if isinstance(denoiser, str):
    if denoiser not in DENOISERS_BY_NAME:
      raise DataError(f'unknown denoiser {denoiser!r}; the names are '
                      f'{list(DENOISERS_BY_NAME)}.')
    return DENOISERS_BY_NAME[denoiser]
  return denoiser


def ul2_example(source, special: objectives.SpecialIds,
                rng: np.random.Generator, *,
                denoiser: Denoiser | str) -> objectives.Example:
  """One UL2 example from a source window (see the module doc).

  Args:
    source: [L] int token ids, L >= 2.
    special: the special token ids.
    rng: the randomness.
    denoiser: a `Denoiser` (e.g. from `sample_denoiser`) or its name.

  Returns:
    The example, of length `ul2_length(L, denoiser)`.
  """
  denoiser = _resolve(denoiser)
  source = objectives.check_source(source, min_length=MIN_LENGTH,
                                   objective=f'ul2 {denoiser.name}')
  paradigm = np.array([denoiser.paradigm_id(special)], np.int32)
  eos = np.array([special.eos], np.int32)
  if denoiser.kind == 's':
    p = int(rng.integers(1, source.size))         # uniform in [1, L - 1]
    inputs = np.concatenate([paradigm, source[:p]])
    targets = np.concatenate([source[p:], eos])
  else:
    _, num_spans = noise_span_counts(source.size, denoiser.noise_density,
                                     denoiser.mean_span)
    if num_spans > len(special.sentinels):
      raise DataError(
          f'{denoiser.name} on L={source.size} makes {num_spans} spans but '
          f'there are {len(special.sentinels)} sentinels; use a shorter '
          'window (see max_ul2_window).')
    mask = random_spans_noise_mask(source.size, denoiser.noise_density,
                                   denoiser.mean_span, rng)       # [L]
    span_start = mask & ~np.concatenate([[False], mask[:-1]])     # [L]
    sentinels = np.array(special.sentinels[:num_spans], np.int32)  # [S]
    corrupted = source.copy()
    corrupted[span_start] = sentinels
    inputs = np.concatenate([paradigm, corrupted[~mask | span_start]])
    offsets = np.cumsum(mask)[span_start] - 1     # span starts in source[mask]
    targets = np.concatenate([np.insert(source[mask], offsets, sentinels),
                              eos])
  seq = np.concatenate([inputs, targets])
  n = seq.size - 1
  return objectives.make_example(
      tokens=seq[:-1], targets=seq[1:],
      loss_mask=np.arange(n) >= inputs.size - 1,
      position_ids=np.arange(n), block_position_ids=np.zeros(n),
      prefix_len=inputs.size, objective=denoiser.objective,
      denoiser=denoiser.metadata())


def reconstruct_source(example: objectives.Example,
                       special: objectives.SpecialIds) -> np.ndarray:
  """The source of a UL2 example, from its inputs and target spans.

  Exact whenever the source holds no sentinel ids (a span-corrupted sequence
  that does is ambiguous to the model as well).
  """
  seq = np.concatenate([example['tokens'], example['targets'][-1:]])
  inputs, targets = seq[1:example['prefix_len']], seq[example['prefix_len']:]
  if targets[-1] != special.eos:
    raise DataError('the targets do not end in eos.')
  targets = targets[:-1]
  if example['objective'] == 'ul2_s':
    return np.concatenate([inputs, targets]).astype(np.int32)
  sentinels = np.asarray(special.sentinels)
  in_pos = np.flatnonzero(np.isin(inputs, sentinels))
  tgt_pos = np.flatnonzero(np.isin(targets, sentinels))
  k = in_pos.size
  if (tgt_pos.size != k or (k and tgt_pos[0] != 0)
      or not np.array_equal(inputs[in_pos], sentinels[:k])
      or not np.array_equal(targets[tgt_pos], sentinels[:k])):
    raise DataError('the sentinels of inputs and targets do not match '
                    '(<extra_id_0>, <extra_id_1>, ... in order).')
  bounds = np.append(tgt_pos, targets.size)
  pieces, prev = [], 0
  for j, pos in enumerate(in_pos):
    pieces += [inputs[prev:pos], targets[bounds[j] + 1:bounds[j + 1]]]
    prev = pos + 1
  pieces.append(inputs[prev:])
  return np.concatenate(pieces).astype(np.int32)


def ul2_length(length: int, denoiser: Denoiser | str) -> int:
  """The exact example length for a window of `length` tokens.

  R / X: 1 + (L - noise + S) inputs + (noise + S + 1) targets - 1 = L + 2S + 1
  with S = `noise_span_counts(...)[1]` (fixed by L); S: L + 1.
  """
  denoiser = _resolve(denoiser)
  if length < MIN_LENGTH:
    raise DataError(f'ul2 {denoiser.name}: L={length} is below the minimum '
                    f'{MIN_LENGTH}.')
  if denoiser.kind == 's':
    return length + 1
  _, num_spans = noise_span_counts(length, denoiser.noise_density,
                                   denoiser.mean_span)
  return length + 2 * num_spans + 1


def max_ul2_length(length: int,
                   denoisers: Sequence[Denoiser] = DENOISERS) -> int:
  """The longest example any of `denoisers` makes from `length` tokens."""
  return max(ul2_length(length, d) for d in denoisers)


def max_ul2_window(seq_len: int, denoisers: Sequence[Denoiser] = DENOISERS,
                   num_sentinels: int = objectives.MIN_SENTINELS) -> int:
  """The longest window whose examples fit `seq_len` and the sentinels."""
  def fits(length):
    return all(ul2_length(length, d) <= seq_len and (
        d.kind == 's' or noise_span_counts(
            length, d.noise_density, d.mean_span)[1] <= num_sentinels)
               for d in denoisers)
  if seq_len < MIN_LENGTH or not fits(MIN_LENGTH):
    raise DataError(f'{seq_len=} cannot hold any UL2 example.')
  low, high = MIN_LENGTH, seq_len                # fits(low); fits is monotone
  while low < high:
    mid = (low + high + 1) // 2
    low, high = (mid, high) if fits(mid) else (low, mid - 1)
  return low
