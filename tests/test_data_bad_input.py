"""Bad input to the data path: each is handled without a crash or refused
with a one-line error, never turned into a silently wrong example."""

import gzip
import os

import numpy as np
import pytest

from glm.data import corpus
from glm.data import glm_objective
from glm.data import objectives
from glm.data import pipeline
from glm.data import tokenizer as tokenizer_lib
from glm.data import ul2_objective

_TEXT = ('The quick brown fox jumps over the lazy dog. It ran far away. '
         'Then it came back home again. ')


def _page(body: str) -> bytes:
  return (f'.TH T 1\n.SH NAME\nt \\- test\n.SH DESCRIPTION\n{body}\n'
          ).encode()


def _tree(root):
  man = os.path.join(root, 'man', 'man1')
  os.makedirs(man)
  pages = {
      'good': _page(_TEXT * 40),
      'empty': b'',
      'markup_only': b'.TH EMPTY 1\n.SH NAME\n',
      # Not UTF-8: a pre-UTF-8 (Latin-1) page, read as Latin-1.
      'latin1': _page('Ein Hund lief schnell nach Hause zur\xfcck. ' * 30
                      ) + b'caf\xe9 au lait\n',
      # One enormous line (2 MB without a newline).
      'huge': _page('word ' * 400_000),
  }
  for name, data in pages.items():
    with open(os.path.join(man, f'{name}.1.gz'), 'wb') as f:
      f.write(gzip.compress(data, mtime=0))
  stdlib = os.path.join(root, 'stdlib')
  os.makedirs(stdlib)
  with open(os.path.join(stdlib, 'mod.py'), 'wb') as f:
    f.write(b'"""Docstring with a bad byte \xff here."""\nx = 1\n')
  return {'man_root': os.path.join(root, 'man'), 'stdlib_root': stdlib,
          'lang_alpha': 1.0}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  roots = _tree(str(tmp_path_factory.mktemp('bad')))
  out = str(tmp_path_factory.mktemp('corpus') / 'corpus')
  corpus.build_corpus(out, **roots)
  return out


def test_corpus_survives_bad_files(built):
  docs = [d for s in corpus.SPLITS for d in corpus.iter_documents(built, s)]
  assert docs and all(d['text'].strip() for d in docs)  # no empty documents
  texts = '\n'.join(d['text'] for d in docs)
  assert 'café au lait' in texts  # decoded as Latin-1, not dropped
  for d in docs:  # every document is valid UTF-8 text
    d['text'].encode('utf-8')


def test_tokenizer_trains_despite_an_enormous_line(built, tmp_path):
  path = tokenizer_lib.train_tokenizer(built, str(tmp_path / 'spm'),
                                       vocab_size=512)
  tok = tokenizer_lib.Tokenizer(path)
  ids = tok.encode('caf\ufffd ' + 'word ' * 50)
  assert tok.unk_id not in ids
  assert tok.decode(ids) == 'caf\ufffd ' + 'word ' * 50


def test_too_short_sources_are_clear_errors():
  special = objectives.SpecialIds.from_mapping(
      {**{n: i for i, n in enumerate(objectives.PIECE_NAMES.values())},
       **{f'<extra_id_{k}>': 100 + k for k in range(100)}})
  rng = np.random.default_rng(0)
  for make in (lambda s: glm_objective.glm_example(s, special, rng,
                                                   objective='mask'),
               lambda s: ul2_objective.ul2_example(s, special, rng,
                                                   denoiser='x_mu3_r0.5')):
    with pytest.raises(ValueError, match='empty'):
      make(np.array([], np.int32))
    with pytest.raises(ValueError, match='L=1'):
      make(np.array([7], np.int32))


def test_a_split_smaller_than_a_window_is_a_clear_error(built, tmp_path):
  path = tokenizer_lib.train_tokenizer(built, str(tmp_path / 'spm'),
                                       vocab_size=512)
  split = pipeline.SplitData(built, tokenizer_lib.Tokenizer(path), 'valid')
  pipe = pipeline.Pipeline(split, pipeline.DataConfig(), seq_len=10 ** 6)
  with pytest.raises(ValueError, match='fewer than one window'):
    pipe.batch(0)


def test_unknown_task_and_bad_rates_are_refused():
  with pytest.raises(ValueError, match='must be some of'):
    pipeline.DataConfig(mixture=(('causal', 1.0),))
  with pytest.raises(ValueError, match='non-negative'):
    pipeline.DataConfig(mixture=(('causal_lm', -1.0),))
