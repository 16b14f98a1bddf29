"""Shared fixtures: one corpus built from this machine's text per test session."""

import pytest


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data folder whose corpus and tokenizers are built on first use.

  `glm.data.pipeline.open_split(data_dir, split, vocab_size=V)` builds the
  corpus once and a tokenizer per vocab size, then reuses them.
  """
  return str(tmp_path_factory.mktemp('glm_data'))
