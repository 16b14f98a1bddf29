"""The data card of a corpus: per language (and code) what it holds.

`write_data_card(corpus_dir, tokenizer)` reads the corpus files and manifest
and writes `data_card.json` and `data_card.md` next to them. One row per
language ('code' is the Python sources), with

  script        dominant script of its text (Latin, Cyrillic, CJK, Hangul, ...)
  docs          unique documents after dedup (train + valid)
  train_docs    train documents after language sampling (copies counted)
  valid_docs    held-out documents (never resampled)
  train_bytes   UTF-8 bytes of the train split after sampling
  train_tokens  tokens of the train split (only with a tokenizer)
  share_before  byte share of the train split before sampling
  p             the sampling distribution p_l ~ bytes_l**alpha
  share_after   byte share after sampling (what training sees)
  repeat        bytes after / bytes before sampling
  dedup_removed exact + near duplicates removed
  redactions    e-mail + IP + phone placeholders inserted

Usage:
  table = data_card.write_data_card(corpus_dir, tokenizer.Tokenizer(path))
  print(table)
"""

from collections.abc import Sequence
import collections
import json
import os
import re

from glm.data import corpus
from glm.data.errors import DataError
from glm.data import tokenizer as tokenizer_lib


CARD_JSON = 'data_card.json'
CARD_MD = 'data_card.md'
# Letters of each script named in the card.
_SCRIPTS = {
    'Latin': re.compile('[A-Za-z\u00c0-\u024f]'),
    'Cyrillic': re.compile('[\u0400-\u04ff]'),
    'Greek': re.compile('[\u0370-\u03ff]'),
    'CJK': re.compile('[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]'),
    'Hangul': re.compile('[\u1100-\u11ff\uac00-\ud7af]'),
    'Arabic': re.compile('[\u0600-\u06ff]'),
}
_COLUMNS = ('lang', 'script', 'docs', 'train_docs', 'valid_docs',
            'train_bytes', 'train_tokens', 'share_before', 'p', 'share_after',
            'repeat', 'dedup_removed', 'redactions')


def _script(text: str) -> str:
  """The text's script: the most frequent non-Latin one when it has >= 25%.

  Translated manual pages keep command names and options in Latin letters
  (and a Japanese word is fewer letters than an English one), so a plain
  majority would call most of them Latin.
  """
  counts = {name: len(pattern.findall(text))
            for name, pattern in _SCRIPTS.items()}
  letters = sum(counts.values())
  if not letters:
    return '-'
  other = max((n, name) for name, n in counts.items() if name != 'Latin')
  return other[1] if other[0] >= 0.25 * letters else 'Latin'


def _base_id(doc_id: str) -> str:
  """'x#3' (a sampled copy) -> 'x'."""
  return re.sub(r'#\d+$', '', doc_id)


def card_rows(corpus_dir: str,
              tokenizer: tokenizer_lib.Tokenizer | None = None
              ) -> dict[str, dict[str, object]]:
  """{lang: row} (see the module docstring), plus a 'total' row."""
  manifest = corpus.read_manifest(corpus_dir)
  if manifest is None or 'sampling' not in manifest:
    raise DataError(
        f'{corpus_dir=} has no manifest with sampling stats; build it with '
        'glm.data.corpus.ensure_corpus (recipe glm-corpus-v2 or later).')
  rows = collections.defaultdict(lambda: dict.fromkeys(_COLUMNS[2:], 0))
  unique = collections.defaultdict(set)
  texts = collections.defaultdict(list)
  unique_texts = collections.defaultdict(list)
  for split in corpus.SPLITS:
    for doc in corpus.iter_documents(corpus_dir, split):
      row = rows[doc['lang']]
      unique[doc['lang']].add(_base_id(doc['id']))
      row[f'{split}_docs'] += 1
      if split == 'train':
        row['train_bytes'] += len(doc['text'].encode())
        texts[doc['lang']].append(doc['text'])
      if split == 'valid' or doc['id'] == _base_id(doc['id']):
        unique_texts[doc['lang']].append(doc['text'])
  sampling = manifest['sampling']['langs']
  dedup = manifest['dedup']['removed']
  redaction = manifest['redaction']
  for lang, row in rows.items():
    row['docs'] = len(unique[lang])
    if tokenizer is not None:
      row['train_tokens'] = sum(
          len(ids) for ids in tokenizer.encode_batch(texts[lang]))
    else:
      row['train_tokens'] = None
    stats = sampling.get(lang, {})
    row['share_before'] = stats.get('share', 0.0)
    row['p'] = stats.get('p', 0.0)
    row['share_after'] = stats.get('share_after', 0.0)
    row['repeat'] = stats.get('repeat', 0.0)
    row['dedup_removed'] = sum(by_lang.get(lang, 0)
                               for by_lang in dedup.values())
    row['redactions'] = sum(by_lang.get(lang, 0)
                            for by_lang in redaction.values())
    row['script'] = ('code' if lang == 'code'
                     else _script('\n'.join(unique_texts[lang])))
  ordered = sorted(rows, key=lambda l: (-rows[l]['share_after'], l))
  out = {lang: {'lang': lang, **rows[lang]} for lang in ordered}
  total = {'lang': 'total', 'script': f'{len(out)} langs'}
  for column in _COLUMNS[2:]:
    values = [row[column] for row in out.values()]
    if column == 'repeat':
      total[column] = (sum(r['train_bytes'] for r in out.values())
                       / max(manifest['sampling'].get('bytes_before', 1), 1))
    elif all(v is None for v in values):
      total[column] = None
    else:
      total[column] = sum(values)
  out['total'] = total
  return out


def _format(column: str, value: object) -> str:
  if value is None:
    return '-'
  if column in ('share_before', 'p', 'share_after'):
    return f'{100 * value:.1f}%'
  if column == 'repeat':
    return f'{value:.2f}x'
  return str(value)


def format_table(rows: dict[str, dict[str, object]],
                 columns: Sequence[str] = _COLUMNS, markdown: bool = False
                 ) -> str:
  """Rows as an aligned text table (or a Markdown table)."""
  cells = [list(columns)] + [[_format(c, row[c]) for c in columns]
                             for row in rows.values()]
  if markdown:
    lines = ['| ' + ' | '.join(line) + ' |' for line in cells]
    lines.insert(1, '|' + '|'.join(
        ' --- ' if i < 2 else ' ---: ' for i in range(len(columns))) + '|')
    return '\n'.join(lines)
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  lines = []
  for line in cells:
    lines.append('  '.join(cell.ljust(w) if i < 2 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(line, widths))))
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def write_data_card(corpus_dir: str,
                    tokenizer: tokenizer_lib.Tokenizer | None = None,
                    out_dir: str | None = None) -> str:
  """Writes data_card.json / data_card.md and returns the printable table.

  Args:
    corpus_dir: a corpus written by `corpus.build_corpus`.
    tokenizer: counts train tokens per language when given.
    out_dir: where to write (default: `corpus_dir`).

  Returns:
    The card as an aligned text table.
  """
  rows = card_rows(corpus_dir, tokenizer)
  manifest = corpus.read_manifest(corpus_dir)
  sampling = manifest['sampling']
  dedup = manifest['dedup']
  card = {
      'corpus_dir': os.path.abspath(corpus_dir),
      'recipe': manifest['recipe'],
      'manifest_sha256': corpus.manifest_sha256(corpus_dir),
      'tokenizer': None if tokenizer is None else tokenizer.model_path,
      'sampling': {'alpha': sampling['alpha'],
                   'max_repeat': sampling['max_repeat']},
      'dedup': {k: dedup[k] for k in ('docs_in', 'docs_out', 'removed',
                                      'threshold', 'num_perm', 'bands',
                                      'rows', 'ngram')},
      'redaction': manifest['redaction'],
      'languages': {k: v for k, v in rows.items() if k != 'total'},
      'total': rows['total'],
  }
  out_dir = out_dir or corpus_dir
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CARD_JSON), 'w', encoding='utf-8') as f:
    json.dump(card, f, indent=1, sort_keys=True, ensure_ascii=False)
    f.write('\n')
  removed = {stage: sum(v.values()) for stage, v in dedup['removed'].items()}
  redactions = {kind: sum(v.values())
                for kind, v in manifest['redaction'].items()}
  markdown = '\n'.join([
      f'# Data card: {os.path.basename(os.path.abspath(corpus_dir))}',
      '',
      f"Recipe `{manifest['recipe']}`, manifest sha256 "
      f"`{card['manifest_sha256'][:16]}`, tokenizer "
      f"`{card['tokenizer'] or 'none'}`.",
      '',
      f"- Dedup: {dedup['docs_in']} -> {dedup['docs_out']} documents "
      f"(exact {removed['exact']}, near {removed['near']} at Jaccard >= "
      f"{dedup['threshold']}, MinHash {dedup['num_perm']} = "
      f"{dedup['bands']} bands x {dedup['rows']} rows).",
      f'- Redaction placeholders: {redactions}.',
      f"- Language sampling of the train split: p_l ~ bytes_l^"
      f"{sampling['alpha']}, at most {sampling['max_repeat']} copies; "
      '`share_after` is what training sees, `valid` is not resampled.',
      '',
      format_table(rows, markdown=True),
      '',
  ])
  with open(os.path.join(out_dir, CARD_MD), 'w', encoding='utf-8') as f:
    f.write(markdown)
  return format_table(rows)
