"""Tests of the objective example builders: causal, GLM blank infilling, UL2.

Statistical checks use fixed seeds and tolerances of Z standard errors (Z = 5,
a two-sided false-alarm rate near 6e-7 per check), with the standard error
taken from the known distribution where there is one and from the sample
otherwise; nothing is tuned to the seed.
"""

import itertools
import math

import numpy as np
import pytest

from glm.data import glm_objective
from glm.data import objectives
from glm.data import tokenizer
from glm.data import ul2_objective

Z = 5.0
L = 512


def _special_mapping() -> dict[str, int]:
  """Names -> ids laid out as the trained tokenizer lays them out."""
  names = ['<pad>', '</s>', '<unk>'] + tokenizer.user_defined_symbols()
  return {name: i for i, name in enumerate(names)}


SPECIAL = objectives.SpecialIds.from_mapping(_special_mapping())
FIRST_PLAIN_ID = 3 + len(tokenizer.user_defined_symbols())


def _source(rng, length, unique=True) -> np.ndarray:
  """Plain (non-special) token ids; distinct when `unique`."""
  if unique:
    return (FIRST_PLAIN_ID + rng.permutation(length)).astype(np.int32)
  return rng.integers(FIRST_PLAIN_ID, FIRST_PLAIN_ID + 50, length,
                      dtype=np.int32)


def _glm_spans(example):
  """(starts, lengths) in source coordinates sorted by start, and B order.

  b_rank[j] is the index (by start) of the span in Part B block j.
  """
  n_a = example['prefix_len']
  n_b = example['tokens'].size - n_a
  heads = np.flatnonzero(example['block_position_ids'][n_a:] == 1)
  b_len = np.diff(np.append(heads, n_b)) - 1
  b_pos = example['position_ids'][n_a + heads]
  by_start = np.argsort(b_pos)
  lengths = b_len[by_start]
  starts = b_pos[by_start] - np.arange(heads.size) + np.cumsum(lengths) - lengths
  return starts, lengths, np.argsort(by_start)


def _reference_layout(source, starts, lengths, b_rank, mask_id):
  """GLM's layout written token by token from DESIGN section 4."""
  part_a, mask_index, i = [], [], 0
  span_at = dict(zip(starts.tolist(), lengths.tolist()))
  while i < len(source):
    if i in span_at:
      mask_index.append(len(part_a))
      part_a.append(mask_id)
      i += span_at[i]
    else:
      part_a.append(int(source[i]))
      i += 1
  tokens, targets = list(part_a), list(part_a)
  pos, block = list(range(len(part_a))), [0] * len(part_a)
  for j in b_rank:
    span = [int(x) for x in source[starts[j]:starts[j] + lengths[j]]]
    tokens += [SPECIAL.sop] + span
    targets += span + [SPECIAL.eop]
    pos += [mask_index[j]] * (len(span) + 1)
    block += list(range(1, len(span) + 2))
  loss = [0] * len(part_a) + [1] * (len(tokens) - len(part_a))
  return dict(tokens=tokens, targets=targets, loss_mask=loss,
              position_ids=pos, block_position_ids=block), len(part_a)


# ---------------------------------------------------------------------------
# Shared parts and causal LM.
# ---------------------------------------------------------------------------


def test_special_ids_from_tokenizer():
  class FakeTokenizer:
    special_ids = _special_mapping()
  special = objectives.SpecialIds.from_tokenizer(FakeTokenizer())
  assert special == SPECIAL
  assert (special.pad, special.eos, special.mask, special.s2s) == (0, 1, 3, 10)
  assert special.sentinels[:2] == (11, 12) and len(special.sentinels) == 100
  broken = dict(_special_mapping())
  del broken['[gMASK]']
  with pytest.raises(ValueError, match='gMASK'):
    objectives.SpecialIds.from_mapping(broken)


def test_causal_example():
  ex = objectives.causal_example(np.array([5, 6, 7, 8]))
  np.testing.assert_array_equal(ex['tokens'], [5, 6, 7])
  np.testing.assert_array_equal(ex['targets'], [6, 7, 8])
  np.testing.assert_array_equal(ex['loss_mask'], [1, 1, 1])
  np.testing.assert_array_equal(ex['position_ids'], [0, 1, 2])
  np.testing.assert_array_equal(ex['block_position_ids'], [0, 0, 0])
  assert (ex['prefix_len'], ex['objective'], ex['denoiser']) == (0, 'causal',
                                                                 None)
  assert all(ex[k].dtype == np.int32 for k in objectives.ARRAY_FIELDS)


def test_prefix_lm_mask():
  mask = objectives.prefix_lm_mask(4, 2)
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 0, 0],
                                       [1, 1, 1, 0], [1, 1, 1, 1]])


# ---------------------------------------------------------------------------
# GLM blank infilling.
# ---------------------------------------------------------------------------


def test_mask_ratio_exact_and_spans_never_adjacent():
  rng = np.random.default_rng(0)
  for length in list(range(2, 60)) + [100, 333, 512, 1000]:
    for _ in range(20):
      ex = glm_objective.glm_example(_source(rng, length), SPECIAL, rng,
                                     objective='mask')
      starts, lengths, _ = _glm_spans(ex)
      assert lengths.sum() == max(1, round(0.15 * length))
      bound = max(0.5 / length, 1 / length - 0.15)  # rounding, or M >= 1
      assert abs(lengths.sum() / length - 0.15) <= bound + 1e-12
      assert ((lengths >= 1) & (lengths <= 39)).all()
      assert (starts[1:] > starts[:-1] + lengths[:-1]).all()  # a gap between
      assert starts[-1] + lengths[-1] <= length


def _renewal_expected_count(pmf: np.ndarray, target: int) -> float:
  """E[N], N = draws until the sum reaches `target` (N = 1 + sum_s u(s))."""
  u = np.zeros(target)
  u[0] = 1.0  # u(s) = P(some partial sum equals s); S_0 = 0.
  for s in range(1, target):
    x = np.arange(1, min(s, pmf.size - 1) + 1)
    u[s] = np.dot(pmf[x], u[s - x])
  return float(u.sum())


def test_mask_span_lengths_match_truncated_poisson():
  """Mean span length, with the last span's cut accounted for.

  The span that crosses M = round(0.15 L) is cut, and it is also size-biased
  (long draws cross more often), so "mean of all spans" (~M / E[N]) and
  "mean excluding the last span" both differ from E[X | 1..39]. We test each
  part against exact theory instead: (1) draws that can never be the last one
  (draw j with (j + 1) * 39 < M) are plain truncated-Poisson draws, so their
  mean is E[X | 1..39] and their histogram the pmf; (2) the number of spans
  per document is the renewal count N, whose mean we compute exactly from
  the pmf, which pins down the realized mean span length M / N.
  """
  pmf = glm_objective.truncated_poisson_pmf(3.0, 39)
  x = np.arange(pmf.size)
  mean = float(np.dot(pmf, x))
  var = float(np.dot(pmf, x**2)) - mean**2
  assert abs(mean - 3 / (1 - math.exp(-3))) < 1e-9

  rng = np.random.default_rng(1)
  num_masked = 307                                    # 0.15 * 2048
  clean = num_masked // 39 - (num_masked % 39 == 0)   # (j + 1) * 39 < M
  draws = []
  for _ in range(3000):
    lengths = glm_objective.sample_span_lengths(rng, num_masked)
    assert lengths.sum() == num_masked and lengths.min() >= 1
    assert lengths.max() <= 39
    draws.append(lengths[:clean])
  draws = np.concatenate(draws)
  assert abs(draws.mean() - mean) < Z * math.sqrt(var / draws.size)
  for k in range(1, 10):
    p, freq = pmf[k], np.mean(draws == k)
    assert abs(freq - p) < Z * math.sqrt(p * (1 - p) / draws.size), k

  counts = []
  for _ in range(3000):
    ex = glm_objective.glm_example(_source(rng, L), SPECIAL, rng,
                                   objective='mask')
    counts.append(_glm_spans(ex)[1].size)
  counts = np.array(counts)
  target = round(0.15 * L)
  expected = _renewal_expected_count(pmf, target)
  assert abs(counts.mean() - expected) < Z * counts.std() / math.sqrt(
      counts.size)
  # The realized mean span length, M / N, is above E[X]: the cut at M.
  assert target / expected < mean


def test_place_spans_uniform_over_layouts():
  lengths, length = np.array([2, 1]), 7
  layouts = [s for s in itertools.product(range(length), repeat=2)
             if s[0] + 2 < s[1] and s[1] + 1 <= length]
  assert len(layouts) == math.comb(length - 3 - 1 + 2, 2)
  rng = np.random.default_rng(2)
  n = 20000
  seen = {}
  for _ in range(n):
    key = tuple(glm_objective.place_spans(rng, lengths, length).tolist())
    seen[key] = seen.get(key, 0) + 1
  assert set(seen) == set(layouts)
  p = 1 / len(layouts)
  for count in seen.values():
    assert abs(count / n - p) < Z * math.sqrt(p * (1 - p) / n)


def test_gmask_suffix_length_range_and_uniform():
  rng = np.random.default_rng(3)
  length, n = 50, 8000
  low, high = math.ceil(0.2 * length), length - 1
  spans = []
  for _ in range(n):
    ex = glm_objective.glm_example(_source(rng, length), SPECIAL, rng,
                                   objective='gmask')
    starts, lengths, _ = _glm_spans(ex)
    assert starts.size == 1 and starts[0] + lengths[0] == length  # a suffix
    assert ex['tokens'][ex['prefix_len'] - 1] == SPECIAL.gmask
    spans.append(lengths[0])
  spans = np.array(spans)
  assert spans.min() == low and spans.max() == high
  p = 1 / (high - low + 1)
  for value in range(low, high + 1):
    freq = np.mean(spans == value)
    assert abs(freq - p) < Z * math.sqrt(p * (1 - p) / n), value
  for length in (2, 3, 4):
    ex = glm_objective.glm_example(np.arange(100, 100 + length), SPECIAL, rng,
                                   objective='gmask')
    assert 1 <= _glm_spans(ex)[1][0] <= length - 1


def _sentences(rng, length, mean=8):
  """sentence_end for random sentence lengths; (starts, lengths) of them."""
  ends = np.cumsum(rng.integers(1, 2 * mean, size=length)) - 1
  ends = ends[ends < length - 1]
  sentence_end = np.zeros(length, bool)
  sentence_end[ends] = True
  starts = np.concatenate([[0], ends + 1])
  return sentence_end, starts, np.diff(np.append(starts, length))


def test_smask_takes_whole_sentences_until_ratio():
  rng = np.random.default_rng(4)
  for _ in range(500):
    length = int(rng.integers(20, 400))
    sentence_end, s_starts, s_lengths = _sentences(rng, length)
    ex = glm_objective.glm_example(_source(rng, length), SPECIAL, rng,
                                   objective='smask',
                                   sentence_end=sentence_end)
    starts, lengths, _ = _glm_spans(ex)
    sentences = set(zip(s_starts.tolist(), s_lengths.tolist()))
    assert set(zip(starts.tolist(), lengths.tolist())) <= sentences
    target = round(0.15 * length)
    total = lengths.sum()
    assert total < length                       # Part A keeps a token
    # Taken in some order until >= target: without the last one taken (at
    # most the longest chosen) the total was below the target.
    assert total - lengths.max() < target
    if total < target:        # only when one more would mask everything
      assert starts.size == s_starts.size - 1
    part_a = ex['tokens'][:ex['prefix_len']]
    assert np.sum(part_a == SPECIAL.smask) == starts.size >= 1


def test_smask_sentences_chosen_without_position_bias():
  rng = np.random.default_rng(5)
  sentence_end = np.zeros(200, bool)
  sentence_end[9::10] = True                    # 20 sentences of 10 tokens
  n, hits = 4000, np.zeros(20)
  for _ in range(n):
    ex = glm_objective.glm_example(_source(rng, 200), SPECIAL, rng,
                                   objective='smask',
                                   sentence_end=sentence_end)
    starts, lengths, _ = _glm_spans(ex)
    assert (lengths == 10).all() and starts.size == 3  # 30 = 15% of 200
    hits[starts // 10] += 1
  p = 3 / 20
  assert (np.abs(hits / n - p) < Z * math.sqrt(p * (1 - p) / n)).all()


@pytest.mark.parametrize('objective', glm_objective.GLM_OBJECTIVES)
def test_glm_layout_matches_definition_and_reconstructs(objective):
  rng = np.random.default_rng(6)
  for trial in range(300):
    length = int(rng.integers(2, 300))
    source = _source(rng, length, unique=trial % 2 == 0)
    if trial % 3 == 0:                          # the source may hold masks
      source[rng.integers(length)] = SPECIAL.mask
    sentence_end, _, _ = _sentences(rng, length)
    sentence_end[0] = True                      # >= 2 sentences
    ex = glm_objective.glm_example(source, SPECIAL, rng, objective=objective,
                                   sentence_end=sentence_end)
    np.testing.assert_array_equal(
        glm_objective.reconstruct_source(ex, SPECIAL), source)
    starts, lengths, b_rank = _glm_spans(ex)
    mask_id = {'mask': SPECIAL.mask, 'smask': SPECIAL.smask,
               'gmask': SPECIAL.gmask}[objective]
    expected, n_a = _reference_layout(source, starts, lengths, b_rank, mask_id)
    assert ex['prefix_len'] == n_a
    for field, want in expected.items():
      np.testing.assert_array_equal(ex[field], want, err_msg=field)
    assert ex['tokens'].size == length + 2 * starts.size
    assert ex['tokens'].size <= glm_objective.max_glm_length(length, objective)
    assert ex['objective'] == objective and ex['denoiser'] is None


def test_glm_part_b_order_is_shuffled():
  rng = np.random.default_rng(7)
  firsts = []
  for _ in range(2000):
    ex = glm_objective.glm_example(_source(rng, 100), SPECIAL, rng,
                                   objective='mask')
    _, lengths, b_rank = _glm_spans(ex)
    if lengths.size == 4:
      firsts.append(b_rank[0])
  firsts = np.array(firsts)
  for j in range(4):                            # the first block is uniform
    p = np.mean(firsts == j)
    assert abs(p - 0.25) < Z * math.sqrt(0.25 * 0.75 / firsts.size)


def test_glm_objective_mix_frequencies():
  rng = np.random.default_rng(8)
  n = 20000
  draws = [glm_objective.sample_glm_objective(rng) for _ in range(n)]
  assert set(draws) == {'mask', 'gmask'}
  assert abs(draws.count('mask') / n - 0.3) < Z * math.sqrt(0.21 / n)
  rates = {'mask': 0.2, 'smask': 0.3, 'gmask': 0.5}
  draws = [glm_objective.sample_glm_objective_mix(rng, rates)
           for _ in range(n)]
  for name, p in rates.items():
    assert abs(draws.count(name) / n - p) < Z * math.sqrt(p * (1 - p) / n)
  with pytest.raises(ValueError, match='rates'):
    glm_objective.sample_glm_objective_mix(rng, {'span': 1.0})


def test_max_glm_window_fits():
  for seq_len in (16, 512, 2048):
    length = glm_objective.max_glm_window(seq_len)
    assert glm_objective.max_glm_length(length, 'mask') <= seq_len
    assert glm_objective.max_glm_length(length + 1, 'mask') > seq_len
  assert glm_objective.max_glm_length(100, 'gmask') == 102
  assert glm_objective.max_glm_length(100, 'mask') == 130


def test_sentence_end_table():
  pieces = ['\u2581Hello', '.', 'world.\u2581', '<0x0A>', '\u2581', '\u3002',
            '\u2026', 'a:', '<0x2E>', 'x?!', '\u2581\u2581']
  table = glm_objective.sentence_end_table(pieces)
  np.testing.assert_array_equal(
      table, [0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 0])


# ---------------------------------------------------------------------------
# UL2.
# ---------------------------------------------------------------------------


def _runs(mask):
  """Lengths of the True runs and of the False runs of a bool array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[~mask[0]], mask])) != 0)
  runs = np.diff(np.append(edges, mask.size))
  return runs[mask[edges]], runs[~mask[edges]]


def test_random_spans_noise_mask_properties():
  rng = np.random.default_rng(9)
  for length in list(range(2, 40)) + [100, 512, 2047]:
    for r, mu in ((0.15, 3), (0.5, 3), (0.15, 64), (0.5, 8), (0.9, 1)):
      mask = ul2_objective.random_spans_noise_mask(length, r, mu, rng)
      num_noise = min(max(round(length * r), 1), length - 1)
      num_spans = min(max(round(num_noise / mu), 1), length - num_noise)
      assert mask.shape == (length,) and mask.dtype == bool
      assert mask.sum() == num_noise
      noise_runs, clean_runs = _runs(mask)
      assert noise_runs.size == clean_runs.size == num_spans
      assert not mask[0] and mask[-1]             # starts with non-noise


def test_random_spans_composition_is_uniform():
  """Marginal of one part of a uniform composition of n into k parts.

  P(part = x) = C(n - x - 1, k - 2) / C(n - 1, k - 1); the mean is n / k.
  """
  rng = np.random.default_rng(10)
  n_tok, k, trials = 77, 26, 4000               # L = 512, r 0.15, mu 3
  firsts, lasts = [], []
  for _ in range(trials):
    mask = ul2_objective.random_spans_noise_mask(512, 0.15, 3, rng)
    noise_runs, _ = _runs(mask)
    firsts.append(noise_runs[0])
    lasts.append(noise_runs[-1])
  x = np.arange(1, n_tok - k + 2)
  pmf = np.array([math.comb(n_tok - v - 1, k - 2) for v in x]) / math.comb(
      n_tok - 1, k - 1)
  assert abs(pmf.sum() - 1) < 1e-12
  sd = math.sqrt(np.dot(pmf, x**2) - np.dot(pmf, x)**2)
  for runs in (np.array(firsts), np.array(lasts)):
    assert abs(runs.mean() - n_tok / k) < Z * sd / math.sqrt(trials)
    assert abs(np.mean(runs == 1) - pmf[0]) < Z * math.sqrt(
        pmf[0] * (1 - pmf[0]) / trials)


@pytest.mark.parametrize('denoiser', ul2_objective.DENOISERS[:6],
                         ids=lambda d: d.name)
def test_ul2_span_denoisers(denoiser):
  rng = np.random.default_rng(11)
  paradigm = {'r': SPECIAL.nlu, 'x': SPECIAL.nlg}[denoiser.kind]
  sentinels = np.array(SPECIAL.sentinels)
  for trial in range(200):
    length = L if trial < 100 else int(rng.integers(2, 400))
    source = _source(rng, length, unique=trial % 2 == 0)
    ex = ul2_objective.ul2_example(source, SPECIAL, rng, denoiser=denoiser)
    np.testing.assert_array_equal(
        ul2_objective.reconstruct_source(ex, SPECIAL), source)
    p = ex['prefix_len']
    seq = np.concatenate([ex['tokens'], ex['targets'][-1:]])
    inputs, targets = seq[:p], seq[p:]
    assert inputs[0] == paradigm and targets[-1] == SPECIAL.eos
    in_sent = inputs[np.isin(inputs, sentinels)]
    tgt_sent = targets[np.isin(targets, sentinels)]
    k = in_sent.size
    np.testing.assert_array_equal(in_sent, sentinels[:k])   # in order
    np.testing.assert_array_equal(tgt_sent, sentinels[:k])
    assert targets[0] == sentinels[0]
    num_noise = targets.size - k - 1
    assert abs(num_noise / length - denoiser.noise_density) <= max(
        0.5 / length, 1 / length)
    _, expected_spans = ul2_objective.noise_span_counts(
        length, denoiser.noise_density, denoiser.mean_span)
    assert k == expected_spans
    if length == L:  # rounding bounds: |noise / mu - k| <= 1/2
      assert abs(num_noise / L - denoiser.noise_density) <= 0.5 / L
      assert abs(num_noise / k - denoiser.mean_span) <= (
          0.5 * denoiser.mean_span / k)
    n = ex['tokens'].size
    assert n == ul2_objective.ul2_length(length, denoiser) == length + 2 * k + 1
    np.testing.assert_array_equal(ex['tokens'][1:], ex['targets'][:-1])
    np.testing.assert_array_equal(ex['loss_mask'], np.arange(n) >= p - 1)
    assert ex['loss_mask'].sum() == targets.size
    np.testing.assert_array_equal(ex['position_ids'], np.arange(n))
    assert not ex['block_position_ids'].any()
    assert ex['objective'] == f'ul2_{denoiser.kind}'
    assert ex['denoiser'] == {'mean_span': denoiser.mean_span,
                              'noise_density': denoiser.noise_density}


def test_ul2_s_denoiser_prefix_uniform():
  rng = np.random.default_rng(12)
  s = ul2_objective.DENOISERS_BY_NAME['s_prefix_lm']
  length, n = 20, 9500
  prefixes = []
  for _ in range(n):
    source = _source(rng, length)
    ex = ul2_objective.ul2_example(source, SPECIAL, rng, denoiser=s)
    assert ex['tokens'][0] == SPECIAL.s2s and ex['targets'][-1] == SPECIAL.eos
    np.testing.assert_array_equal(
        ul2_objective.reconstruct_source(ex, SPECIAL), source)
    assert ex['tokens'].size == length + 1
    np.testing.assert_array_equal(
        ex['loss_mask'], np.arange(length + 1) >= ex['prefix_len'] - 1)
    assert ex['denoiser'] == {'mean_span': None, 'noise_density': None}
    prefixes.append(ex['prefix_len'] - 1)
  prefixes = np.array(prefixes)
  assert prefixes.min() == 1 and prefixes.max() == length - 1
  p = 1 / (length - 1)
  for value in range(1, length):
    assert abs(np.mean(prefixes == value) - p) < Z * math.sqrt(p * (1 - p) / n)


def test_sample_denoiser_rates():
  rng = np.random.default_rng(13)
  n = 14000
  names = [ul2_objective.sample_denoiser(rng).name for _ in range(n)]
  p = 1 / 7
  for d in ul2_objective.DENOISERS:
    assert abs(names.count(d.name) / n - p) < Z * math.sqrt(p * (1 - p) / n)
  rates = {'s_prefix_lm': 3.0, 'x_mu64_r0.5': 1.0}
  names = [ul2_objective.sample_denoiser(rng, rates).name for _ in range(n)]
  assert set(names) == set(rates)
  assert abs(names.count('s_prefix_lm') / n - 0.75) < Z * math.sqrt(
      0.75 * 0.25 / n)
  with pytest.raises(ValueError, match='unknown denoisers'):
    ul2_objective.sample_denoiser(rng, {'r3': 1.0})
  with pytest.raises(ValueError, match='one rate per'):
    ul2_objective.sample_denoiser(rng, [1.0, 2.0])


def test_ul2_windows_fit():
  assert len(ul2_objective.DENOISERS) == 7
  for seq_len in (64, 512, 2048):
    length = ul2_objective.max_ul2_window(seq_len)
    assert ul2_objective.max_ul2_length(length) <= seq_len
    ul2_objective.ul2_example(np.arange(100, 100 + length), SPECIAL,
                              np.random.default_rng(0), denoiser='x_mu3_r0.5')
  with pytest.raises(ValueError, match='sentinels'):
    ul2_objective.ul2_example(np.arange(100, 1100), SPECIAL,
                              np.random.default_rng(0), denoiser='x_mu3_r0.5')


# ---------------------------------------------------------------------------
# Edge cases: tiny and empty sources.
# ---------------------------------------------------------------------------


def _all_builders():
  rng = np.random.default_rng(14)
  for objective in ('mask', 'gmask', 'smask'):
    yield objective, lambda s, o=objective: glm_objective.glm_example(
        s, SPECIAL, rng, objective=o, sentence_end=np.ones(np.size(s), bool))
  for d in ul2_objective.DENOISERS:
    yield d.name, lambda s, d=d: ul2_objective.ul2_example(
        s, SPECIAL, rng, denoiser=d)
  yield 'causal', objectives.causal_example


@pytest.mark.parametrize('name, build', list(_all_builders()),
                         ids=lambda v: v if isinstance(v, str) else '')
def test_short_and_empty_sources(name, build):
  with pytest.raises(ValueError, match='empty'):
    build(np.array([], np.int32))
  with pytest.raises(ValueError, match=r'L=1 .*at least 2'):
    build(np.array([500], np.int32))
  with pytest.raises(ValueError, match='1D'):
    build(np.zeros((2, 3), np.int32))
  for length in (2, 3):
    source = np.arange(500, 500 + length, dtype=np.int32)
    for _ in range(20):
      ex = build(source)
      if name == 'causal':
        continue
      reconstruct = (glm_objective.reconstruct_source
                     if name in glm_objective.GLM_OBJECTIVES
                     else ul2_objective.reconstruct_source)
      np.testing.assert_array_equal(reconstruct(ex, SPECIAL), source)
      assert ex['loss_mask'].sum() >= 2


def test_smask_needs_two_sentences():
  with pytest.raises(ValueError, match='at least 2 sentences'):
    glm_objective.glm_example(np.arange(500, 520), SPECIAL,
                              np.random.default_rng(0), objective='smask',
                              sentence_end=np.zeros(20, bool))
  with pytest.raises(ValueError, match='sentence_end of shape'):
    glm_objective.glm_example(np.arange(500, 520), SPECIAL,
                              np.random.default_rng(0), objective='smask')


def test_gmask_continue_positions_follow_part_a():
  """GLM-130B's 1D layout: a [gMASK] span's Part B at |A|, |A| + 1, ...;
  [MASK] examples are unchanged and both rebuild their source."""
  for objective in ('gmask', 'mask'):
    rng = np.random.default_rng(7)
    source = _source(rng, 40)
    ex = glm_objective.glm_example(source, SPECIAL, np.random.default_rng(1),
                                   objective=objective,
                                   gmask_positions='continue')
    base = glm_objective.glm_example(source, SPECIAL,
                                     np.random.default_rng(1),
                                     objective=objective)
    n_a = ex['prefix_len']
    np.testing.assert_array_equal(ex['tokens'], base['tokens'])
    np.testing.assert_array_equal(glm_objective.reconstruct_source(
        ex, SPECIAL), source)
    if objective == 'gmask':
      n_b = ex['tokens'].size - n_a
      np.testing.assert_array_equal(ex['position_ids'][n_a:],
                                    n_a + np.arange(n_b))
      assert base['position_ids'][n_a] == n_a - 1       # the mask's index
    else:
      np.testing.assert_array_equal(ex['position_ids'], base['position_ids'])
  with pytest.raises(Exception, match='gmask_positions'):
    glm_objective.glm_example(source, SPECIAL, rng, objective='gmask',
                              gmask_positions='arange')
