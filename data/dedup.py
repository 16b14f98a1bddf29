"""BLOOM-style two-stage deduplication: exact, then MinHash-LSH near-duplicates.

Stage 1 (exact) drops a document whose *normalised* text (NFKC, case-folded,
whitespace collapsed) hashes like an earlier one's. Stage 2 (near) drops a
document whose shingle set has Jaccard similarity >= `threshold` with an
earlier *kept* document. Earlier means earlier in the input order, so the
caller decides which copy survives; the result is a pure function of the
input list and the arguments.

Shingles are hashed n-grams of the normalised text:
  * words (whitespace-split) for scripts that separate words with spaces;
  * characters for text that is mostly Han / Hiragana / Katakana (Chinese and
    Japanese do not put spaces between words, so word n-grams would be whole
    sentences).

MinHash: P seeded hash functions h_p(x) = (a_p * x + b_p) mod 2^64, keeping the
top 32 bits; a document's signature is the minimum of each over its shingles.
LSH splits the signature into B bands of R rows; two documents become a
candidate pair when any band matches exactly, and a candidate is a duplicate
only when the exact Jaccard of the two shingle sets reaches the threshold (so
LSH can only cost recall, never precision). B and R are chosen to minimise
0.2 * false positives + 0.8 * false negatives of the S-curve around the
threshold.

Usage:
  kept, stats = dedup.deduplicate(docs, threshold=0.8)
  stats['removed']['near']  # {'en': 3, 'de': 1, ...}
"""

from collections.abc import Sequence
import functools
import hashlib
import re
import unicodedata
import zlib

import numpy as np

from glm.data.errors import DataError

DEFAULT_THRESHOLD = 0.8
DEFAULT_NUM_PERM = 128
DEFAULT_NGRAM = 5
# A text is shingled by characters when at least this share of its
# non-space characters are Han, Hiragana or Katakana.
_CJK_CHAR_SHARE = 0.3
_CJK_RE = re.compile('[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]')
_SPACE_RE = re.compile(r'\s+')
# Shingles hashed per MinHash block, bounding the [P, block] temporary.
_BLOCK = 4096


def normalize(text: str) -> str:
  """NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
  text = unicodedata.normalize('NFKC', text).casefold()
  return _SPACE_RE.sub(' ', text).strip()


def is_cjk(text: str) -> bool:
  """Whether text is mostly Chinese / Japanese characters (no word spaces)."""
  letters = len(text) - text.count(' ')
  return letters > 0 and len(_CJK_RE.findall(text)) >= _CJK_CHAR_SHARE * letters


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A bijective 64-bit mixer (SplitMix64's finaliser), elementwise."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _window_hashes(units: np.ndarray, n: int) -> np.ndarray:
  """Hashes of every length-n window of `units` (uint64 [U] -> uint64 [W])."""
  if units.size == 0:
    return np.zeros([0], np.uint64)
  n = min(n, units.size)
  windows = np.lib.stride_tricks.sliding_window_view(units, n)  # [W, n]
  # A polynomial in the (mixed) unit hashes, mod 2^64 by uint64 wraparound.
  powers = _splitmix64(np.arange(1, n + 1, dtype=np.uint64))
  with np.errstate(over='ignore'):
    return _splitmix64((windows * powers).sum(axis=1, dtype=np.uint64))


def shingles(text: str, *, ngram: int = DEFAULT_NGRAM,
             unit: str = 'auto') -> np.ndarray:
  """Sorted unique 64-bit hashes of the text's word or character n-grams.

  Args:
    text: any text; it is normalised first.
    ngram: n of the n-grams (a text shorter than n gives one shingle).
    unit: 'word', 'char', or 'auto' ('char' when `is_cjk`).

  Returns:
    uint64 [S], empty for an empty text.
  """
  text = normalize(text)
  if unit == 'auto':
    unit = 'char' if is_cjk(text) else 'word'
  if unit == 'word':
    units = np.asarray([zlib.crc32(w.encode()) for w in text.split()],
                       dtype=np.uint64)
  elif unit == 'char':
    units = np.frombuffer(text.encode('utf-32-le'),
                          dtype=np.uint32).astype(np.uint64)
  else:
    raise DataError(f"{unit=} must be 'word', 'char' or 'auto'.")
  with np.errstate(over='ignore'):
    return np.unique(_window_hashes(_splitmix64(units), ngram))


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  a = rng.integers(1, 1 << 63, size=num_perm, dtype=np.uint64)
  b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
  return a | np.uint64(1), b  # Odd multipliers.


def minhash(shingle_hashes: np.ndarray, *, num_perm: int = DEFAULT_NUM_PERM,
            seed: int = 0) -> np.ndarray:
  """The MinHash signature (uint32 [num_perm]) of a set of shingle hashes."""
  a, b = _permutations(num_perm, seed)
  signature = np.full([num_perm], np.iinfo(np.uint32).max, np.uint64)
  with np.errstate(over='ignore'):
    for start in range(0, shingle_hashes.size, _BLOCK):
      block = shingle_hashes[start:start + _BLOCK]
      values = (a[:, None] * block[None, :] + b[:, None]) >> np.uint64(32)
      signature = np.minimum(signature, values.min(axis=1))  # [P]
  return signature.astype(np.uint32)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """Jaccard similarity of two sorted unique hash arrays."""
  if a.size == 0 and b.size == 0:
    return 1.0
  common = np.intersect1d(a, b, assume_unique=True).size
  return common / (a.size + b.size - common)


@functools.lru_cache(maxsize=32)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows) with bands * rows <= num_perm for a Jaccard threshold.

  Minimises 0.2 * P(candidate | s < t) + 0.8 * P(missed | s >= t), each
  integrated over s, for the LSH S-curve P(candidate | s) = 1-(1-s^R)^B.
  """
  if not 0.0 < threshold <= 1.0:
    raise DataError(f'{threshold=} must be in (0, 1].')
  s = np.linspace(0.0, 1.0, 401)
  below, above = s < threshold, s >= threshold
  best, best_cost = (1, num_perm), np.inf
  for bands in range(1, num_perm + 1):
    for rows in range(1, num_perm // bands + 1):
      curve = 1.0 - (1.0 - s**rows)**bands
      cost = 0.2 * curve[below].sum() + 0.8 * (1.0 - curve[above]).sum()
      if cost < best_cost - 1e-12:
        best, best_cost = (bands, rows), cost
  return best


def _exact_key(text: str) -> str:
  return hashlib.sha256(normalize(text).encode()).hexdigest()


def deduplicate(
    docs: Sequence[dict[str, str]], *,
    threshold: float = DEFAULT_THRESHOLD,
    num_perm: int = DEFAULT_NUM_PERM,
    ngram: int = DEFAULT_NGRAM,
    seed: int = 0,
) -> tuple[list[dict[str, str]], dict[str, object]]:
  """Exact then near-duplicate removal; the first copy in `docs` is kept.

  Args:
    docs: documents with at least 'id', 'lang' and 'text'.
    threshold: Jaccard similarity of shingle sets at or above which a
      document is a near duplicate of an earlier kept one.
    num_perm: MinHash signature length.
    ngram: shingle length in words (characters for CJK text).
    seed: seeds the MinHash functions.

  Returns:
    (kept documents in input order, stats) where stats has 'docs_in',
    'docs_out', 'removed' {'exact': {lang: n}, 'near': {lang: n}}, 'pairs'
    (one entry per removed document: its id, the kept id it duplicates, the
    stage and the Jaccard similarity) and the parameters.
  """
  bands, rows = lsh_bands(threshold, num_perm)
  removed = {'exact': {}, 'near': {}}
  pairs = []
  seen_exact: dict[str, str] = {}
  buckets: dict[tuple[int, bytes], list[int]] = {}
  kept: list[dict[str, str]] = []
  kept_shingles: list[np.ndarray] = []

  def drop(doc, stage, kept_id, similarity):
    removed[stage][doc['lang']] = removed[stage].get(doc['lang'], 0) + 1
    pairs.append({'id': doc['id'], 'duplicate_of': kept_id, 'stage': stage,
                  'jaccard': round(similarity, 4)})

  for doc in docs:
    key = _exact_key(doc['text'])
    if key in seen_exact:
      drop(doc, 'exact', seen_exact[key], 1.0)
      continue
    seen_exact[key] = doc['id']
    doc_shingles = shingles(doc['text'], ngram=ngram)
    signature = minhash(doc_shingles, num_perm=num_perm, seed=seed)
    band_keys = [(band, signature[band * rows:(band + 1) * rows].tobytes())
                 for band in range(bands)]
    candidates = sorted({j for k in band_keys for j in buckets.get(k, ())})
    match = None
    for j in candidates:
      similarity = jaccard(doc_shingles, kept_shingles[j])
      if similarity >= threshold:
        match = (j, similarity)
        break
    if match is not None:
      drop(doc, 'near', kept[match[0]]['id'], match[1])
      continue
    for k in band_keys:
      buckets.setdefault(k, []).append(len(kept))
    kept.append(doc)
    kept_shingles.append(doc_shingles)
  stats = {
      'docs_in': len(docs), 'docs_out': len(kept),
      'removed': {stage: dict(sorted(by_lang.items()))
                  for stage, by_lang in removed.items()},
      'pairs': pairs,
      'threshold': threshold, 'num_perm': num_perm, 'bands': bands,
      'rows': rows, 'ngram': ngram, 'seed': seed,
  }
  return kept, stats
