"""SentencePiece BPE tokenizer: training on a corpus split, and a thin wrapper.

The model is lossless on any text: byte fallback spells every character the
vocabulary lacks as UTF-8 byte pieces, the normalizer is the identity and
whitespace is kept as is, so `decode(encode(s)) == s` and the unknown id is
never produced.

Ids:
  0 <pad>, 1 </s> (eos), 2 <unk> (reserved, unused), no bos;
  3.. the GLM / UL2 specials [MASK] [sMASK] [gMASK] <sop> <eop> [NLU] [NLG]
  [S2S], then the sentinels <extra_id_0> .. <extra_id_99>, each always a
  single id (also when they occur in raw text); then 256 byte pieces and the
  learned merges.

Training is deterministic (one thread, a fixed sentence subsample, seeded)
and writes `<prefix>.model`, `<prefix>.vocab` and a `<prefix>.json` sidecar
naming the corpus manifest hash and arguments; `ensure_tokenizer` retrains
only when that sidecar is missing or differs.

Usage:
  path = tokenizer.ensure_tokenizer(corpus_dir, '/tmp/glm_data/spm4k')
  tok = tokenizer.Tokenizer(path)
  ids = tok.encode('Hello [gMASK]<sop>')
"""

from collections.abc import Iterable, Iterator, Sequence
import hashlib
import io
import json
import os
import re
import sys
import tempfile

import sentencepiece as spm

from glm.data import corpus
from glm.data.errors import DataError

# Bump whenever training would produce a different model for the same inputs.
TOKENIZER_RECIPE = 'glm-spm-bpe-v1'
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = ('[MASK]', '[sMASK]', '[gMASK]', '<sop>', '<eop>', '[NLU]',
                  '[NLG]', '[S2S]')
NUM_SENTINELS = 100
# Training reads at most this many lines (evenly strided over the split) and
# skips longer lines than `_MAX_SENTENCE_BYTES`.
_MAX_SENTENCES = 400_000
_MAX_SENTENCE_BYTES = 8192


def sentinel(index: int) -> str:
  """The text of sentinel `index`: '<extra_id_{index}>'."""
  if not 0 <= index < NUM_SENTINELS:
    raise DataError(f'sentinel {index=} is outside [0, {NUM_SENTINELS}).')
  return f'<extra_id_{index}>'


def user_defined_symbols() -> list[str]:
  """The reserved single-id symbols, in id order (starting at id 3)."""
  return list(SPECIAL_TOKENS) + [sentinel(i) for i in range(NUM_SENTINELS)]


def _training_sentences(corpus_dir: str,
                        max_sentences: int = _MAX_SENTENCES) -> list[str]:
  """Non-empty lines of the train split, evenly subsampled to a bound."""
  lines = []
  for doc in corpus.iter_documents(corpus_dir, 'train'):
    for line in doc['text'].split('\n'):
      if line.strip() and len(line.encode()) <= _MAX_SENTENCE_BYTES:
        lines.append(line)
  stride = max(1, -(-len(lines) // max_sentences))  # ceil
  return lines[::stride]


def _trainer_args(vocab_size: int) -> dict[str, object]:
  """SentencePiece trainer flags; see the module docstring for the ids."""
  return dict(
      model_type='bpe',
      vocab_size=vocab_size,
      byte_fallback=True,
      character_coverage=0.9995,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      pad_piece='<pad>', eos_piece='</s>', unk_piece='<unk>',
      user_defined_symbols=user_defined_symbols(),
      # Lossless: no NFKC, no whitespace collapsing, no dummy leading space.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      # Deterministic: one thread, the whole (pre-subsampled) input, in order.
      # No model_prefix: the model comes back as bytes, so no temporary path
      # is recorded in its trainer spec and equal inputs give equal bytes.
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
  )


def _atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and `os.replace`."""
  fd, tmp_path = tempfile.mkstemp(prefix='.tmp-', dir=os.path.dirname(path))
  umask = os.umask(0)
  os.umask(umask)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0o600 would stick.
    os.replace(tmp_path, path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)


def _vocab_listing(model: bytes) -> bytes:
  """The `.vocab` text SentencePiece writes: `piece<TAB>score` per id."""
  sp = spm.SentencePieceProcessor(model_proto=model)
  lines = (f'{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n'
           for i in range(sp.get_piece_size()))
  return ''.join(lines).encode()


def _file_sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _sidecar_path(out_prefix: str) -> str:
  return out_prefix + '.json'


def _expected_sidecar(corpus_dir: str, vocab_size: int,
                      seed: int) -> dict[str, object]:
  return {'recipe': TOKENIZER_RECIPE,
          'corpus_manifest_sha256': corpus.manifest_sha256(corpus_dir),
          'vocab_size': vocab_size, 'seed': seed}


def train_tokenizer(corpus_dir: str, out_prefix: str, *,
                    vocab_size: int = 4096, seed: int = 0) -> str:
  """Trains the BPE model on the train split of a corpus.

  Args:
    corpus_dir: a directory written by `corpus.build_corpus`.
    out_prefix: output path without extension; writes `.model`, `.vocab` and
      the `.json` sidecar (last, so its presence means the model is complete).
    vocab_size: total pieces, including specials, sentinels and 256 bytes.
    seed: SentencePiece's random seed.

  Returns:
    The path of the `.model` file.
  """
  reserved = 3 + len(user_defined_symbols()) + 256
  if vocab_size <= reserved:
    raise DataError(
        f'{vocab_size=} must exceed the {reserved} reserved pieces '
        '(specials, sentinels, 256 bytes) plus the alphabet; use a larger '
        'vocab_size (default 4096).')
  sidecar = _expected_sidecar(corpus_dir, vocab_size, seed)
  sentences = _training_sentences(corpus_dir)
  if not sentences:
    raise DataError(f'corpus {corpus_dir} has no training text; rebuild it '
                    'with corpus.build_corpus.')
  out_prefix = os.path.abspath(out_prefix)
  os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
  buffer = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences),
                                   model_writer=buffer,
                                   **_trainer_args(vocab_size))
  except RuntimeError as e:
    needed = re.search(r'smaller than required_chars\. \d+ vs (\d+)', str(e))
    if not needed:
      raise
    raise DataError(
        f'tokenizer {vocab_size=} is too small for the alphabet of corpus '
        f'{corpus_dir}: it needs more than {needed.group(1)} pieces; use a '
        'larger vocab_size (default 4096).') from None
  model = buffer.getvalue()
  sidecar['model_sha256'] = hashlib.sha256(model).hexdigest()
  sidecar['training_sentences'] = len(sentences)
  _atomic_write(out_prefix + '.model', model)
  _atomic_write(out_prefix + '.vocab', _vocab_listing(model))
  # The sidecar goes last: its presence means the model is complete.
  _atomic_write(_sidecar_path(out_prefix),
                (json.dumps(sidecar, indent=1, sort_keys=True) + '\n').encode())
  return out_prefix + '.model'


def ensure_tokenizer(corpus_dir: str, out_prefix: str, *,
                     vocab_size: int = 4096, seed: int = 0) -> str:
  """Trains the tokenizer unless an up-to-date one exists at `out_prefix`.

  Up to date: the `.model` exists and the sidecar records the same recipe,
  corpus manifest hash, vocab size, seed and model hash.

  Returns:
    The path of the `.model` file.
  """
  model_path = out_prefix + '.model'
  expected = _expected_sidecar(corpus_dir, vocab_size, seed)
  try:
    with open(_sidecar_path(out_prefix), encoding='utf-8') as f:
      found = json.load(f)
  except (OSError, ValueError):
    found = None
  if (found is not None and os.path.exists(model_path)
      and all(found.get(k) == v for k, v in expected.items())
      and found.get('model_sha256') == _file_sha256(model_path)):
    print(f'glm.data: tokenizer {model_path} is up to date.',
          file=sys.stderr, flush=True)
    return model_path
  reason = 'missing' if found is None else 'stale'
  print(f'glm.data: training tokenizer {model_path} ({reason}, '
        f'{vocab_size=}) ...', file=sys.stderr, flush=True)
  return train_tokenizer(corpus_dir, out_prefix, vocab_size=vocab_size,
                         seed=seed)


class Tokenizer:
  """A trained SentencePiece model with the project's id conventions."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    if (self._sp.pad_id(), self._sp.eos_id()) != (PAD_ID, EOS_ID):
      raise DataError(
          f'{model_path} has pad_id={self._sp.pad_id()}, '
          f'eos_id={self._sp.eos_id()}; expected {PAD_ID}, {EOS_ID}: retrain '
          'it with tokenizer.train_tokenizer.')
    names = ['<pad>', '</s>', '<unk>'] + user_defined_symbols()
    self.special_ids = {name: self._sp.piece_to_id(name) for name in names}
    missing = [n for n, i in self.special_ids.items()
               if i == UNK_ID and n != '<unk>']
    if missing:
      raise DataError(f'{model_path} lacks the special pieces {missing[:3]} '
                      '...; retrain it with tokenizer.train_tokenizer.')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no eos appended)."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` over many texts at once (faster than a Python loop)."""
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, stopping at the first eos and skipping pads."""
    return self._sp.decode(list(_until_eos(ids)))

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))


def _until_eos(ids: Iterable[int]) -> Iterator[int]:
  for token_id in ids:
    token_id = int(token_id)
    if token_id == EOS_ID:
      return
    if token_id != PAD_ID:
      yield token_id
