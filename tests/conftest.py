"""Shared fixtures: one corpus built from this machine's text per test session.

Also turns on JAX's persistent compilation cache for the suite (and the
`glm` subprocesses it starts, which inherit the environment): many tests and
CLI runs compile the same tiny programs, and a cache hit replaces an XLA
compile. The key is the program and the compiler, so a hit is the same
executable.
"""

import os

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(_ROOT, '.cache', 'jax-tests'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# `make test-numerics` sets GLM_TEST_ONE_CORE=1: each pytest-xdist worker,
# and every process it starts, runs on one core of its own, so XLA's kernels
# split their work over one thread instead of all of them (another order of
# summation, as on a machine with another core count).
if os.environ.get('GLM_TEST_ONE_CORE') == '1':
  _cores = sorted(os.sched_getaffinity(0))
  _worker = int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0')[2:])
  os.sched_setaffinity(0, {_cores[_worker % len(_cores)]})


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data folder whose corpus and tokenizers are built on first use.

  `glm.data.pipeline.open_split(data_dir, split, vocab_size=V)` builds the
  corpus once and a tokenizer per vocab size, then reuses them.
  """
  return str(tmp_path_factory.mktemp('glm_data'))
