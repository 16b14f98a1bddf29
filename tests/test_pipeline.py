"""Packing, deterministic batches, task mixtures, `glm data preview` and the
seqio tasks, on the corpus built from this machine's text."""

import json
import subprocess
import sys
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm.data import glm_objective
from glm.data import packing
from glm.data import pipeline
from glm.data import ul2_objective
from glm.model.config import ModelConfig
from glm.model import transformer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64


@pytest.fixture(scope='module')
def split(data_dir):
  return pipeline.open_split(data_dir, 'train', vocab_size=4096)


def make(split, task_or_mixture, **kwargs):
  mixture = (task_or_mixture if isinstance(task_or_mixture, tuple)
             else ((task_or_mixture, 1.0),))
  return pipeline.Pipeline(split, pipeline.DataConfig(mixture=mixture),
                           seq_len=kwargs.pop('seq_len', SEQ), **kwargs)


def test_pack_layout():
  ex = lambda n, p, v: {
      'tokens': np.full(n, v), 'targets': np.full(n, v + 1),
      'loss_mask': np.ones(n), 'position_ids': np.arange(n),
      'block_position_ids': np.zeros(n), 'prefix_len': p}
  row = packing.pack([ex(3, 2, 10), ex(4, 1, 20)], 9)
  assert row['segment_ids'].tolist() == [1, 1, 1, 2, 2, 2, 2, 0, 0]
  assert row['position_ids'].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0]
  assert row['prefix_mask'].tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0]
  assert row['loss_mask'].tolist() == [1] * 7 + [0, 0]
  assert row['tokens'][7:].tolist() == [0, 0]
  with pytest.raises(ValueError, match='do not fit'):
    packing.pack([ex(5, 0, 1), ex(5, 0, 2)], 9)


def test_batches_are_a_function_of_seed_and_step(split):
  mixture = (('glm_blank_infilling', 1.0), ('ul2_mixture', 1.0),
             ('instruction', 1.0), ('causal_lm', 1.0))
  a = make(split, mixture, batch_size=4, seed=3)
  b = make(split, mixture, batch_size=4, seed=3)
  later = a.batch(7)
  for step in (0, 1, 2):  # b asked in another order, a never asked these
    b.batch(step)
  assert all(np.array_equal(later[k], b.batch(7)[k]) for k in later)
  other = make(split, mixture, batch_size=4, seed=4).batch(7)
  assert not np.array_equal(later['tokens'], other['tokens'])
  assert not np.array_equal(later['tokens'], a.batch(8)['tokens'])
  assert set(later) == set(packing.ROW_FIELDS)
  assert all(v.shape == (4, SEQ) for v in later.values())


def test_glm130b_mixture_shares(split):
  pipe = make(split, (('glm_blank_infilling', 0.95), ('instruction', 0.05)),
              seq_len=128)
  tasks, objectives, tokens = [], [], {'instruction': 0, 'other': 0}
  n_rows = 1500
  for r in range(n_rows):
    row, examples = pipe.row(0, r)
    task = examples[0]['task']
    tasks.append(task)
    if task == 'glm_blank_infilling':
      objectives.append(examples[0]['objective'])
      assert len({e['objective'] for e in examples}) == 1  # one per row
      if examples[0]['objective'] == 'mask':
        assert len(examples) >= 2  # packed, block-diagonal
    used = int((row['segment_ids'] > 0).sum())
    tokens['instruction' if task == 'instruction' else 'other'] += used
  share = tasks.count('instruction') / n_rows
  se = np.sqrt(0.05 * 0.95 / n_rows)
  assert abs(share - 0.05) < 4 * se, share
  mask_share = objectives.count('mask') / len(objectives)
  se = np.sqrt(0.3 * 0.7 / len(objectives))
  assert abs(mask_share - 0.3) < 4 * se, mask_share
  token_share = tokens['instruction'] / sum(tokens.values())
  assert 0.025 < token_share < 0.08, token_share


def _logits(cfg, params, batch):
  return transformer.Transformer(cfg).apply(
      {'params': params}, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize('task', [
    'glm_blank_infilling', pytest.param('ul2_mixture', marks=pytest.mark.slow),
    pytest.param('instruction', marks=pytest.mark.slow)])
def test_packed_examples_see_only_themselves(split, task):
  """Each example of a packed row gives the logits it gives alone."""
  cfg = ModelConfig(vocab_size=4096, hidden=32, num_layers=2, num_heads=4,
                    mlp_dim=64, position='rope2d', max_len=256)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  pipe = make(split, task, seq_len=128)
  exs = [pipe.example(task, i) for i in range(3)]
  exs = exs[:2] if sum(len(e['tokens']) for e in exs) > 256 else exs
  row = packing.stack_rows([packing.pack(exs, 256)])
  packed = np.asarray(_logits(cfg, params, row))[0]
  at = 0
  for ex in exs:
    n = len(ex['tokens'])
    alone = packing.stack_rows([packing.pack([ex], n)])
    want = np.asarray(_logits(cfg, params, alone))[0]
    np.testing.assert_allclose(packed[at:at + n], want, atol=2e-5)
    at += n


def test_preview_schema_and_targets(data_dir):
  env = dict(os.environ)
  out = subprocess.run(
      [sys.executable, '-m', 'glm', 'data', 'preview', '--task', 'causal_lm',
       '--n', '2', '--seed', '5', '--seq_len', '32', '--data_dir', data_dir],
      capture_output=True, text=True, cwd=ROOT, env=env, check=True)
  records = [json.loads(l) for l in out.stdout.splitlines()]
  assert len(records) == 2
  keys = {'task', 'objective', 'denoiser', 'source_tokens', 'tokens',
          'targets', 'loss_mask', 'position_ids', 'block_position_ids',
          'prefix_len', 'special_ids'}
  for r in records:
    assert set(r) == keys and r['objective'] == 'causal'
    # targets[i] is the token to predict at position i.
    assert r['targets'] == r['source_tokens'][1:]
    assert r['tokens'] == r['source_tokens'][:-1]
    assert len(r['special_ids']['sentinels']) >= 100
    assert {'[MASK]', '[sMASK]', '[gMASK]', '<sop>', '<eop>', '[NLU]',
            '[NLG]', '[S2S]'} <= set(r['special_ids'])


@pytest.mark.parametrize('task', ['glm_blank_infilling', 'ul2_mixture'])
def test_preview_of_corrupting_tasks_reconstructs(split, task):
  pipe = make(split, task, seq_len=96)
  module = glm_objective if task == 'glm_blank_infilling' else ul2_objective
  for i in range(20):
    rec = pipeline.preview_record(pipe.example(task, i), split.special)
    ex = {k: np.asarray(v) if isinstance(v, list) else v
          for k, v in rec.items()}
    assert np.array_equal(module.reconstruct_source(ex, split.special),
                          ex['source_tokens'])
    n = len(rec['tokens'])
    assert all(len(rec[k]) == n for k in ('targets', 'loss_mask',
                                          'position_ids',
                                          'block_position_ids'))
    assert sum(rec['loss_mask'][:rec['prefix_len'] - 1]) == 0


def test_seqio_tasks_match_the_pipeline(data_dir, monkeypatch):
  monkeypatch.setenv('GLM_DATA_DIR', data_dir)
  import seqio  # pylint: disable=g-import-not-at-top
  from glm.data import tasks  # pylint: disable=g-import-not-at-top
  assert {'causal_lm', 'glm_blank_infilling', 'ul2_mixture',
          'instruction'} <= set(seqio.TaskRegistry.names())
  assert 'glm130b_mixture' in seqio.MixtureRegistry.names()
  vocab = tasks.vocabulary()
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert vocab.vocab_size == 4096
  split = pipeline.open_split(data_dir, 'train', vocab_size=4096)
  for task in ('glm_blank_infilling', 'ul2_mixture'):
    ds = seqio.get_mixture_or_task(task).get_dataset(
        {'tokens': SEQ, 'targets': SEQ}, split='train', shuffle=False,
        trim_output_features=False)
    pipe = pipeline.Pipeline(split, pipeline.DataConfig.for_task(task),
                             seq_len=SEQ, seed=tasks.SEED)
    for i, ex in enumerate(ds.take(3).as_numpy_iterator()):
      want = pipe.example(task, i)
      for k in ('tokens', 'targets', 'loss_mask', 'position_ids',
                'block_position_ids'):
        assert np.array_equal(ex[k], want[k]), (task, i, k)
      assert int(ex['prefix_len']) == want['prefix_len']


def test_ul2_rows_are_full_and_every_segment_is_exact(split):
  pipe = make(split, 'ul2_mixture', seq_len=128)
  fills = []
  for r in range(30):
    row, examples = pipe.row(0, r)
    assert len({e['objective'] for e in examples}) == 1  # one denoiser a row
    fills.append(float((row['segment_ids'] > 0).mean()))
    at = 0
    for seg, ex in enumerate(examples, 1):
      n = len(ex['tokens'])
      assert (row['segment_ids'][at:at + n] == seg).all()
      assert np.array_equal(row['tokens'][at:at + n], ex['tokens'])
      assert row['prefix_mask'][at:at + n].sum() == ex['prefix_len']
      assert np.array_equal(ul2_objective.reconstruct_source(ex, split.special),
                            ex['source_tokens'])
      at += n
  assert np.mean(fills) > 0.95, fills
