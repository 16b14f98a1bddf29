"""Causal-LM batches from a corpus split: one token stream, seeded windows.

A split is tokenized once: every document followed by eos, all concatenated
into one int32 stream, cached as `.npy` next to the tokenizer model under a
key made of the tokenizer model hash, the corpus manifest hash and the split.

`CausalLMBatches` cuts the stream into `W = (len(stream) - 1) // T`
non-overlapping windows of T + 1 tokens (consecutive windows share one
boundary token) and visits them epoch by epoch in a permutation drawn from
(seed, epoch), with a per-epoch start offset so window boundaries move. Example
`i = step * B + b` is window `perm[epoch][i % W]` of epoch `i // W`; hence
`batch(step)` is a pure function of (seed, step): a resumed run sees exactly
the batches it would have seen, without replaying earlier steps.

Shapes: B batch, T sequence length.
  tokens    [B, T] int32   window[:-1]
  targets   [B, T] int32   window[1:] (the next token)
  loss_mask [B, T] float32 all ones (documents are separated by eos)

Usage:
  tok = tokenizer.Tokenizer(model_path)
  train = CausalLMBatches(load_token_stream(corpus_dir, tok, 'train'),
                          batch_size=8, seq_len=256, seed=0)
  batch = train.batch(step)
  evals = CausalLMBatches(load_token_stream(corpus_dir, tok, 'valid'),
                          batch_size=8, seq_len=256).eval_batches(4)
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
  digest.update(f'{STREAM_RECIPE}/{split}'.encode())
  return digest.hexdigest()[:16]


def stream_cache_path(corpus_dir: str, tok: tokenizer_lib.Tokenizer,
                      split: str) -> str:
  """Where `load_token_stream` caches a split: beside the tokenizer model."""
  stem = tok.model_path.removesuffix('.model')
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
                      split: str) -> np.ndarray:
  """The split's token stream, from the cache or tokenized and cached."""
  path = stream_cache_path(corpus_dir, tok, split)
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


class CausalLMBatches:
  """Resume-exact causal-LM batches over a token stream (see module doc)."""

  def __init__(self, stream: np.ndarray, *, batch_size: int, seq_len: int,
               seed: int = 0):
    stream = np.asarray(stream)
    if stream.ndim != 1:
      raise ValueError(f'stream must be 1-D, got shape {stream.shape}.')
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f'{batch_size=} and {seq_len=} must be positive.')
    if stream.size < seq_len + 1:
      raise ValueError(
          f'token stream has {stream.size} tokens but one window needs '
          f'seq_len + 1 = {seq_len + 1}; lower seq_len or build a bigger '
          'corpus (corpus.build_corpus(max_docs_per_source=...)).')
    self.stream = stream.astype(np.int32, copy=False)
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.num_windows = (stream.size - 1) // seq_len
    self._slack = (stream.size - 1) - self.num_windows * seq_len
    self._plans: dict[int, tuple[int, np.ndarray]] = {}

  def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
    """(start offset, window permutation) of one epoch; a pure function."""
    if epoch not in self._plans:
      if len(self._plans) >= 4:
        self._plans.pop(min(self._plans))
      rng = np.random.default_rng([self.seed, epoch])
      offset = int(rng.integers(0, self._slack + 1))
      self._plans[epoch] = (offset, rng.permutation(self.num_windows))
    return self._plans[epoch]

  def window_starts(self, step: int) -> np.ndarray:
    """Stream offsets [B] of the windows that make up batch `step`."""
    if step < 0:
      raise ValueError(f'{step=} must be >= 0.')
    examples = step * self.batch_size + np.arange(self.batch_size)
    starts = np.empty(self.batch_size, dtype=np.int64)
    for b, example in enumerate(examples):
      epoch, position = divmod(int(example), self.num_windows)
      offset, permutation = self._epoch_plan(epoch)
      starts[b] = offset + permutation[position] * self.seq_len
    return starts

  def _gather(self, starts: np.ndarray) -> Batch:
    # windows: [B, T + 1]
    windows = self.stream[starts[:, None] + np.arange(self.seq_len + 1)]
    return {'tokens': windows[:, :-1],
            'targets': windows[:, 1:],
            'loss_mask': np.ones([starts.size, self.seq_len], np.float32)}

  def batch(self, step: int) -> Batch:
    """Batch `step`: tokens/targets [B, T] int32, loss_mask [B, T] float32."""
    return self._gather(self.window_starts(step))

  def eval_batches(self, n: int) -> list[Batch]:
    """`n` fixed batches of consecutive windows from the stream's start."""
    available = self.num_windows // self.batch_size
    if n > available:
      raise ValueError(
          f'eval_batches({n=}) needs {n * self.batch_size} windows of '
          f'{self.seq_len + 1} tokens but the stream ({self.stream.size} '
          f'tokens) has {self.num_windows}: ask for n <= {available}.')
    return [
        self._gather((np.arange(self.batch_size) + k * self.batch_size)
                     * self.seq_len)
        for k in range(n)
    ]
