"""A corpus split as one token stream, tokenized once and cached.

Every document of the split is followed by eos and all are concatenated into
one int32 stream, cached as `.npy` next to the tokenizer model under a key
made of the tokenizer model hash, the corpus manifest hash and the split.
`glm.data.pipeline` cuts its windows from this stream.

Usage:
  tok = tokenizer.Tokenizer(model_path)
  stream = load_token_stream(corpus_dir, tok, 'train')   # [N] int32
"""

import hashlib
import os
import sys
import tempfile

import numpy as np

from glm.data import corpus
from glm.data import tokenizer as tokenizer_lib

# Bump whenever the stream produced for the same tokenizer and corpus changes.
STREAM_RECIPE = 'glm-causal-lm-stream-v1'

Batch = dict[str, np.ndarray]


def _stream_key(corpus_dir: str, tok: tokenizer_lib.Tokenizer,
                split: str) -> str:
  digest = hashlib.sha256()
  with open(tok.model_path, 'rb') as f:
    digest.update(f.read())
  digest.update(corpus.manifest_sha256(corpus_dir).encode())
  digest.update(f'{STREAM_RECIPE}/{split}/eos={tok.eos_id}'.encode())
  return digest.hexdigest()[:16]


def stream_cache_path(corpus_dir: str, tok: tokenizer_lib.Tokenizer,
                      split: str, cache_dir: str | None = None) -> str:
  """Where `load_token_stream` caches a split: beside the tokenizer model,
  or in `cache_dir` (a tokenizer that lives in a checkpoint folder)."""
  stem = os.path.splitext(tok.model_path)[0]
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    stem = os.path.join(cache_dir, os.path.basename(stem))
  return f'{stem}.{split}.{_stream_key(corpus_dir, tok, split)}.npy'


def tokenize_split(corpus_dir: str, tok: tokenizer_lib.Tokenizer,
                   split: str) -> np.ndarray:
  """All documents of a split, each followed by eos, as one int32 stream."""
  texts = [doc['text'] for doc in corpus.iter_documents(corpus_dir, split)]
  pieces = []
  for ids in tok.encode_batch(texts):
    pieces.append(np.asarray(ids, dtype=np.int32))
    pieces.append(np.asarray([tok.eos_id], dtype=np.int32))
  if not pieces:
    return np.zeros([0], dtype=np.int32)
  return np.concatenate(pieces)


def load_token_stream(corpus_dir: str, tok: tokenizer_lib.Tokenizer,
                      split: str, cache_dir: str | None = None) -> np.ndarray:
  """The split's token stream, from the cache or tokenized and cached."""
  path = stream_cache_path(corpus_dir, tok, split, cache_dir)
  if os.path.exists(path):
    return np.load(path)
  stream = tokenize_split(corpus_dir, tok, split)
  fd, tmp_path = tempfile.mkstemp(prefix='.stream.tmp-', suffix='.npy',
                                  dir=os.path.dirname(os.path.abspath(path)))
  umask = os.umask(0)
  os.umask(umask)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.save(f, stream)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0o600 would stick.
    os.replace(tmp_path, path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
  print(f'glm.data: cached {split} stream ({stream.size} tokens) at {path}',
        file=sys.stderr, flush=True)
  return stream
