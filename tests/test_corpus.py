"""Tests of the ROOTS-style corpus recipe: dedup, redaction, language sampling,
the build on small injected source trees, the data card, fertility and the
`glm data` report commands."""

import gzip
import json
import os
import textwrap

import numpy as np
import pytest

from glm.data import corpus
from glm.data import data_card
from glm.data import dedup
from glm.data import fertility
from glm.data import redact
from glm.data import report_cli
from glm.data import sampling
from glm.data import sources
from glm.data import tokenizer

# ---------------------------------------------------------------------------
# Deduplication.
# ---------------------------------------------------------------------------

_WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu '
          'nu xi omicron pi rho sigma tau upsilon phi chi psi omega').split()


def _random_words(seed: int, n: int, words=_WORDS) -> str:
  rng = np.random.default_rng(seed)
  return ' '.join(words[i] for i in rng.integers(0, len(words), size=n))


def _doc(doc_id: str, text: str, lang: str = 'en') -> dict[str, str]:
  return {'id': doc_id, 'lang': lang, 'source': 'test', 'path': doc_id,
          'text': text}


def test_exact_dedup_normalises_case_and_whitespace():
  text = _random_words(0, 200)
  docs = [_doc('a', text), _doc('b', '  ' + text.upper().replace(' ', '\n ')),
          _doc('c', _random_words(1, 200))]
  kept, stats = dedup.deduplicate(docs)
  assert [d['id'] for d in kept] == ['a', 'c']
  assert stats['removed'] == {'exact': {'en': 1}, 'near': {}}
  assert stats['pairs'] == [{'id': 'b', 'duplicate_of': 'a', 'stage': 'exact',
                             'jaccard': 1.0}]


def test_near_dedup_word_shingles_and_threshold():
  base = _random_words(2, 400).split()
  edited = list(base)
  edited[200] = 'CHANGED'  # One word: 5 of ~396 shingles differ.
  rewritten = list(base[:150]) + _random_words(3, 250).split()
  docs = [_doc('orig', ' '.join(base)), _doc('edit', ' '.join(edited), 'de'),
          _doc('rewrite', ' '.join(rewritten))]
  kept, stats = dedup.deduplicate(docs, threshold=0.8)
  assert [d['id'] for d in kept] == ['orig', 'rewrite']
  assert stats['removed']['near'] == {'de': 1}
  assert stats['pairs'][0]['duplicate_of'] == 'orig'
  assert 0.8 <= stats['pairs'][0]['jaccard'] < 1.0
  # A stricter threshold keeps the edited copy.
  kept, _ = dedup.deduplicate(docs, threshold=0.99)
  assert len(kept) == 3
  # Deterministic: the same inputs give the same result.
  assert dedup.deduplicate(docs)[1] == dedup.deduplicate(docs)[1]


def test_near_dedup_uses_characters_for_cjk():
  chars = '的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动'
  rng = np.random.default_rng(4)
  text = ''.join(chars[i] for i in rng.integers(0, len(chars), size=600))
  near = text[:300] + '猫' + text[301:]
  assert dedup.is_cjk(text) and not dedup.is_cjk('plain english words')
  # As words, each text is a single token: shingles would not overlap.
  assert dedup.jaccard(dedup.shingles(text, unit='word'),
                       dedup.shingles(near, unit='word')) == 0.0
  assert dedup.jaccard(dedup.shingles(text), dedup.shingles(near)) > 0.95
  kept, stats = dedup.deduplicate([_doc('zh1', text, 'zh-CN'),
                                   _doc('zh2', near, 'zh-CN')])
  assert [d['id'] for d in kept] == ['zh1']
  assert stats['removed']['near'] == {'zh-CN': 1}


def test_minhash_estimates_jaccard_and_lsh_bands_fit_threshold():
  a = dedup.shingles(_random_words(5, 3000, _WORDS + [str(i) for i in
                                                       range(300)]))
  b = np.union1d(a[: a.size * 3 // 4], np.arange(a.size // 4, dtype=np.uint64))
  true = dedup.jaccard(a, b)
  estimate = float(np.mean(dedup.minhash(a, num_perm=256) ==
                           dedup.minhash(b, num_perm=256)))
  assert abs(estimate - true) < 0.08
  bands, rows = dedup.lsh_bands(0.8, 128)
  assert bands * rows <= 128
  assert 0.65 < (1 / bands)**(1 / rows) < 0.85  # S-curve midpoint near t.


# ---------------------------------------------------------------------------
# Redaction.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('text,expected,counts', [
    ('Write to jane.doe+lists@mail.example-corp.de today.',
     'Write to <EMAIL> today.', (1, 0, 0)),
    ('Report bugs: <bug-coreutils@gnu.org>.', 'Report bugs: <<EMAIL>>.',
     (1, 0, 0)),
    ('server 8.8.8.8:53 and host 192.168.1.20/24',
     'server <IP>:53 and host <IP>/24', (0, 2, 0)),
    ('peer 2a00:1450:4001:82b::200e up', 'peer <IP> up', (0, 1, 0)),
    ('call +49 30 1234567 or (555) 123-4567 or 555-123-4567',
     'call <PHONE> or <PHONE> or <PHONE>', (0, 0, 3)),
])
def test_redaction_replaces_identifiers(text, expected, counts):
  out, found = redact.redact(text)
  assert out == expected
  assert (found['email'], found['ip'], found['phone']) == counts


@pytest.mark.parametrize('text', [
    'Python 3.11.7 on 2024-01-15 at 12:30:45, or 15.01.2024',
    'kernel 2.6.32.71.1 and version 1.2.3.4 and v10.0.0.1',
    'mask 255.255.255.0, wildcard 0.0.0.255, bind 0.0.0.0, lo 127.0.0.1',
    'docs 192.0.2.1 and 2001:db8::1 and ::1 and fe80::1',
    'slice a[1::2], C++ std::vector, MAC 00:1a:2b:3c:4d:5e',
    'see user@example.com or root@localhost; count 1234567890; +1 2',
    'offset +0100 and ids 123-45 and 10-20-30',
])
def test_redaction_keeps_versions_dates_and_reserved_values(text):
  out, found = redact.redact(text)
  assert out == text and sum(found.values()) == 0


def test_redact_documents_counts_per_language():
  docs = [_doc('a', 'mail x@host.org', 'de'), _doc('b', 'ip 1.2.3.4', 'de'),
          _doc('c', 'mail y@z.net and 5.6.7.8', 'ru')]
  out, stats = redact.redact_documents(docs)
  assert stats == {'email': {'de': 1, 'ru': 1}, 'ip': {'de': 1, 'ru': 1},
                   'phone': {}}
  assert out[2]['text'] == 'mail <EMAIL> and <IP>' and docs[2]['text'] != \
      out[2]['text']


# ---------------------------------------------------------------------------
# Language sampling.
# ---------------------------------------------------------------------------


def test_language_probabilities_follow_the_exponent():
  sizes = {'en': 10_000, 'de': 100, 'fi': 1}
  p = sampling.language_probabilities(sizes, 0.5)
  assert p == pytest.approx({'en': 100 / 111, 'de': 10 / 111, 'fi': 1 / 111})
  assert sampling.language_probabilities(sizes, 0.0) == pytest.approx(
      {'en': 1 / 3, 'de': 1 / 3, 'fi': 1 / 3})
  natural = sampling.language_probabilities(sizes, 1.0)
  assert natural['fi'] == pytest.approx(1 / 10_101)
  # alpha 0.3 (XGLM): en 10000^.3 = 15.85, de 100^.3 = 3.98, fi 1.
  assert sampling.language_probabilities(sizes, 0.3)['de'] == pytest.approx(
      100**0.3 / (10_000**0.3 + 100**0.3 + 1))
  with pytest.raises(ValueError, match='alpha'):
    sampling.language_probabilities(sizes, -1.0)


def test_target_sizes_cap_repetition_and_keep_the_total():
  sizes = {'en': 10_000, 'de': 100, 'fi': 1}
  targets = sampling.target_sizes(sizes, 0.5, max_repeat=4)
  assert targets['fi'] == 4 and targets['de'] == 400  # Both capped.
  assert targets['en'] == pytest.approx(10_101 - 404)
  assert sum(targets.values()) == pytest.approx(sum(sizes.values()))
  uncapped = sampling.target_sizes({'a': 400, 'b': 100}, 0.5, max_repeat=10)
  assert uncapped == pytest.approx({'a': 500 * 2 / 3, 'b': 500 / 3})


def test_sample_by_language_downsamples_and_repeats():
  docs = ([_doc(f'en{i}', 'e' * 100) for i in range(40)] +
          [_doc(f'de{i}', 'd' * 100, 'de') for i in range(4)])
  same, stats = sampling.sample_by_language(docs, alpha=1.0)
  assert sorted(d['id'] for d in same) == sorted(d['id'] for d in docs)
  assert stats['langs']['de']['share_after'] == pytest.approx(4 / 44)
  out, stats = sampling.sample_by_language(docs, alpha=0.0, max_repeat=8,
                                           seed=1)
  # Uniform: each language gets 2200 bytes: en 22 of 40 docs, de 5.5 copies.
  ids = [d['id'] for d in out]
  assert len(ids) == len(set(ids))
  assert sum(i.startswith('en') for i in ids) == 22
  assert sum(i.startswith('de') for i in ids) in (22, 23)
  assert 'de0#2' in ids and 'de0#5' in ids and not any('en' in i and '#' in i
                                                       for i in ids)
  assert stats['langs']['de']['repeat'] == pytest.approx(
      stats['langs']['de']['bytes_after'] / 400)
  assert stats['langs']['en']['share_after'] == pytest.approx(0.5, abs=0.03)
  again, _ = sampling.sample_by_language(docs, alpha=0.0, max_repeat=8,
                                         seed=1)
  assert again == out
  other, _ = sampling.sample_by_language(docs, alpha=0.0, max_repeat=8,
                                         seed=2)
  assert {d['id'] for d in other} != set(ids)


# ---------------------------------------------------------------------------
# The build on injected source trees.
# ---------------------------------------------------------------------------

_LANG_WORDS = {
    'man1': 'the file is read when a command runs and prints the value of '
            'each option to standard output with error messages',
    'de/man1': 'die Datei wird gelesen wenn ein Befehl läuft und gibt den Wert '
               'jeder Option auf der Standardausgabe mit Fehlermeldungen aus',
    'ru/man1': 'файл читается когда команда работает и выводит значение '
               'каждого параметра на стандартный вывод с сообщениями',
    'fr/man1': 'le fichier est lu quand une commande tourne et affiche la '
               'valeur de chaque option sur la sortie standard avec erreurs',
}
_CJK_CHARS = {'zh_CN/man1': '文件在命令运行时读取并打印每个选项的值到标准输出错误信息',
              'ja/man1': 'ファイルはコマンドの実行時に読み込まれ各オプションの値を標準出力に表示します'}


def _write(path: str, text: str, compress: bool = True) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(gzip.compress(text.encode(), mtime=0) if compress
            else text.encode())


def _page_body(folder: str, seed: int) -> str:
  rng = np.random.default_rng(seed)
  if folder in _CJK_CHARS:
    chars = _CJK_CHARS[folder]
    return '\n.PP\n'.join(
        ''.join(chars[i] for i in rng.integers(0, len(chars), 60)) + '。'
        for _ in range(12))
  words = _LANG_WORDS[folder].split()
  return '\n.PP\n'.join(
      ' '.join(words[i] for i in rng.integers(0, len(words), 25)) + '.'
      for _ in range(12))


def _make_tree(root: str) -> dict[str, str]:
  """Manual pages in 6 languages (one exact and one near duplicate, PII in
  one page) and a small standard library."""
  man = os.path.join(root, 'man')
  folders = list(_LANG_WORDS) + list(_CJK_CHARS)
  for f_index, folder in enumerate(folders):
    for n in range(6):
      body = _page_body(folder, 100 * f_index + n)
      _write(os.path.join(man, folder, f'cmd{n}.1.gz'),
             f'.TH CMD{n} 1\n.SH NAME\ncmd{n} \\- tool\n.SH DESCRIPTION\n'
             f'{body}\n')
  page = gzip.decompress(open(os.path.join(man, 'man1', 'cmd0.1.gz'),
                              'rb').read()).decode()
  _write(os.path.join(man, 'man1', 'copy.1'), page, compress=False)
  near = page.replace('.SH DESCRIPTION\n', '.SH DESCRIPTION\nextra words\n')
  _write(os.path.join(man, 'man1', 'near.1.gz'), near)
  _write(os.path.join(man, 'man1', 'author.1.gz'),
         '.TH AUTHOR 1\n.SH AUTHOR\nWritten by Jo <jo.writer@mail.org> at '
         'host 203.1.113.7, version 4.2.1.\n')
  stdlib = os.path.join(root, 'stdlib')
  for n in range(5):
    _write(os.path.join(stdlib, f'mod{n}.py'), textwrap.dedent(f'''\
        """Module {n}: {_random_words(n, 30)}."""

        def f{n}(x):
          """Returns x plus {n}; {_random_words(n + 10, 20)}."""
          return x + {n}
        '''), compress=False)
  return {'man_root': man, 'stdlib_root': stdlib}


@pytest.fixture(scope='module')
def tree(tmp_path_factory) -> dict[str, str]:
  return _make_tree(str(tmp_path_factory.mktemp('tree')))


@pytest.fixture(scope='module')
def built(tree, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp('built') / 'corpus')
  corpus.build_corpus(out, **tree)
  return out


def _docs(corpus_dir: str) -> list[dict[str, str]]:
  return [d for s in corpus.SPLITS for d in corpus.iter_documents(corpus_dir, s)]


def test_build_dedups_redacts_and_samples(built):
  manifest = corpus.read_manifest(built)
  assert manifest['recipe'] == corpus.RECIPE_VERSION == 'glm-corpus-v2'
  assert manifest['config']['lang_alpha'] == corpus.DEFAULT_LANG_ALPHA
  removed = {p['id']: p for p in manifest['dedup']['pairs']}
  assert removed['manpages/man1/copy.1']['stage'] == 'exact'
  assert removed['manpages/man1/near.1.gz']['stage'] == 'near'
  assert manifest['dedup']['removed']['exact'] == {'en': 1}
  docs = _docs(built)
  ids = {d['id'] for d in docs}
  assert not {'manpages/man1/copy.1', 'manpages/man1/near.1.gz'} & ids
  assert manifest['redaction']['email'] == {'en': 1}
  assert manifest['redaction']['ip'] == {'en': 1}
  author = [d for d in docs if d['id'].startswith('manpages/man1/author')]
  assert author and all('<EMAIL>' in d['text'] and '<IP>' in d['text']
                        and 'version 4.2.1' in d['text'] for d in author)
  assert not any('jo.writer@' in d['text'] for d in docs)
  assert {d['lang'] for d in docs} == {'en', 'de', 'ru', 'fr', 'zh-CN', 'ja',
                                       'code'}
  code = [d for d in docs if d['lang'] == 'code']
  assert code and all(d['source'] == 'python-code' for d in code)
  assert any('def f3(x):\n  """Returns x plus 3' in d['text'] for d in code)
  # Every language with >= 5 documents has held-out text.
  valid_langs = {d['lang'] for d in corpus.iter_documents(built, 'valid')}
  assert valid_langs >= {'en', 'de', 'ru', 'fr', 'zh-CN', 'ja', 'code'}
  # Sampling: p follows bytes**alpha and the realised shares sum to one.
  langs = manifest['sampling']['langs']
  alpha = manifest['sampling']['alpha']
  norm = sum(v['bytes']**alpha for v in langs.values())
  for lang, v in langs.items():
    assert v['p'] == pytest.approx(v['bytes']**alpha / norm)
  assert sum(v['share_after'] for v in langs.values()) == pytest.approx(1.0)
  train = manifest['splits']['train']['langs']
  for lang, v in langs.items():
    assert train[lang]['bytes'] == v['bytes_after']
  by_size = sorted(langs, key=lambda lang: langs[lang]['bytes'])
  # Flattened: the largest language shrinks, the smallest is repeated.
  assert langs[by_size[-1]]['repeat'] < 1 < langs[by_size[0]]['repeat']
  assert langs[by_size[0]]['repeat'] <= manifest['sampling']['max_repeat']


def test_build_is_deterministic_and_rebuilt_on_recipe_change(
    tree, built, tmp_path, monkeypatch, capsys):
  other = str(tmp_path / 'again')
  corpus.build_corpus(other, **tree)
  for name in ('manifest.json', 'train.jsonl', 'valid.jsonl'):
    with open(os.path.join(built, name), 'rb') as a, open(
        os.path.join(other, name), 'rb') as b:
      assert a.read() == b.read(), name
  corpus.ensure_corpus(other, **tree)
  assert 'up to date' in capsys.readouterr().err
  corpus.ensure_corpus(other, lang_alpha=0.7, **tree)
  assert 'build config changed' in capsys.readouterr().err
  assert corpus.read_manifest(other)['sampling']['alpha'] == 0.7
  monkeypatch.setattr(corpus, 'RECIPE_VERSION', 'glm-corpus-next')
  corpus.ensure_corpus(other, lang_alpha=0.7, **tree)
  assert 'recipe glm-corpus-v2 != glm-corpus-next' in capsys.readouterr().err


def test_build_config_errors_name_the_value(tree, tmp_path):
  with pytest.raises(ValueError, match='dedup_threshold=1.5'):
    corpus.build_corpus(str(tmp_path / 'a'), dedup_threshold=1.5, **tree)
  with pytest.raises(ValueError, match='max_repeat=0'):
    corpus.build_corpus(str(tmp_path / 'b'), max_repeat=0, **tree)
  with pytest.raises(ValueError, match=r"unknown sources \['books'\]"):
    corpus.build_corpus(str(tmp_path / 'c'), max_docs_per_source={'books': 1},
                        **tree)


def test_few_man_languages_warn_with_packages(tree, tmp_path, monkeypatch):
  english_only = str(tmp_path / 'man')
  _write(os.path.join(english_only, 'man1', 'a.1.gz'),
         '.TH A 1\n.SH NAME\na \\- a tool that does one thing well\n')
  monkeypatch.setattr(sources, 'DEFAULT_MAN_ROOT', english_only)
  with pytest.warns(UserWarning, match='manpages-ru .*manpages-ja'):
    corpus.build_corpus(str(tmp_path / 'c'),
                        stdlib_root=tree['stdlib_root'])


# ---------------------------------------------------------------------------
# Data card, fertility and the report commands.
# ---------------------------------------------------------------------------

_VOCAB = 600


@pytest.fixture(scope='module')
def tok(built, tmp_path_factory) -> tokenizer.Tokenizer:
  prefix = str(tmp_path_factory.mktemp('tok') / 'spm')
  return tokenizer.Tokenizer(
      tokenizer.train_tokenizer(built, prefix, vocab_size=_VOCAB))


def test_data_card_contents(built, tok, tmp_path):
  table = data_card.write_data_card(built, tok, out_dir=str(tmp_path))
  with open(tmp_path / data_card.CARD_JSON, encoding='utf-8') as f:
    card = json.load(f)
  rows = card['languages']
  assert set(rows) == {'en', 'de', 'ru', 'fr', 'zh-CN', 'ja', 'code'}
  train = list(corpus.iter_documents(built, 'train'))
  for lang, row in rows.items():
    lang_docs = [d for d in train if d['lang'] == lang]
    assert row['train_docs'] == len(lang_docs)
    assert row['train_bytes'] == sum(len(d['text'].encode())
                                     for d in lang_docs)
    assert row['train_tokens'] == sum(len(tok.encode(d['text']))
                                      for d in lang_docs)
  assert rows['ru']['script'] == 'Cyrillic' and rows['ja']['script'] == 'CJK'
  assert rows['de']['script'] == 'Latin' and rows['code']['script'] == 'code'
  assert rows['en']['dedup_removed'] == 2 and rows['en']['redactions'] == 2
  assert sum(r['share_after'] for r in rows.values()) == pytest.approx(1.0)
  assert card['total']['train_docs'] == len(train)
  assert card['sampling']['alpha'] == corpus.DEFAULT_LANG_ALPHA
  lines = table.splitlines()
  assert lines[0].split()[:4] == ['lang', 'script', 'docs', 'train_docs']
  assert any(line.startswith('code ') for line in lines)
  with open(tmp_path / data_card.CARD_MD, encoding='utf-8') as f:
    markdown = f.read()
  assert '| ru | Cyrillic |' in markdown and 'Dedup: ' in markdown
  no_tok = data_card.card_rows(built)
  assert no_tok['en']['train_tokens'] is None


def test_fertility_report_on_a_tiny_corpus(built, tok, tmp_path):
  table = fertility.fertility_report(
      built, tok.model_path, str(tmp_path), min_train_chars=2000,
      min_eval_chars=300)
  with open(tmp_path / fertility.REPORT_JSON, encoding='utf-8') as f:
    report = json.load(f)
  rows = report['languages']
  measured = {l: r for l, r in rows.items() if 'skipped' not in r}
  assert {'en', 'de', 'ru', 'ja'} <= set(measured)
  for lang, row in measured.items():
    assert row['ratio'] == pytest.approx(row['multi_tokens'] /
                                         row['mono_tokens'])
    assert row['flagged'] == (row['ratio'] > 1.10)
    assert row['mono_vocab'] <= _VOCAB
    assert row['multi_tokens_per_char'] > 0 and row['mono_tokens_per_word'] > 0
  assert rows['ja']['measure'] == 'tokens/char'
  assert rows['de']['measure'] == 'tokens/word'
  # A language too small for the vocab gets the largest one its text allows.
  path, vocab = fertility.train_monolingual(
      ['tiny text with few words', 'few words again'],
      str(tmp_path / 'mono' / 'tiny'), 4096)
  assert 367 < vocab < 4096 and tokenizer.Tokenizer(path).vocab_size == vocab
  assert report['flagged'] == sorted(l for l, r in measured.items()
                                     if r['flagged'])
  assert table.splitlines()[0].split()[:3] == ['lang', 'measure', 'multi']
  strict = fertility.fertility_report(built, tok.model_path,
                                      str(tmp_path / 'b'), languages=['de'])
  assert 'skipped: de (' in strict  # Below the default 20,000 chars.
  with pytest.raises(ValueError, match=r"\['xx'\] are not in corpus"):
    fertility.fertility_report(built, tok.model_path, str(tmp_path),
                               languages=['xx'])


def test_report_cli_card_and_fertility(tree, tmp_path, monkeypatch, capsys):
  original = corpus.default_sources
  monkeypatch.setattr(
      corpus, 'default_sources',
      lambda man_root=None, stdlib_root=None: original(
          man_root or tree['man_root'], stdlib_root or tree['stdlib_root']))
  data_dir = str(tmp_path / 'data')
  assert report_cli.main(['card', '--data_dir', data_dir,
                          '--vocab_size', str(_VOCAB)]) == 0
  out = capsys.readouterr().out
  assert 'lang' in out and os.path.exists(
      os.path.join(data_dir, 'corpus', data_card.CARD_JSON))
  assert os.path.exists(os.path.join(data_dir, f'spm_{_VOCAB}.model'))
  assert report_cli.main(['fertility', '--data_dir', data_dir, '--vocab_size',
                          str(_VOCAB), '--languages', 'en,ja']) == 0
  with open(os.path.join(data_dir, fertility.REPORT_JSON)) as f:
    assert set(json.load(f)['languages']) == {'en', 'ja'}
  with pytest.raises(ValueError, match='unrecognized arguments: --bogus'):
    report_cli.main(['card', '--bogus'])
  with pytest.raises(ValueError, match='no command given'):
    report_cli.main([])
  with pytest.raises(ValueError, match='--tokenizer=/no/such.model'):
    report_cli.main(['fertility', '--tokenizer', '/no/such.model'])
