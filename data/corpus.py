"""Builds the default text corpus from text that ships on the machine.

Two sources, both present on a stock Debian/Ubuntu machine with Python:

* `manpages`: gzipped troff manual pages under /usr/share/man, English from
  `manN/` and translations from `<lang>/manN/` (`de`, `fr`, `pt_BR` -> `pt-BR`,
  ...), converted to plain prose by `troff.troff_to_text`.
* `python-docstrings`: module, class and function docstrings of the Python
  standard library, one document per module, read with `ast` (no imports).

`build_corpus` writes, into one directory that appears atomically:

  train.jsonl     one JSON document per line: {"id", "lang", "source", "path",
                  "text"}, in a seeded order;
  valid.jsonl     the same for the held-out ~5% (chosen by a hash of the id);
  manifest.json   recipe version, build config, every source file used with
                  its sha256, and per-split document / byte counts per language.

The build is deterministic: the same machine files and arguments give
byte-identical outputs (the manifest records output hashes to check this).
At most `max_docs_per_source` documents are kept per source, shared over its
languages in proportion to (files in that language)**0.5, and taken
round-robin over page / package families in an order fixed by `seed`. The
default (400) gives ~4 MB of text in 26 languages, about 75% English, in a few
seconds.

Usage:
  manifest = corpus.ensure_corpus('/tmp/glm_data/corpus')
  for doc in corpus.iter_documents('/tmp/glm_data/corpus', 'train'): ...
"""

from collections.abc import Callable, Iterator, Sequence
import ast
import collections
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import sysconfig
import tempfile
import warnings

from glm.data import troff

# Bump whenever the documents produced for the same inputs would change.
RECIPE_VERSION = 'glm-corpus-v1'
DEFAULT_MAN_ROOT = '/usr/share/man'
DEFAULT_MAX_DOCS_PER_SOURCE = 400
# Exponent of the per-language share of a source's document cap (see
# `_language_quotas`); 0.5 keeps English the largest language of the default
# corpus while every installed translation still contributes.
_LANG_ALPHA = 0.5
SPLITS = ('train', 'valid')
MANIFEST_NAME = 'manifest.json'
# A document is held out when the first 32 bits of sha256(salt + id), taken
# mod 1000, fall below this (so ~5%). Independent of `seed` on purpose: the
# validation set of a document never depends on the sampling seed.
_VALID_PER_MILLE = 50
_VALID_SALT = 'glm-valid/'

# ---------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One file a source may turn into a document.

  `family` groups near-duplicate files (the 16,000 `gcloud_*` pages, the
  modules of one package) so that sampling can spread over families.
  """
  source: str
  lang: str
  root: str
  relpath: str
  family: str

  @property
  def path(self) -> str:
    return os.path.join(self.root, self.relpath)

  @property
  def doc_id(self) -> str:
    return f'{self.source}/{self.relpath}'


@dataclasses.dataclass(frozen=True)
class Source:
  """A kind of text on the machine: how to list its files and read one.

  Attributes:
    name: the `source` field of its documents.
    root: the directory it reads.
    list_files: root -> the candidate files (any order; empty if missing).
    read_text: a candidate -> its plain text ('' to skip it).
    install_hint: what to run when the files are missing.
  """
  name: str
  root: str
  list_files: Callable[[str], list[SourceFile]]
  read_text: Callable[[SourceFile], str]
  install_hint: str


def _man_lang(folder: str) -> str:
  """`de` -> 'de', `pt_BR` -> 'pt-BR', `de.UTF-8` -> 'de'."""
  return folder.split('.')[0].replace('_', '-')


def _list_man_pages(root: str) -> list[SourceFile]:
  """Regular manual-page files under `root` (aliases, i.e. symlinks, skipped).

  Layout: `root/manN/page.N.gz` is English, `root/<lang>/manN/...` a
  translation.
  """
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    parts = os.path.relpath(dirpath, root).split(os.sep)
    if re.fullmatch(r'man\w+', parts[0]) and len(parts) == 1:
      lang = 'en'
    elif len(parts) == 2 and re.fullmatch(r'man\w+', parts[1]):
      lang = _man_lang(parts[0])
    else:
      continue
    for filename in sorted(filenames):
      path = os.path.join(dirpath, filename)
      if not os.path.islink(path) and os.path.isfile(path):
        family = re.split(r'[._-]', filename, maxsplit=1)[0]
        files.append(SourceFile('manpages', lang, root,
                                 os.path.relpath(path, root), family))
  return files


def _read_man_page(file: SourceFile) -> str:
  """Plain text of a (possibly gzipped) troff manual page."""
  with open(file.path, 'rb') as f:
    raw = f.read()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  try:
    source = raw.decode('utf-8')
  except UnicodeDecodeError:
    source = raw.decode('latin-1')  # The pre-UTF-8 man page convention.
  return troff.troff_to_text(source)


# Directories of the standard library that hold tests, not documentation.
_STDLIB_SKIP_DIRS = frozenset(
    ['test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
     '__pycache__'])


def _list_stdlib_modules(root: str) -> list[SourceFile]:
  """The standard library's `.py` files, without test suites."""
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS
                         and not d.startswith('config-'))
    for filename in sorted(filenames):
      if filename.endswith('.py'):
        relpath = os.path.relpath(os.path.join(dirpath, filename), root)
        family = relpath.split(os.sep)[0].removesuffix('.py')
        files.append(SourceFile('python-docstrings', 'en', root, relpath,
                                 family))
  return files


def _definition_header(node: ast.AST, qualname: str) -> str:
  """`class Name(Base)` or `def qual.name(args)` for a documented node."""
  if isinstance(node, ast.ClassDef):
    bases = ', '.join(ast.unparse(b) for b in node.bases)
    return f'class {qualname}({bases})' if bases else f'class {qualname}'
  return f'def {qualname}({ast.unparse(node.args)})'


def _docstrings(node: ast.AST, prefix: str) -> Iterator[str]:
  """Yields `header\\ndocstring` for every documented class/def under node.

  Definitions nested in other statements (`if sys.platform == ...:`,
  `try:`) count too; only classes and defs extend the qualified name.
  """
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.ClassDef, ast.FunctionDef,
                          ast.AsyncFunctionDef)):
      qualname = prefix + child.name
      doc = ast.get_docstring(child, clean=True)
      if doc and doc.strip():
        yield _definition_header(child, qualname) + '\n' + doc.strip()
      yield from _docstrings(child, qualname + '.')
    else:
      yield from _docstrings(child, prefix)


def _read_stdlib_docstrings(file: SourceFile) -> str:
  """The module, class and function docstrings of one module as one text."""
  with open(file.path, 'rb') as f:
    source = f.read()
  try:
    with warnings.catch_warnings():  # Invalid escapes in old modules, etc.
      warnings.simplefilter('ignore')
      tree = ast.parse(source, filename=file.path)
  except (SyntaxError, ValueError):
    return ''  # Test fixtures with deliberately broken or Python 2 syntax.
  module = file.relpath[:-len('.py')].replace(os.sep, '.')
  module = module.removesuffix('.__init__')
  parts = []
  doc = ast.get_docstring(tree, clean=True)
  if doc and doc.strip():
    parts.append(doc.strip())
  parts.extend(_docstrings(tree, ''))
  if not parts:
    return ''
  return f'Module {module}\n\n' + '\n\n'.join(parts)


def default_sources(man_root: str | None = None,
                    stdlib_root: str | None = None) -> tuple[Source, ...]:
  """The sources of the default corpus, with roots overridable for tests."""
  version = sysconfig.get_python_version()
  return (
      Source(
          name='manpages',
          root=man_root or DEFAULT_MAN_ROOT,
          list_files=_list_man_pages,
          read_text=_read_man_page,
          install_hint=('apt-get install man-db manpages manpages-de '
                        'manpages-fr manpages-es (on a minimized Docker image '
                        'run `unminimize` first)')),
      Source(
          name='python-docstrings',
          root=stdlib_root or sysconfig.get_paths()['stdlib'],
          list_files=_list_stdlib_modules,
          read_text=_read_stdlib_docstrings,
          install_hint=(f'apt-get install libpython{version}-stdlib, or use '
                        'a Python that ships its standard library as .py '
                        'sources')),
  )


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


def _select_documents(source: Source, max_docs: int, seed: int,
                      seen_texts: set[str]) -> list[dict[str, str]]:
  """Reads up to `max_docs` non-empty documents of a source.

  The cap is shared over languages by `_language_quotas`. Within a language,
  candidates are visited round-robin over families (one `git-*` page, one
  `gcloud_*` page, ..., then second ones), each in an order fixed by `seed`,
  so a cap picks a spread of the source rather than its largest family or its
  alphabetical head. Documents whose text exactly repeats an earlier one are
  skipped.
  """
  by_lang = collections.defaultdict(list)
  for file in source.list_files(source.root):
    by_lang[file.lang].append(file)
  quotas = _language_quotas({lang: len(files) for lang, files in
                             by_lang.items()}, max_docs, _LANG_ALPHA)
  documents = []
  for lang, quota in quotas.items():
    kept = 0
    for file in _round_robin_by_family(by_lang[lang], seed):
      if kept >= quota:
        break
      # 'replace' turns lone surrogates (escapes in docstrings) into '?', as
      # they cannot be written as UTF-8.
      text = source.read_text(file).encode('utf-8', 'replace').decode().strip()
      text_hash = _sha256(text.encode())
      if not text or text_hash in seen_texts:
        continue
      seen_texts.add(text_hash)
      documents.append(dict(id=file.doc_id, lang=lang, source=source.name,
                            path=file.path, text=text))
      kept += 1
  return documents


def _split_documents(
    documents: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
  """Train/valid split by id hash; valid gets >= 1 doc when there are >= 2."""
  splits = {'train': [], 'valid': []}
  for doc in documents:
    splits['valid' if is_valid_id(doc['id']) else 'train'].append(doc)
  if len(documents) >= 2 and not splits['valid']:
    # Tiny corpora: hold out the document whose hash is closest to the cut.
    doc = min(splits['train'],
              key=lambda d: _sha256((_VALID_SALT + d['id']).encode()))
    splits['train'].remove(doc)
    splits['valid'].append(doc)
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
                    missing: Sequence[str]) -> dict[str, object]:
  """The manifest: recipe, config, source files with hashes, split stats."""
  used = collections.defaultdict(list)
  for docs in splits.values():
    for doc in docs:
      used[doc['source']].append(doc['path'])
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
          'missing_sources': list(missing)}


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


def _build_config(max_docs_per_source: int, seed: int,
                  sources: Sequence[Source]) -> dict[str, object]:
  """What a build depends on besides the recipe and the files themselves."""
  return {'max_docs_per_source': max_docs_per_source, 'seed': seed,
          'roots': {s.name: s.root for s in sources}}


def build_corpus(out_dir: str, *,
                 max_docs_per_source: int = DEFAULT_MAX_DOCS_PER_SOURCE,
                 seed: int = 0,
                 man_root: str | None = None,
                 stdlib_root: str | None = None) -> dict[str, object]:
  """Builds the corpus into `out_dir` (replacing it atomically).

  Args:
    out_dir: the corpus directory to (re)create.
    max_docs_per_source: documents kept per source, shared over its languages.
    seed: fixes which documents a cap keeps and their order in the files.
    man_root: manual pages root (default /usr/share/man).
    stdlib_root: Python standard library root (default: this Python's).

  Returns:
    The manifest that was written to `out_dir/manifest.json`.

  Raises:
    FileNotFoundError: when no source yields any document.
  """
  sources = default_sources(man_root, stdlib_root)
  config = _build_config(max_docs_per_source, seed, sources)
  documents, missing, seen_texts = [], [], set()
  for source in sources:
    docs = _select_documents(source, max_docs_per_source, seed, seen_texts)
    if not docs:
      missing.append(source.name)
      warnings.warn(f'glm.data: no {source.name} text found under '
                    f'{source.root}; install it with: {source.install_hint}')
    elif source.name == 'manpages' and {d['lang'] for d in docs} == {'en'}:
      warnings.warn(f'glm.data: only English manual pages under {source.root}'
                    '; for other languages: apt-get install manpages-de '
                    'manpages-fr manpages-es manpages-ru')
    documents.extend(docs)
  if not documents:
    roots = ', '.join(f'{s.name} under {s.root}' for s in sources)
    raise FileNotFoundError(
        f'glm.data: no source text found ({roots}); install it (see the '
        'warnings above) or pass man_root=/stdlib_root= to build_corpus.')
  documents.sort(key=lambda d: _order_key(seed, d['id']))
  splits = _split_documents(documents)
  manifest = {}

  def write(tmp_dir: str) -> None:
    for split, docs in splits.items():
      _write_jsonl(os.path.join(tmp_dir, f'{split}.jsonl'), docs)
    manifest.update(_build_manifest(config, sources, splits, tmp_dir, missing))
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
                  max_docs_per_source: int = DEFAULT_MAX_DOCS_PER_SOURCE,
                  seed: int = 0,
                  man_root: str | None = None,
                  stdlib_root: str | None = None) -> dict[str, object]:
  """Builds the corpus unless an up-to-date one is already in `out_dir`.

  Up to date means a manifest with the current `RECIPE_VERSION` and the same
  build config (`max_docs_per_source`, `seed`, source roots). Arguments are
  those of `build_corpus`.

  Returns:
    The manifest of the corpus in `out_dir`.
  """
  kwargs = dict(max_docs_per_source=max_docs_per_source, seed=seed,
                man_root=man_root, stdlib_root=stdlib_root)
  manifest = read_manifest(out_dir)
  config = _build_config(max_docs_per_source, seed,
                         default_sources(man_root, stdlib_root))
  if manifest is None:
    reason = 'no manifest'
  elif manifest.get('recipe') != RECIPE_VERSION:
    reason = f"recipe {manifest.get('recipe')} != {RECIPE_VERSION}"
  elif manifest.get('config') != config:
    reason = 'build config changed'
  else:
    docs = sum(s['docs'] for s in manifest['splits'].values())
    print(f'glm.data: corpus {out_dir} is up to date ({RECIPE_VERSION}, '
          f'{docs} documents).', flush=True)
    return manifest
  print(f'glm.data: building corpus {out_dir} ({reason}) ...', flush=True)
  manifest = build_corpus(out_dir, **kwargs)
  stats = {split: f"{s['docs']} docs / {s['bytes'] / 1e6:.2f} MB"
           for split, s in manifest['splits'].items()}
  print(f'glm.data: wrote corpus {out_dir}: {stats}', flush=True)
  return manifest


def iter_documents(corpus_dir: str, split: str) -> Iterator[dict[str, str]]:
  """Yields the documents of one split in file order."""
  if split not in SPLITS:
    raise ValueError(f'{split=} is not one of {SPLITS}.')
  with open(os.path.join(corpus_dir, f'{split}.jsonl'), encoding='utf-8') as f:
    for line in f:
      yield json.loads(line)
