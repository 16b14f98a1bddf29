"""Exponent-smoothed language sampling of a training split (XGLM / BLOOM).

With n_l the bytes of language l (code counts as one more language), the
sampling distribution is

  p_l = n_l**alpha / sum_k n_k**alpha,

alpha = 1 keeps the natural mix, alpha = 0 makes languages uniform; XGLM,
XLM-R and mT5 use 0.3. The split keeps its total size N = sum_l n_l and every
language is resampled to target_l = p_l * N bytes:

  * downsampling (target_l < n_l): a seeded-order prefix of the language's
    documents, the prefix whose size is closest to the target;
  * upsampling (target_l > n_l): whole copies of every document, then a
    seeded-order prefix for the remainder. Copy k >= 2 of a document gets the
    id `<id>#k`.

Repetition is capped at `max_repeat` copies of a language: a language whose
target exceeds that is fixed at max_repeat * n_l and the budget it leaves is
shared over the other languages by the same rule (so the total stays ~N).
The realised byte share of every language is recorded next to p_l.

Usage:
  docs, stats = sampling.sample_by_language(train_docs, alpha=0.3, seed=0)
"""

from collections.abc import Sequence
import hashlib
import math

from glm.data.errors import DataError

DEFAULT_ALPHA = 0.3
DEFAULT_MAX_REPEAT = 4


def language_probabilities(sizes: dict[str, float],
                           alpha: float) -> dict[str, float]:
  """p_l proportional to sizes[l]**alpha, normalised (zero sizes get 0)."""
  if alpha < 0:
    raise DataError(f'{alpha=} must be >= 0 (1 keeps the natural mix).')
  weights = {lang: (n**alpha if n > 0 else 0.0) for lang, n in sizes.items()}
  total = sum(weights.values())
  if total == 0:
    raise DataError(f'no language has any data: {sizes=}.')
  return {lang: w / total for lang, w in sorted(weights.items())}


def target_sizes(sizes: dict[str, float], alpha: float,
                 max_repeat: float) -> dict[str, float]:
  """Per-language targets summing to sum(sizes), repetition capped.

  A language whose share p_l * budget exceeds max_repeat * n_l is fixed at
  that cap and removed; the rest share what is left in proportion to
  n**alpha, until no language is over its cap.
  """
  if max_repeat < 1:
    raise DataError(f'{max_repeat=} must be >= 1 (1 means downsample only).')
  remaining = {lang: n for lang, n in sizes.items() if n > 0}
  budget = float(sum(remaining.values()))
  targets = {lang: 0.0 for lang in sizes}
  while remaining:
    probs = language_probabilities(remaining, alpha)
    capped = sorted(lang for lang, n in remaining.items()
                    if probs[lang] * budget > max_repeat * n)
    if not capped:
      targets.update({lang: p * budget for lang, p in probs.items()})
      break
    for lang in capped:
      targets[lang] = float(max_repeat * remaining.pop(lang))
      budget -= targets[lang]
  return dict(sorted(targets.items()))


def _sample_key(seed: int, doc_id: str) -> str:
  return hashlib.sha256(f'{seed}/sample/{doc_id}'.encode()).hexdigest()


def _closest_prefix(sizes: Sequence[int], target: float) -> int:
  """Length of the prefix of `sizes` whose sum is closest to `target`."""
  best, best_error, total = 0, abs(target), 0
  for i, size in enumerate(sizes):
    total += size
    if abs(target - total) < best_error:
      best, best_error = i + 1, abs(target - total)
    if total > target:
      break
  return best


def sample_by_language(
    docs: Sequence[dict[str, str]], *, alpha: float = DEFAULT_ALPHA,
    max_repeat: int = DEFAULT_MAX_REPEAT, seed: int = 0,
) -> tuple[list[dict[str, str]], dict[str, object]]:
  """Resamples documents so each language's bytes follow p_l (module doc).

  Args:
    docs: documents with 'id', 'lang' and 'text'.
    alpha: the exponent; 1 returns every document once.
    max_repeat: the most copies of a language's text (>= 1).
    seed: fixes which documents a partial copy or a downsample takes.

  Returns:
    (documents, grouped by language in sorted order, copies after originals;
    stats) where stats has 'alpha', 'max_repeat' and 'langs': {lang: {'docs',
    'bytes', 'share', 'p', 'target_bytes', 'docs_after', 'bytes_after',
    'share_after', 'repeat'}}.
  """
  by_lang: dict[str, list[dict[str, str]]] = {}
  for doc in docs:
    by_lang.setdefault(doc['lang'], []).append(doc)
  sizes = {lang: sum(len(d['text'].encode()) for d in lang_docs)
           for lang, lang_docs in sorted(by_lang.items())}
  if not sizes:
    return [], {'alpha': alpha, 'max_repeat': max_repeat, 'langs': {}}
  probs = language_probabilities(sizes, alpha)
  targets = target_sizes(sizes, alpha, max_repeat)
  out, langs = [], {}
  for lang, lang_docs in sorted(by_lang.items()):
    ordered = sorted(lang_docs, key=lambda d: _sample_key(seed, d['id']))
    doc_bytes = [len(d['text'].encode()) for d in ordered]
    n, target = sizes[lang], targets[lang]
    copies = min(math.floor(target / n), max_repeat) if n else 0
    rest = _closest_prefix(doc_bytes, target - copies * n)
    sampled = []
    for copy in range(copies + 1):
      take = ordered if copy < copies else ordered[:rest]
      for doc in take:
        sampled.append(doc if copy == 0 else
                       {**doc, 'id': f"{doc['id']}#{copy + 1}"})
    out.extend(sampled)
    langs[lang] = {'docs': len(lang_docs), 'bytes': n, 'p': probs[lang],
                   'target_bytes': round(target),
                   'docs_after': len(sampled),
                   'bytes_after': copies * n + sum(doc_bytes[:rest])}
  total_before = sum(sizes.values())
  total_after = sum(v['bytes_after'] for v in langs.values())
  for stats in langs.values():
    stats['share'] = stats['bytes'] / total_before
    stats['share_after'] = stats['bytes_after'] / max(total_after, 1)
    stats['repeat'] = stats['bytes_after'] / stats['bytes']
  return out, {'alpha': alpha, 'max_repeat': max_repeat,
               'bytes_before': total_before, 'bytes_after': total_after,
               'langs': langs}
