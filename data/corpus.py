"""Builds the default text corpus (a miniature ROOTS) from the machine's text.

The text comes from the three `sources` (manual pages in many languages,
Python standard-library docstrings and code); this module holds the recipe
that turns their files into a corpus, and reads the corpus back.

The recipe, in order (ROOTS / BLOOM):
  1. read at most `max_docs_per_source` documents per source, shared over its
     languages in proportion to (files in that language)**0.3, taken
     round-robin over page / package families in an order fixed by `seed`;
  2. `dedup.deduplicate`: exact (normalised text) then MinHash-LSH near
     duplicates at Jaccard >= `dedup_threshold`, the first copy kept;
  3. `redact.redact_documents`: e-mail, IP and phone numbers -> placeholders;
  4. a train / valid split by a hash of the id (~5%, plus a floor of held-out
     text for every language with enough documents);
  5. `sampling.sample_by_language` on the train split only: languages
     resampled to p_l ~ bytes_l**`lang_alpha` (downsampled by a seeded prefix,
     upsampled by repeating documents, at most `max_repeat` copies).

`build_corpus` writes, into one directory that appears atomically:

  train.jsonl     one JSON document per line: {"id", "lang", "source", "path",
                  "text"}, in a seeded order (a repeated copy has id `<id>#k`);
  valid.jsonl     the same for the held-out documents (never resampled);
  manifest.json   recipe version, build config, every source file used with
                  its sha256, per-split document / byte counts per language,
                  and the dedup, redaction and sampling statistics.

The build is deterministic: the same machine files and arguments give
byte-identical outputs (the manifest records output hashes to check this).
The defaults give ~5 MB in 26 languages plus code in ~15 s on 2 cores.

Usage:
  manifest = corpus.ensure_corpus('/tmp/glm_data/corpus')
  for doc in corpus.iter_documents('/tmp/glm_data/corpus', 'train'): ...
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import collections
import hashlib
import json
import os
import shutil
import sys
import tempfile
import types
import warnings

from glm.data import dedup
from glm.data.errors import DataError
from glm.data import redact
from glm.data import sampling
# Also read as corpus.<name>. build_corpus and ensure_corpus look up
# Also read as corpus.<name>. build_corpus and ensure_corpus look up
# `default_sources` in this module, so patching corpus.default_sources
# redirects them.
from glm.data.sources import few_languages_warning
from glm.data.sources import Source, SourceFile, default_sources


# Bump whenever the documents produced for the same inputs would change.
RECIPE_VERSION = 'glm-corpus-v2'
# Documents read per source (an int applies to every source). Translations
# are few (~1,300 pages in 25 languages), so manual pages get the largest
# budget and `_READ_ALPHA` spreads it towards the small languages.
DEFAULT_MAX_DOCS_PER_SOURCE = types.MappingProxyType(
    {'manpages': 640, 'python-docstrings': 120, 'python-code': 160})
DEFAULT_LANG_ALPHA = sampling.DEFAULT_ALPHA
DEFAULT_MAX_REPEAT = sampling.DEFAULT_MAX_REPEAT
DEFAULT_DEDUP_THRESHOLD = dedup.DEFAULT_THRESHOLD
# Languages with at least this many documents get held-out documents up to
# this many characters (see `_split_documents`).
_MIN_DOCS_FOR_VALID = 5
_MIN_VALID_CHARS = 4000
# Exponent of the per-language share of a source's document cap (see
# `_language_quotas`): a reading budget, flat enough that every installed
# translation contributes a few dozen pages. The training mix is set later by
# `sampling` with `lang_alpha`.
_READ_ALPHA = 0.3
SPLITS = ('train', 'valid')
MANIFEST_NAME = 'manifest.json'
# A document is held out when the first 32 bits of sha256(salt + id), taken
# mod 1000, fall below this (so ~5%). Independent of `seed` on purpose: the
# validation set of a document never depends on the sampling seed.
_VALID_PER_MILLE = 50
_VALID_SALT = 'glm-valid/'

# ---------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def is_valid_id(doc_id: str) -> bool:
  """Whether a document id is held out for validation (~5%, seed-free)."""
  bucket = int(_sha256((_VALID_SALT + doc_id).encode())[:8], 16) % 1000
  return bucket < _VALID_PER_MILLE


def _order_key(seed: int, doc_id: str) -> str:
  return _sha256(f'{seed}/{doc_id}'.encode())


def _language_quotas(counts: dict[str, int], total: int,
                     alpha: float) -> dict[str, int]:
  """Splits `total` documents over languages in proportion to count**alpha.

  alpha < 1 flattens the distribution (as in mT5 / XLM-R sampling) so that a
  language with 200 manual pages is not drowned by one with 18,000. A
  language never gets more than it has; its unused share goes to the others.
  Ties are broken by language name, so the result is deterministic.
  """
  quotas: dict[str, int] = {}
  remaining = {lang: n for lang, n in counts.items() if n > 0}
  budget = total
  while remaining and budget > 0:
    norm = sum(n**alpha for n in remaining.values())
    share = {lang: budget * n**alpha / norm for lang, n in remaining.items()}
    saturated = sorted(lang for lang in remaining
                       if share[lang] >= remaining[lang])
    if not saturated:
      floors = {lang: int(s) for lang, s in share.items()}
      leftover = budget - sum(floors.values())
      by_fraction = sorted(share, key=lambda l: (floors[l] - share[l], l))
      for lang in by_fraction[:leftover]:
        floors[lang] += 1
      quotas.update(floors)
      break
    for lang in saturated:
      quotas[lang] = remaining.pop(lang)
      budget -= quotas[lang]
  return {lang: q for lang, q in sorted(quotas.items()) if q > 0}


def _round_robin_by_family(files: Sequence[SourceFile],
                           seed: int) -> list[SourceFile]:
  """Files ordered as rounds over families, seeded within and across them."""
  families = collections.defaultdict(list)
  for file in sorted(files, key=lambda f: _order_key(seed, f.doc_id)):
    families[file.family].append(file)
  ranked = []
  for family, members in families.items():
    family_key = _order_key(seed, f'{family}/')
    ranked.extend(((rank, family_key), f) for rank, f in enumerate(members))
  return [file for _, file in sorted(ranked, key=lambda item: item[0])]


def _select_documents(source: Source, max_docs: int,
                      seed: int) -> list[dict[str, str]]:
  """Reads up to `max_docs` non-empty documents of a source.

  The cap is shared over languages by `_language_quotas`. Within a language,
  candidates are visited round-robin over families (one `git-*` page, one
  `gcloud_*` page, ..., then second ones), each in an order fixed by `seed`,
  so a cap picks a spread of the source rather than its largest family or its
  alphabetical head. Duplicates are left to `dedup` (so they are counted).
  """
  by_lang = collections.defaultdict(list)
  for file in source.list_files(source.root):
    by_lang[file.lang].append(file)
  quotas = _language_quotas({lang: len(files) for lang, files in
                             by_lang.items()}, max_docs, _READ_ALPHA)
  documents = []
  for lang, quota in quotas.items():
    kept = 0
    for file in _round_robin_by_family(by_lang[lang], seed):
      if kept >= quota:
        break
      # 'replace' turns lone surrogates (escapes in docstrings) into '?', as
      # they cannot be written as UTF-8.
      text = source.read_text(file).encode('utf-8', 'replace').decode().strip()
      if not text:
        continue
      documents.append(dict(id=file.doc_id, lang=lang, source=source.name,
                            path=file.path, text=text))
      kept += 1
  return documents


def _split_documents(
    documents: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
  """Train/valid split by id hash, with a held-out floor.

  Valid gets >= 1 document when there are >= 2. Every language with >=
  `_MIN_DOCS_FOR_VALID` documents gets held-out documents until it has
  `_MIN_VALID_CHARS` characters, but at most a fifth of its documents (so
  per-language held-out measures, such as tokenizer fertility, exist for all
  but the smallest languages). Extra documents are taken in hash order.
  """
  splits = {'train': [], 'valid': []}
  for doc in documents:
    splits['valid' if is_valid_id(doc['id']) else 'train'].append(doc)
  valid_key = lambda d: _sha256((_VALID_SALT + d['id']).encode())
  langs = collections.Counter(d['lang'] for d in documents)
  moved = set()
  for lang in sorted(langs):
    if langs[lang] < _MIN_DOCS_FOR_VALID:
      continue
    held = [d for d in splits['valid'] if d['lang'] == lang]
    chars, count = sum(len(d['text']) for d in held), len(held)
    for doc in sorted((d for d in splits['train'] if d['lang'] == lang),
                      key=valid_key):
      if (chars >= _MIN_VALID_CHARS and count) or count >= langs[lang] // 5:
        break
      moved.add(doc['id'])
      chars, count = chars + len(doc['text']), count + 1
  if len(documents) >= 2 and not splits['valid'] and not moved:
    # Tiny corpora: hold out the document whose hash is closest to the cut.
    moved.add(min(splits['train'], key=valid_key)['id'])
  splits['valid'] += [d for d in splits['train'] if d['id'] in moved]
  splits['train'] = [d for d in splits['train'] if d['id'] not in moved]
  return splits


def _write_jsonl(path: str, documents: Sequence[dict[str, str]]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for doc in documents:
      f.write(json.dumps(doc, ensure_ascii=False) + '\n')


def _split_stats(documents: Sequence[dict[str, str]]) -> dict[str, object]:
  langs = collections.defaultdict(lambda: {'docs': 0, 'bytes': 0})
  for doc in documents:
    langs[doc['lang']]['docs'] += 1
    langs[doc['lang']]['bytes'] += len(doc['text'].encode())
  return {'docs': len(documents),
          'bytes': sum(v['bytes'] for v in langs.values()),
          'langs': dict(sorted(langs.items()))}


def _build_manifest(config: dict[str, object], sources: Sequence[Source],
                    splits: dict[str, list[dict[str, str]]], out_dir: str,
                    missing: Sequence[str],
                    stats: dict[str, object]) -> dict[str, object]:
  """The manifest: recipe, config, source files with hashes, split stats.

  `stats` (dedup, redaction, sampling) is recorded as given.
  """
  used = collections.defaultdict(set)
  for docs in splits.values():
    for doc in docs:
      used[doc['source']].add(doc['path'])
  source_entries = {}
  for source in sources:
    files = []
    for path in sorted(used[source.name]):
      files.append({'path': os.path.relpath(path, source.root),
                    'sha256': _file_sha256(path),
                    'bytes': os.path.getsize(path)})
    source_entries[source.name] = {'root': source.root, 'files': files}
  split_entries = {}
  for split, docs in splits.items():
    filename = f'{split}.jsonl'
    split_entries[split] = {
        'file': filename,
        'sha256': _file_sha256(os.path.join(out_dir, filename)),
        **_split_stats(docs)}
  return {'recipe': RECIPE_VERSION, 'config': config,
          'sources': source_entries, 'splits': split_entries,
          'missing_sources': list(missing), **stats}


def _replace_dir_atomically(build: Callable[[str], None], out_dir: str) -> None:
  """Runs `build(tmp_dir)`, then swaps tmp_dir in as `out_dir`.

  A build that raises or is killed leaves `out_dir` as it was (a killed one
  may leave a hidden `.name.tmp-*` folder next to it, never a finished-looking
  corpus).
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-',
                             dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp's 0o700 would outlive the swap.
  try:
    build(tmp_dir)
    if os.path.exists(out_dir):
      old_dir = tmp_dir + '.old'
      os.replace(out_dir, old_dir)
      try:
        os.replace(tmp_dir, out_dir)
      except OSError:
        os.replace(old_dir, out_dir)
        raise
      shutil.rmtree(old_dir)
    else:
      os.replace(tmp_dir, out_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


MaxDocs = int | Mapping[str, int]


def _source_budgets(max_docs_per_source: MaxDocs,
                    sources: Sequence[Source]) -> dict[str, int]:
  """{source name: documents to read} from an int or a per-source mapping."""
  if isinstance(max_docs_per_source, int):
    return {s.name: max_docs_per_source for s in sources}
  unknown = set(max_docs_per_source) - {s.name for s in sources}
  if unknown:
    raise DataError(f'max_docs_per_source names unknown sources '
                    f'{sorted(unknown)}; use {[s.name for s in sources]}.')
  return {s.name: int(max_docs_per_source.get(s.name, 0)) for s in sources}


def _build_config(max_docs_per_source: MaxDocs, seed: int,
                  sources: Sequence[Source], lang_alpha: float,
                  max_repeat: int,
                  dedup_threshold: float) -> dict[str, object]:
  """What a build depends on besides the recipe and the files themselves."""
  if not 0.0 < dedup_threshold <= 1.0:
    raise DataError(f'{dedup_threshold=} must be in (0, 1] (a Jaccard '
                    f'similarity; default {DEFAULT_DEDUP_THRESHOLD}).')
  if lang_alpha < 0 or max_repeat < 1:
    raise DataError(f'{lang_alpha=} must be >= 0 and {max_repeat=} >= 1 '
                    f'(defaults {DEFAULT_LANG_ALPHA}, {DEFAULT_MAX_REPEAT}).')
  return {'max_docs_per_source': _source_budgets(max_docs_per_source, sources),
          'seed': seed,
          'roots': {s.name: s.root for s in sources},
          'lang_alpha': lang_alpha, 'max_repeat': max_repeat,
          'dedup_threshold': dedup_threshold}


def _clean_and_split(
    documents: list[dict[str, str]], *, seed: int, lang_alpha: float,
    max_repeat: int, dedup_threshold: float,
) -> tuple[dict[str, list[dict[str, str]]], dict[str, object]]:
  """Steps 2-5 of the recipe: dedup, redact, split, resample train."""
  documents, dedup_stats = dedup.deduplicate(
      documents, threshold=dedup_threshold, seed=seed)
  documents, redaction_stats = redact.redact_documents(documents)
  splits = _split_documents(documents)
  splits['train'], sampling_stats = sampling.sample_by_language(
      splits['train'], alpha=lang_alpha, max_repeat=max_repeat, seed=seed)
  for split, docs in splits.items():
    docs.sort(key=lambda d: _order_key(seed, d['id']))
  return splits, {'dedup': dedup_stats, 'redaction': redaction_stats,
                  'sampling': sampling_stats}


def build_corpus(out_dir: str, *,
                 max_docs_per_source: MaxDocs = DEFAULT_MAX_DOCS_PER_SOURCE,
                 seed: int = 0,
                 man_root: str | None = None,
                 stdlib_root: str | None = None,
                 lang_alpha: float = DEFAULT_LANG_ALPHA,
                 max_repeat: int = DEFAULT_MAX_REPEAT,
                 dedup_threshold: float = DEFAULT_DEDUP_THRESHOLD,
                 ) -> dict[str, object]:
  """Builds the corpus into `out_dir` (replacing it atomically).

  Args:
    out_dir: the corpus directory to (re)create.
    max_docs_per_source: documents read per source, shared over its
      languages (before deduplication): an int for every source or
      {source name: n} (a source left out is not read).
    seed: fixes which documents a cap keeps, the resampling and the order in
      the files.
    man_root: manual pages root (default /usr/share/man).
    stdlib_root: Python standard library root (default: this Python's).
    lang_alpha: language sampling exponent of the train split (1 keeps the
      natural mix; see `sampling`).
    max_repeat: the most copies of one language's train text.
    dedup_threshold: Jaccard similarity from which documents are near
      duplicates.

  Returns:
    The manifest that was written to `out_dir/manifest.json`.

  Raises:
    DataError: when no source yields any document, or an argument is out of
      range.
  """
  sources = default_sources(man_root, stdlib_root)
  config = _build_config(max_docs_per_source, seed, sources, lang_alpha,
                         max_repeat, dedup_threshold)
  documents, missing = [], []
  for source in sources:
    budget = config['max_docs_per_source'][source.name]
    if budget <= 0:
      continue
    docs = _select_documents(source, budget, seed)
    langs = sorted({d['lang'] for d in docs})
    if not docs:
      missing.append(source.name)
      warnings.warn(f'glm.data: no {source.name} text found under '
                    f'{source.root}; install it with: {source.install_hint}')
    elif hint := few_languages_warning(source, langs):
      warnings.warn(hint)
    documents.extend(docs)
  if not documents:
    roots = ', '.join(f'{s.name} under {s.root}' for s in sources)
    raise DataError(
        f'glm.data: no source text found ({roots}); install it (see the '
        'warnings above) or pass man_root=/stdlib_root= to build_corpus.')
  splits, stats = _clean_and_split(
      documents, seed=seed, lang_alpha=lang_alpha, max_repeat=max_repeat,
      dedup_threshold=dedup_threshold)
  manifest = {}

  def write(tmp_dir: str) -> None:
    for split, docs in splits.items():
      _write_jsonl(os.path.join(tmp_dir, f'{split}.jsonl'), docs)
    manifest.update(_build_manifest(config, sources, splits, tmp_dir, missing,
                                    stats))
    _write_manifest(tmp_dir, manifest)

  _replace_dir_atomically(write, out_dir)
  return manifest


def _write_manifest(directory: str, manifest: dict[str, object]) -> None:
  with open(os.path.join(directory, MANIFEST_NAME), 'w',
            encoding='utf-8') as f:
    json.dump(manifest, f, indent=1, sort_keys=True, ensure_ascii=False)
    f.write('\n')


def read_manifest(corpus_dir: str) -> dict[str, object] | None:
  """The corpus manifest, or None when the corpus is absent or unreadable."""
  try:
    with open(os.path.join(corpus_dir, MANIFEST_NAME), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def manifest_sha256(corpus_dir: str) -> str:
  """Hash of the manifest file: names the corpus contents for caches."""
  return _file_sha256(os.path.join(corpus_dir, MANIFEST_NAME))


def ensure_corpus(out_dir: str, *,
                  max_docs_per_source: MaxDocs = DEFAULT_MAX_DOCS_PER_SOURCE,
                  seed: int = 0,
                  man_root: str | None = None,
                  stdlib_root: str | None = None,
                  lang_alpha: float = DEFAULT_LANG_ALPHA,
                  max_repeat: int = DEFAULT_MAX_REPEAT,
                  dedup_threshold: float = DEFAULT_DEDUP_THRESHOLD,
                  ) -> dict[str, object]:
  """Builds the corpus unless an up-to-date one is already in `out_dir`.

  Up to date means a manifest with the current `RECIPE_VERSION` and the same
  build config (`max_docs_per_source`, `seed`, source roots, sampling and
  dedup settings). Arguments are those of `build_corpus`.

  Returns:
    The manifest of the corpus in `out_dir`.
  """
  kwargs = dict(max_docs_per_source=max_docs_per_source, seed=seed,
                man_root=man_root, stdlib_root=stdlib_root,
                lang_alpha=lang_alpha, max_repeat=max_repeat,
                dedup_threshold=dedup_threshold)
  manifest = read_manifest(out_dir)
  config = _build_config(max_docs_per_source, seed,
                         default_sources(man_root, stdlib_root), lang_alpha,
                         max_repeat, dedup_threshold)
  if manifest is None:
    reason = 'no manifest'
  elif manifest.get('recipe') != RECIPE_VERSION:
    reason = f"recipe {manifest.get('recipe')} != {RECIPE_VERSION}"
  elif manifest.get('config') != config:
    reason = 'build config changed'
  else:
    docs = sum(s['docs'] for s in manifest['splits'].values())
    print(f'glm.data: corpus {out_dir} is up to date ({RECIPE_VERSION}, '
          f'{docs} documents).', file=sys.stderr, flush=True)
    return manifest
  print(f'glm.data: building corpus {out_dir} ({reason}) ...',
        file=sys.stderr, flush=True)
  manifest = build_corpus(out_dir, **kwargs)
  stats = {split: f"{s['docs']} docs / {s['bytes'] / 1e6:.2f} MB"
           for split, s in manifest['splits'].items()}
  removed = {k: sum(v.values()) for k, v in manifest['dedup']['removed'].items()}
  redacted = {k: sum(v.values()) for k, v in manifest['redaction'].items()}
  print(f'glm.data: wrote corpus {out_dir}: {stats}; dedup removed '
        f'{removed}; redacted {redacted}.', file=sys.stderr, flush=True)
  return manifest


def iter_documents(corpus_dir: str, split: str) -> Iterator[dict[str, str]]:
  """Yields the documents of one split in file order."""
  if split not in SPLITS:
    raise DataError(f'{split=} is not one of {SPLITS}.')
  with open(os.path.join(corpus_dir, f'{split}.jsonl'), encoding='utf-8') as f:
    for line in f:
      yield json.loads(line)
