"""Tests of the walking-skeleton data path: corpus, tokenizer, LM batches.

Everything runs on small fake source trees (a few man pages, a tiny "stdlib")
so the file takes seconds, not a read of the whole machine.
"""

import gzip
import json
import os
import textwrap

import numpy as np
import pytest

from glm.data import corpus
from glm.data import errors
from glm.data import token_stream
from glm.data import tokenizer
from glm.data import troff


# ---------------------------------------------------------------------------
# troff stripper.
# ---------------------------------------------------------------------------

_TROFF_SAMPLE = textwrap.dedent(r"""
    '\" t
    .\" A comment that must vanish.
    .de XX
    .ft B
    Macro body text that must vanish.
    ..
    .ie n \{\
    .ds Qx conditional text
    .\}
    .el .ds Qx other text
    .TH FOO 1 "May 2024" "foo 1.0" "User Commands"
    .SH NAME
    foo \- frobnicate the \fIbar\fP
    .SH DESCRIPTION
    .B foo
    reads \fBfiles\fR and
    writes \(lqstuff\(rq \(em quickly.
    .PP
    Gr\(:u\(ssen, \[u00E9]t\['e], \*(lqquoted\*(rq and a\ b.
    .TP
    .BR \-v ", " \-\-verbose
    Be chatty; see
    .BR bar (1).
    .nf
    line one
      line two
    .fi
    .TS
    tab(;);
    l l.
    key;value
    .TE
    """)

_TROFF_EXPECTED = textwrap.dedent("""\
    FOO 1 May 2024 foo 1.0 User Commands

    NAME

    foo - frobnicate the bar

    DESCRIPTION

    foo reads files and writes \u201cstuff\u201d \u2014 quickly.

    Gr\u00fc\u00dfen, \u00e9t\u00e9, \u201cquoted\u201d and a b.

    -v, --verbose
    Be chatty; see bar(1).
    line one
      line two

    key  value""")


def test_troff_to_text_strips_markup():
  assert troff.troff_to_text(_TROFF_SAMPLE) == _TROFF_EXPECTED


@pytest.mark.parametrize('line, expected', [
    (r'\fBbold\fR \f(CWmono\fP \f[I]it\f[]', 'bold mono it'),
    (r'a\-b \(en c \e d\&.', 'a-b \u2013 c \\ d.'),
    (r"\s-1SMALL\s0 \h'2n'x\v'-1'y", 'SMALL xy'),
    (r"\(*a\(*W \(co \N'65'", '\u03b1\u03a9 \u00a9 A'),
    (r'text \" trailing comment', 'text '),
    (r"\[uD800]\N'99999999'\[u110000]ok", 'ok'),  # No unencodable text.
])
def test_expand_escapes(line, expected):
  assert troff.expand_escapes(line) == expected


def test_troff_mdoc_page():
  page = '.Dd May 1, 2024\n.Dt FOO 1\n.Os\n.Sh NAME\n.Nm foo\n.Nd do things\n'
  page += '.Sh SYNOPSIS\n.Nm\n.Op Fl v\n.Ar file\n'
  text = troff.troff_to_text(page)
  assert text == 'NAME\n\nfoo - do things\n\nSYNOPSIS\n\nfoo [-v] file'


# ---------------------------------------------------------------------------
# Fake source trees and the corpus.
# ---------------------------------------------------------------------------

_EN = ('The quick brown fox jumps over the lazy dog while the tokenizer '
       'learns frequent pieces of English text. ')
_DE = 'Der schnelle braune Fuchs springt über den faulen Hund. '
_RU = 'Быстрая коричневая лиса прыгает через ленивую собаку. '
_ZH = '敏捷的棕色狐狸跳过了懒狗。这是一个中文句子。'
_JA = '素早い茶色の狐がのろまな犬を飛び越える。日本語の文です。'


def _man_page(title: str, body: str) -> str:
  paragraphs = '\n.PP\n'.join([body] * 6)
  return (f'.\\" generated for a test\n.TH {title.upper()} 1\n.SH NAME\n'
          f'{title} \\- a test page\n.SH DESCRIPTION\n{paragraphs}\n')


def _write(path: str, text: str, compress: bool = False) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = text.encode()
  with open(path, 'wb') as f:
    f.write(gzip.compress(data, mtime=0) if compress else data)


def _make_sources(root: str) -> dict[str, str]:
  """A small man tree (en, de, ru, zh_CN, ja) and a small stdlib tree."""
  man = os.path.join(root, 'man')
  bodies = {'man1': _EN, 'de/man1': _DE, 'ru/man1': _RU, 'zh_CN/man1': _ZH,
            'ja/man1': _JA}
  for folder, body in bodies.items():
    for n in range(4):
      _write(os.path.join(man, folder, f'page{n}.1.gz'),
             _man_page(f'page{n}', f'{body} Variant {n}. ' * 3), True)
  _write(os.path.join(man, 'man1', 'plain.1'),
         _man_page('plain', _EN + 'Uncompressed page.'))
  os.symlink('page0.1.gz', os.path.join(man, 'man1', 'alias.1.gz'))
  _write(os.path.join(man, 'man1', 'stub.1.gz'), '.so man1/page0.1\n', True)
  stdlib = os.path.join(root, 'stdlib')
  for n in range(6):
    _write(os.path.join(stdlib, f'mod{n}.py'), textwrap.dedent(f'''\
        """Module {n} docstring. {_EN}"""

        class Widget{n}(object):
          """A widget that frobnicates things, number {n}."""

          def spin(self, times=1):
            """Spins the widget `times` times and returns nothing."""

        if True:
          def helper{n}():
            """A helper defined under an if statement."""
        '''))
  _write(os.path.join(stdlib, 'pkg', '__init__.py'),
         '"""A package docstring about packages."""\n')
  _write(os.path.join(stdlib, 'no_docs.py'), 'x = 1\n')
  _write(os.path.join(stdlib, 'broken.py'), '"""Doc."""\nprint "py2"\n')
  _write(os.path.join(stdlib, 'test', 'test_mod.py'),
         '"""Test suite: must not be read."""\n')
  return {'man_root': man, 'stdlib_root': stdlib}


@pytest.fixture(scope='module')
def sources(tmp_path_factory) -> dict[str, object]:
  # Build arguments: the fake roots, and the natural language mix (alpha 1
  # keeps every train document once); tests/test_corpus.py covers sampling.
  return {**_make_sources(str(tmp_path_factory.mktemp('sources'))),
          'lang_alpha': 1.0}


@pytest.fixture(scope='module')
def corpus_dir(sources, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp('corpus') / 'corpus')
  corpus.build_corpus(out, **sources)
  return out


def _all_docs(corpus_dir: str) -> list[dict[str, str]]:
  return [d for split in corpus.SPLITS
          for d in corpus.iter_documents(corpus_dir, split)]


def test_build_corpus_documents(corpus_dir):
  docs = _all_docs(corpus_dir)
  ids = {d['id'] for d in docs}
  assert 'manpages/man1/plain.1' in ids
  assert 'manpages/de/man1/page0.1.gz' in ids
  assert 'python-docstrings/pkg/__init__.py' in ids
  # Symlinked aliases, `.so` stubs, docstring-less, unparsable and test
  # modules are all skipped.
  assert not {'manpages/man1/alias.1.gz', 'manpages/man1/stub.1.gz',
              'python-docstrings/no_docs.py', 'python-docstrings/broken.py',
              'python-docstrings/test/test_mod.py'} & ids
  # 21 pages, 7 docstring modules, 8 code modules (no_docs.py included).
  assert len(docs) == 21 + 7 + 8
  assert 'python-code/no_docs.py' in ids
  assert 'python-code/broken.py' not in ids  # Does not parse.
  assert {d['lang'] for d in docs} == {'en', 'de', 'ru', 'zh-CN', 'ja',
                                       'code'}
  for doc in docs:
    assert set(doc) == {'id', 'lang', 'source', 'path', 'text'}
    assert doc['text'].strip() and '\\f' not in doc['text']
  mod = next(d for d in docs if d['id'] == 'python-docstrings/mod3.py')
  assert mod['text'].startswith('Module mod3\n\nModule 3 docstring.')
  assert 'def Widget3.spin(self, times=1)\nSpins the widget' in mod['text']
  assert 'def helper3()\nA helper defined under an if' in mod['text']
  splits = {s: [d['id'] for d in corpus.iter_documents(corpus_dir, s)]
            for s in corpus.SPLITS}
  assert splits['valid'] and not set(splits['valid']) & set(splits['train'])


def test_build_corpus_is_deterministic(sources, corpus_dir, tmp_path):
  other = str(tmp_path / 'again')
  corpus.build_corpus(other, **sources)
  for name in ('manifest.json', 'train.jsonl', 'valid.jsonl'):
    with open(os.path.join(corpus_dir, name), 'rb') as a, open(
        os.path.join(other, name), 'rb') as b:
      assert a.read() == b.read(), name
  manifest = corpus.read_manifest(other)
  assert manifest['recipe'] == corpus.RECIPE_VERSION
  counts = manifest['splits']
  assert counts['train']['docs'] + counts['valid']['docs'] == 36
  assert counts['train']['langs']['de']['docs'] + counts['valid']['langs'].get(
      'de', {'docs': 0})['docs'] == 4
  files = manifest['sources']['manpages']['files']
  assert {f['path'] for f in files} >= {'man1/plain.1', 'ja/man1/page1.1.gz'}
  assert all(len(f['sha256']) == 64 for f in files)


def test_seed_changes_selection_order(sources, tmp_path):
  a = corpus.build_corpus(str(tmp_path / 'a'), max_docs_per_source=5,
                          seed=0, **sources)
  b = corpus.build_corpus(str(tmp_path / 'b'), max_docs_per_source=5,
                          seed=1, **sources)
  assert a['splits']['train']['sha256'] != b['splits']['train']['sha256']
  assert sum(s['docs'] for s in a['splits'].values()) == 15  # 5 per source


def test_language_quotas_flatten_and_fill_the_cap():
  quotas = corpus._language_quotas({'en': 10_000, 'de': 100, 'cs': 1}, 200,
                                   alpha=0.5)
  # cs saturates at its 1 file; en : de share the other 199 as 100 : 10.
  assert quotas == {'cs': 1, 'de': 18, 'en': 181}
  assert corpus._language_quotas({'en': 3, 'de': 2}, 100, 0.5) == {
      'de': 2, 'en': 3}


def test_build_corpus_is_atomic(sources, tmp_path, monkeypatch):
  out = str(tmp_path / 'corpus')

  def fail(*args, **kwargs):
    raise RuntimeError('killed mid-build')

  monkeypatch.setattr(corpus, '_write_manifest', fail)
  with pytest.raises(RuntimeError):
    corpus.build_corpus(out, **sources)
  assert not os.path.exists(out)
  assert os.listdir(tmp_path) == []  # No half-written temp dir left either.

  monkeypatch.undo()
  manifest = corpus.build_corpus(out, **sources)
  monkeypatch.setattr(corpus, '_write_manifest', fail)
  with pytest.raises(RuntimeError):
    corpus.build_corpus(out, max_docs_per_source=3, **sources)
  assert corpus.read_manifest(out) == manifest  # The old corpus survives.
  assert os.listdir(tmp_path) == ['corpus']


def test_ensure_corpus_rebuilds_only_when_stale(sources, tmp_path, capsys,
                                                monkeypatch):
  out = str(tmp_path / 'corpus')
  corpus.ensure_corpus(out, **sources)
  assert 'building corpus' in capsys.readouterr().err
  corpus.ensure_corpus(out, **sources)
  assert 'up to date' in capsys.readouterr().err
  monkeypatch.setattr(corpus, 'RECIPE_VERSION', 'glm-corpus-test')
  corpus.ensure_corpus(out, **sources)
  assert 'building corpus' in capsys.readouterr().err
  assert corpus.read_manifest(out)['recipe'] == 'glm-corpus-test'


def test_missing_sources_warn_then_fail(sources, tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.warns(UserWarning, match='apt-get install man-db'):
    corpus.build_corpus(str(tmp_path / 'a'), man_root=missing,
                        stdlib_root=sources['stdlib_root'])
  with pytest.warns(UserWarning), pytest.raises(errors.DataError,
                                                match='no source text'):
    corpus.build_corpus(str(tmp_path / 'b'), man_root=missing,
                        stdlib_root=missing)


# ---------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------

_VOCAB = 600


@pytest.fixture(scope='module')
def tok(corpus_dir, tmp_path_factory) -> tokenizer.Tokenizer:
  prefix = str(tmp_path_factory.mktemp('tok') / 'spm')
  return tokenizer.Tokenizer(
      tokenizer.train_tokenizer(corpus_dir, prefix, vocab_size=_VOCAB))


def _random_text(rng: np.random.Generator, length: int) -> str:
  code_points = rng.integers(1, 0x30000, size=length)
  return ''.join(chr(c) for c in code_points if not 0xD800 <= c < 0xE000)


def test_tokenizer_round_trips_without_unk(tok):
  rng = np.random.default_rng(0)
  texts = [
      'The quick brown fox.', 'Der Fuchs springt über den Hund.',
      'Быстрая лиса', '敏捷的棕色狐狸', '日本語の文です。', '🙂 emoji 𝔘𝔫𝔦',
      '  leading, double  spaces\tand tabs\nnew lines\r\n', '\x00\x01\x7f',
      'x' * 50, _random_text(rng, 300), _random_text(rng, 300),
  ]
  for text in texts:
    ids = tok.encode(text)
    assert tok.unk_id not in ids, text
    assert tok.decode(ids) == text


def test_tokenizer_ids_and_specials(tok):
  assert tok.vocab_size == _VOCAB
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  symbols = tokenizer.user_defined_symbols()
  assert len(symbols) == 108 and symbols[-1] == '<extra_id_99>'
  for offset, symbol in enumerate(symbols):
    assert tok.special_ids[symbol] == 3 + offset
    assert tok.encode(symbol) == [tok.special_ids[symbol]]
  ids = tok.encode('fox [gMASK]<sop>')
  assert ids[-2:] == [tok.special_ids['[gMASK]'], tok.special_ids['<sop>']]


def test_tokenizer_decode_stops_at_eos_and_skips_pad(tok):
  ids = tok.encode('The lazy dog.')
  assert tok.decode([tok.pad_id] + ids + [tok.eos_id] + tok.encode('junk')) \
      == 'The lazy dog.'
  assert tok.decode(np.asarray(ids + [tok.pad_id] * 3)) == 'The lazy dog.'


def test_train_tokenizer_is_deterministic(corpus_dir, tok, tmp_path):
  path = tokenizer.train_tokenizer(corpus_dir, str(tmp_path / 'again'),
                                   vocab_size=_VOCAB)
  with open(path, 'rb') as a, open(tok.model_path, 'rb') as b:
    assert a.read() == b.read()


def test_ensure_tokenizer_retrains_only_when_stale(corpus_dir, tmp_path,
                                                   capsys):
  prefix = str(tmp_path / 'spm')
  tokenizer.ensure_tokenizer(corpus_dir, prefix, vocab_size=_VOCAB)
  assert 'training tokenizer' in capsys.readouterr().err
  tokenizer.ensure_tokenizer(corpus_dir, prefix, vocab_size=_VOCAB)
  assert 'up to date' in capsys.readouterr().err
  with open(prefix + '.json') as f:
    sidecar = json.load(f)
  sidecar['corpus_manifest_sha256'] = '0' * 64  # As if the corpus changed.
  with open(prefix + '.json', 'w') as f:
    json.dump(sidecar, f)
  tokenizer.ensure_tokenizer(corpus_dir, prefix, vocab_size=_VOCAB)
  assert 'training tokenizer' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['spm.json', 'spm.model',
                                          'spm.vocab']


# ---------------------------------------------------------------------------
# Causal-LM batches.
# ---------------------------------------------------------------------------


def test_token_stream_is_docs_plus_eos_and_cached(corpus_dir, tok):
  stream = token_stream.load_token_stream(corpus_dir, tok, 'train')
  path = token_stream.stream_cache_path(corpus_dir, tok, 'train')
  assert os.path.dirname(path) == os.path.dirname(tok.model_path)
  assert stream.dtype == np.int32 and stream[-1] == tok.eos_id
  docs = list(corpus.iter_documents(corpus_dir, 'train'))
  assert int((stream == tok.eos_id).sum()) == len(docs)
  first = stream[:int(np.argmax(stream == tok.eos_id))]
  assert tok.decode(first) == docs[0]['text']
  np.testing.assert_array_equal(np.load(path), stream)
  np.testing.assert_array_equal(
      token_stream.load_token_stream(corpus_dir, tok, 'train'), stream)
