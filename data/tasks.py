"""seqio tasks and mixtures for glm's objectives, registered on import.

Import this module explicitly (in gin: `import glm.data.tasks`); nothing else
registers tasks. Registered tasks:

  causal_lm             BLOOM's next-token prediction
  glm_blank_infilling   GLM [MASK] / [sMASK] / [gMASK] (30% / 0% / 70%)
  ul2_mixture           UL2's seven denoisers, uniform rates
  instruction           prompted tasks built from the corpus itself
and mixtures (rates are example rates):
  glm130b_mixture       95% glm_blank_infilling + 5% instruction
  ul2_instruction_mixture  95% ul2_mixture + 5% instruction

Each task's source is the sequence of example indices 0, 1, 2, ...; its one
preprocessor builds example i with `glm.data.pipeline.Pipeline.example`, the
same pure function of (seed, i) the trainer's batches use, so seqio and the
trainer can never disagree. Output features (unpacked, variable length):
tokens, targets (SentencePiece vocabulary), loss_mask, position_ids,
block_position_ids and the scalar prefix_len.

  task = seqio.get_mixture_or_task('glm_blank_infilling')
  ds = task.get_dataset({'tokens': 128}, split='train', shuffle=False)
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import numpy as np


@contextlib.contextmanager
def _native_stderr_silenced():
  """TensorFlow's native libraries print start-up lines (oneDNN, CUDA
  drivers, absl's pre-init warning) straight to file descriptor 2 while they
  load, before any Python or absl logging can filter them; point fd 2 at
  /dev/null for the import only. Python exceptions still propagate."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


with _native_stderr_silenced():
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

from glm.data.errors import DataError
from glm.data import pipeline


# Where the corpus and tokenizer live (built on first use); override with
# the GLM_DATA_DIR environment variable.
DEFAULT_DATA_DIR = '.cache/data'
VOCAB_SIZE = 4096
SEED = 0
_SPLITS = {'train': 'train', 'validation': 'valid'}
_ARRAYS = ('tokens', 'targets', 'loss_mask', 'position_ids',
           'block_position_ids')


def data_dir() -> str:
  return os.path.abspath(os.environ.get('GLM_DATA_DIR', DEFAULT_DATA_DIR))


@functools.lru_cache(maxsize=None)
def _split(directory: str, split: str) -> pipeline.SplitData:
  return pipeline.open_split(directory, split, vocab_size=VOCAB_SIZE,
                             seed=SEED)


@functools.lru_cache(maxsize=None)
def _pipeline(directory: str, split: str, task: str,
              seq_len: int) -> pipeline.Pipeline:
  return pipeline.Pipeline(_split(directory, split),
                           pipeline.DataConfig.for_task(task),
                           seq_len=seq_len, seed=SEED)


def vocabulary() -> seqio.SentencePieceVocabulary:
  """The corpus tokenizer as a seqio vocabulary (built on first use)."""
  return seqio.SentencePieceVocabulary(_split(data_dir(), 'train').tok
                                       .model_path)


class _LazyVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePieceVocabulary whose model is built only when first used."""

  def __init__(self):  # pylint: disable=super-init-not-called
    self._resolved = None

  def __getattr__(self, name):
    if name == '_resolved':
      raise AttributeError(name)
    if self._resolved is None:
      self._resolved = vocabulary()
    return getattr(self._resolved, name)

  def __eq__(self, other):
    return isinstance(other, seqio.Vocabulary) and other is self


def _indices(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
  del shuffle_files, seed  # examples are a function of their index
  if split not in _SPLITS:
    raise DataError(f'split {split!r} is not one of {sorted(_SPLITS)}.')
  return tf.data.Dataset.range(2 ** 62).map(lambda i: {'index': i})


def _builder(task: str):
  """A seqio preprocessor mapping {'index'} to the task's example."""

  def build(dataset: tf.data.Dataset, sequence_length=None,
            split: str = 'train') -> tf.data.Dataset:
    seq_len = int((sequence_length or {}).get('tokens', 512))
    pipe = _pipeline(data_dir(), _SPLITS.get(split, 'train'), task, seq_len)

    def make(index):
      ex = pipe.example(task, int(index))
      return tuple([np.asarray(ex[k], np.int32) for k in _ARRAYS]
                   + [np.int32(ex['prefix_len'])])

    def to_features(row):
      out = tf.numpy_function(make, [row['index']],
                              [tf.int32] * (len(_ARRAYS) + 1))
      feats = {k: tf.ensure_shape(v, [None]) for k, v in zip(_ARRAYS, out)}
      feats['prefix_len'] = tf.ensure_shape(out[-1], [])
      return feats

    return dataset.map(to_features)

  return build


def _output_features() -> dict[str, seqio.Feature]:
  vocab = _LazyVocabulary()
  ids = seqio.PassThroughVocabulary(size=0)
  feats = {
      'tokens': seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
      'targets': seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
  }
  for k in ('loss_mask', 'position_ids', 'block_position_ids'):
    feats[k] = seqio.Feature(ids, add_eos=False, dtype=tf.int32,
                             required=False)
  feats['prefix_len'] = seqio.Feature(ids, add_eos=False, dtype=tf.int32,
                                      rank=0, required=False)
  return feats


def register() -> None:
  """Registers every task and mixture (idempotent)."""
  for task in pipeline.TASKS:
    if task in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        task,
        source=seqio.FunctionDataSource(_indices,
                                        splits=tuple(_SPLITS)),
        preprocessors=[_builder(task)],
        output_features=_output_features())
  mixtures = {
      'glm130b_mixture': [('glm_blank_infilling', 95.0),
                          ('instruction', 5.0)],
      'ul2_instruction_mixture': [('ul2_mixture', 95.0),
                                  ('instruction', 5.0)],
  }
  for name, rates in mixtures.items():
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, rates)


register()
