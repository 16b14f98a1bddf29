"""Tokenizer fertility per language, with BLOOM's monolingual comparison.

Fertility is tokens per word (whitespace-split words) and tokens per
character (non-whitespace characters). Chinese and Japanese do not separate
words with spaces, so their measure is tokens per character; every other
language (and code) is measured per word.

BLOOM's check (BLOOM paper, tokenizer section): the multilingual tokenizer
should not be more than 10% worse than a tokenizer trained on that language
alone. For every language with enough text we train a monolingual
SentencePiece model with the same recipe (`tokenizer.train_tokenizer`) and
the same vocab size on the language's unique train documents (capped at
`max_train_chars`), then count tokens of both on its held-out (valid)
documents. ratio = multilingual tokens / monolingual tokens (equal to the
ratio of either fertility, since both see the same text); a language is
flagged when ratio > 1.10.

Vocab: when a language's text is too small for the full vocab, SentencePiece
stops with 'Vocabulary size too high ... <= N': we then use N, the largest
vocab its text supports (every merge it can learn), and record it as
`mono_vocab`. Languages below `min_train_chars` of train text or
`min_eval_chars` of held-out text are listed as skipped, with the reason.

Usage:
  table = fertility.fertility_report(corpus_dir, 'spm_4096.model', out_dir)
"""

from collections.abc import Sequence
import collections
import json
import os
import re
import tempfile

from glm.data import corpus
from glm.data.errors import DataError
from glm.data import tokenizer as tokenizer_lib


FLAG_RATIO = 1.10
REPORT_JSON = 'fertility.json'
REPORT_MD = 'fertility.md'
DEFAULT_MAX_TRAIN_CHARS = 200_000
DEFAULT_MAX_EVAL_CHARS = 50_000
DEFAULT_MIN_TRAIN_CHARS = 20_000
DEFAULT_MIN_EVAL_CHARS = 2_000
# Languages measured per character (no spaces between words).
_PER_CHAR_LANGS = re.compile(r'^(zh|ja)(-|$)')
_TOO_HIGH_RE = re.compile(r'Vocabulary size too high \(\d+\)\. '
                          r'Please set it to a value <= (\d+)')


def _per_char(lang: str) -> bool:
  return bool(_PER_CHAR_LANGS.match(lang))


def _base_id(doc_id: str) -> str:
  return re.sub(r'#\d+$', '', doc_id)


def _capped(texts: Sequence[str], max_chars: int) -> list[str]:
  """Leading texts up to `max_chars` characters (the last one cut)."""
  out, total = [], 0
  for text in texts:
    if total >= max_chars:
      break
    out.append(text[:max_chars - total])
    total += len(out[-1])
  return out


def _language_texts(corpus_dir: str) -> dict[str, dict[str, list[str]]]:
  """{lang: {'train': unique train texts, 'valid': held-out texts}}."""
  texts = collections.defaultdict(lambda: {'train': [], 'valid': []})
  for split in corpus.SPLITS:
    for doc in corpus.iter_documents(corpus_dir, split):
      if doc['id'] == _base_id(doc['id']):  # Sampled copies counted once.
        texts[doc['lang']][split].append(doc['text'])
  return dict(sorted(texts.items()))


def train_monolingual(texts: Sequence[str], out_prefix: str,
                      vocab_size: int) -> tuple[str, int]:
  """Trains the project's BPE recipe on `texts` alone.

  Returns:
    (model path, vocab size used): `vocab_size`, or the largest vocab the
    text supports when it is smaller (see the module docstring).
  """
  corpus_dir = out_prefix + '.corpus'
  os.makedirs(corpus_dir, exist_ok=True)
  with open(os.path.join(corpus_dir, 'train.jsonl'), 'w',
            encoding='utf-8') as f:
    for i, text in enumerate(texts):
      f.write(json.dumps({'id': str(i), 'lang': '', 'source': 'fertility',
                          'path': '', 'text': text}, ensure_ascii=False))
      f.write('\n')
  # train_tokenizer names the corpus by its manifest hash.
  with open(os.path.join(corpus_dir, corpus.MANIFEST_NAME), 'w') as f:
    json.dump({'recipe': 'fertility-monolingual', 'docs': len(texts)}, f)
  try:
    path = tokenizer_lib.train_tokenizer(corpus_dir, out_prefix,
                                         vocab_size=vocab_size)
  except RuntimeError as e:
    limit = _TOO_HIGH_RE.search(str(e))
    if not limit or int(limit.group(1)) >= vocab_size:
      raise
    vocab_size = int(limit.group(1))
    path = tokenizer_lib.train_tokenizer(corpus_dir, out_prefix,
                                         vocab_size=vocab_size)
  return path, vocab_size


def _counts(tok: tokenizer_lib.Tokenizer,
            texts: Sequence[str]) -> int:
  return sum(len(ids) for ids in tok.encode_batch(texts))


def _language_row(lang: str, train: list[str], valid: list[str],
                  multi: tokenizer_lib.Tokenizer, work_dir: str,
                  **limits: int) -> dict[str, object]:
  """Fertility of both tokenizers on one language, or the reason to skip."""
  train = _capped(train, limits['max_train_chars'])
  valid = _capped(valid, limits['max_eval_chars'])
  train_chars, eval_chars = sum(map(len, train)), sum(map(len, valid))
  row = {'lang': lang, 'measure': ('tokens/char' if _per_char(lang)
                                   else 'tokens/word'),
         'train_chars': train_chars, 'eval_chars': eval_chars}
  if train_chars < limits['min_train_chars']:
    return {**row, 'skipped': f'{train_chars} train chars < '
                              f"{limits['min_train_chars']}"}
  if eval_chars < limits['min_eval_chars']:
    return {**row, 'skipped': f'{eval_chars} held-out chars < '
                              f"{limits['min_eval_chars']}"}
  try:
    mono_path, mono_vocab = train_monolingual(
        train, os.path.join(work_dir, lang), multi.vocab_size)
  except ValueError as e:  # A vocab below the reserved pieces.
    return {**row, 'skipped': f'monolingual tokenizer: {e}'}
  mono = tokenizer_lib.Tokenizer(mono_path)
  chars = sum(len(re.sub(r'\s+', '', t)) for t in valid)
  words = sum(len(t.split()) for t in valid)
  multi_tokens, mono_tokens = _counts(multi, valid), _counts(mono, valid)
  ratio = multi_tokens / max(mono_tokens, 1)
  return {**row, 'eval_words': words, 'eval_nonspace_chars': chars,
          'mono_vocab': mono_vocab,
          'multi_tokens': multi_tokens, 'mono_tokens': mono_tokens,
          'multi_tokens_per_word': multi_tokens / max(words, 1),
          'mono_tokens_per_word': mono_tokens / max(words, 1),
          'multi_tokens_per_char': multi_tokens / max(chars, 1),
          'mono_tokens_per_char': mono_tokens / max(chars, 1),
          'ratio': ratio, 'flagged': ratio > FLAG_RATIO}


def format_table(rows: Sequence[dict[str, object]],
                 markdown: bool = False) -> str:
  """Measured rows as an aligned text (or Markdown) table; skips listed."""
  header = ['lang', 'measure', 'multi', 'mono', 'mono_vocab', 'ratio',
            'flag']
  cells = [header]
  for row in rows:
    if 'skipped' in row:
      continue
    unit = 'char' if row['measure'] == 'tokens/char' else 'word'
    cells.append([row['lang'], row['measure'],
                  f"{row[f'multi_tokens_per_{unit}']:.3f}",
                  f"{row[f'mono_tokens_per_{unit}']:.3f}",
                  str(row['mono_vocab']), f"{row['ratio']:.3f}",
                  f'> {FLAG_RATIO:.2f}' if row['flagged'] else 'ok'])
  if markdown:
    lines = ['| ' + ' | '.join(line) + ' |' for line in cells]
    lines.insert(1, '| --- | --- |' + ' ---: |' * (len(header) - 2))
  else:
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
  skipped = [f"{r['lang']} ({r['skipped']})" for r in rows if 'skipped' in r]
  if skipped:
    lines.append(('\n' if markdown else '') + 'skipped: ' + ', '.join(skipped))
  return '\n'.join(lines)


def fertility_report(corpus_dir: str, tokenizer_path: str, out_dir: str, *,
                     languages: Sequence[str] | None = None,
                     max_train_chars: int = DEFAULT_MAX_TRAIN_CHARS,
                     max_eval_chars: int = DEFAULT_MAX_EVAL_CHARS,
                     min_train_chars: int = DEFAULT_MIN_TRAIN_CHARS,
                     min_eval_chars: int = DEFAULT_MIN_EVAL_CHARS) -> str:
  """Writes fertility.json / fertility.md into `out_dir`; returns a table.

  Args:
    corpus_dir: a corpus written by `corpus.build_corpus`.
    tokenizer_path: the multilingual `.model` (trained on that corpus).
    out_dir: where the report goes.
    languages: languages to measure (default: all in the corpus).
    max_train_chars: monolingual training text per language (a cap).
    max_eval_chars: held-out text per language (a cap).
    min_train_chars: fewer train characters skip the language.
    min_eval_chars: fewer held-out characters skip the language.

  Returns:
    The report as an aligned text table (skipped languages listed below it).
  """
  multi = tokenizer_lib.Tokenizer(tokenizer_path)
  texts = _language_texts(corpus_dir)
  if languages is None:
    languages = list(texts)
  unknown = sorted(set(languages) - set(texts))
  if unknown:
    raise DataError(f'languages {unknown} are not in corpus {corpus_dir}; '
                    f'choose from {sorted(texts)}.')
  limits = dict(max_train_chars=max_train_chars,
                max_eval_chars=max_eval_chars,
                min_train_chars=min_train_chars,
                min_eval_chars=min_eval_chars)
  with tempfile.TemporaryDirectory(prefix='glm-fertility-') as work_dir:
    rows = [_language_row(lang, texts[lang]['train'], texts[lang]['valid'],
                          multi, work_dir, **limits)
            for lang in sorted(languages)]
  flagged = [r['lang'] for r in rows if r.get('flagged')]
  report = {
      'corpus_dir': os.path.abspath(corpus_dir),
      'manifest_sha256': corpus.manifest_sha256(corpus_dir),
      'tokenizer': os.path.abspath(tokenizer_path),
      'vocab_size': multi.vocab_size, 'flag_ratio': FLAG_RATIO,
      'limits': limits, 'flagged': flagged,
      'languages': {r['lang']: r for r in rows},
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, REPORT_JSON), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, sort_keys=True, ensure_ascii=False)
    f.write('\n')
  measured = [r for r in rows if 'skipped' not in r]
  markdown = '\n'.join([
      '# Tokenizer fertility',
      '',
      f'Tokenizer `{tokenizer_path}` (vocab {multi.vocab_size}) against a '
      'monolingual tokenizer of the same recipe and vocab (or the largest '
      "the language's text supports) trained on that language's train text; "
      'both measured on its held-out text. BLOOM check: flagged when '
      f'multilingual / monolingual tokens > {FLAG_RATIO:.2f}.',
      '',
      f"Flagged: {', '.join(flagged) or 'none'} "
      f'({len(flagged)} of {len(measured)} measured languages).',
      '',
      format_table(rows, markdown=True),
      '',
  ])
  with open(os.path.join(out_dir, REPORT_MD), 'w', encoding='utf-8') as f:
    f.write(markdown)
  return format_table(rows)
