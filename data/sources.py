"""The text on the machine that the default corpus is read from.

Three sources, all present on a stock Debian/Ubuntu machine with Python:

* `manpages`: gzipped troff manual pages under /usr/share/man, English from
  `manN/` and translations from `<lang>/manN/` (`de`, `fr`, `pt_BR` -> `pt-BR`,
  ...), converted to plain prose by `troff.troff_to_text`.
* `python-docstrings`: module, class and function docstrings of the Python
  standard library, one document per module, read with `ast` (no imports).
* `python-code`: the standard library's `.py` sources themselves, language
  'code', each cut at a line break to at most `_MAX_CODE_BYTES`.

A `Source` says how to list a source's candidate files (`SourceFile`s, each
with a language and a family of near-duplicates) and how to read one as plain
text; `default_sources` returns the three, with roots overridable for tests.
Which files become documents, and what happens to them next, is the recipe in
`corpus`.

Usage:
  for source in sources.default_sources():
    for file in source.list_files(source.root):
      text = source.read_text(file)  # '' when the file holds no text
"""

from collections.abc import Callable, Iterator, Sequence
import ast
import dataclasses
import gzip
import os
import re
import sysconfig
import warnings

from glm.data import troff

DEFAULT_MAN_ROOT = '/usr/share/man'
# A code document is cut at the last line break before this many bytes.
_MAX_CODE_BYTES = 6144
# Fewer manual-page languages than this under the default root is warned
# about, with the packages that add them.
_MIN_MAN_LANGS = 8
_TRANSLATION_PACKAGES = ('manpages-de manpages-fr manpages-es manpages-it '
                         'manpages-pl manpages-ru manpages-uk manpages-ja '
                         'manpages-zh manpages-pt-br')


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


def _list_stdlib_modules(root: str, source: str = 'python-docstrings',
                         lang: str = 'en') -> list[SourceFile]:
  """The standard library's `.py` files, without test suites."""
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS
                         and not d.startswith('config-'))
    for filename in sorted(filenames):
      if filename.endswith('.py'):
        relpath = os.path.relpath(os.path.join(dirpath, filename), root)
        family = relpath.split(os.sep)[0].removesuffix('.py')
        files.append(SourceFile(source, lang, root, relpath, family))
  return files


def _list_stdlib_code(root: str) -> list[SourceFile]:
  return _list_stdlib_modules(root, source='python-code', lang='code')


def _parse_python(source: bytes, path: str) -> ast.Module | None:
  """The module's syntax tree, or None when it does not parse."""
  try:
    with warnings.catch_warnings():  # Invalid escapes in old modules, etc.
      warnings.simplefilter('ignore')
      return ast.parse(source, filename=path)
  except (SyntaxError, ValueError):
    return None  # Test fixtures with deliberately broken or Python 2 syntax.


def _read_stdlib_code(file: SourceFile) -> str:
  """A module's source, cut at a line break to <= `_MAX_CODE_BYTES`.

  Modules that do not parse as Python 3 are skipped ('').
  """
  with open(file.path, 'rb') as f:
    source = f.read()
  if _parse_python(source, file.path) is None:
    return ''
  text = source.decode('utf-8', 'replace')
  if len(source) > _MAX_CODE_BYTES:
    head = source[:_MAX_CODE_BYTES]
    text = head[:head.rfind(b'\n') + 1].decode('utf-8', 'replace')
  return text


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
  tree = _parse_python(source, file.path)
  if tree is None:
    return ''
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
  stdlib_root = stdlib_root or sysconfig.get_paths()['stdlib']
  stdlib_hint = (f'apt-get install libpython{version}-stdlib, or use a Python '
                 'that ships its standard library as .py sources')
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
          root=stdlib_root,
          list_files=_list_stdlib_modules,
          read_text=_read_stdlib_docstrings,
          install_hint=stdlib_hint),
      Source(
          name='python-code',
          root=stdlib_root,
          list_files=_list_stdlib_code,
          read_text=_read_stdlib_code,
          install_hint=stdlib_hint),
  )


def few_languages_warning(source: Source, langs: Sequence[str]) -> str:
  """Why and how to add translations, or '' when `source` has enough.

  Only the manual pages under `DEFAULT_MAN_ROOT` are checked: a machine
  without the translation packages gives a corpus of few languages.
  """
  if (source.name == 'manpages' and source.root == DEFAULT_MAN_ROOT
      and len(langs) < _MIN_MAN_LANGS):
    return (f'glm.data: manual pages under {source.root} cover only {langs}; '
            f'for >= {_MIN_MAN_LANGS} languages in Latin, Cyrillic and CJK '
            f'scripts: apt-get install {_TRANSLATION_PACKAGES} (on a '
            'minimized Docker image run `unminimize` first)')
  return ''
