"""`glm eval` through lm-evaluation-harness: the same local tasks through
lm-eval's own `hf` model on a random transformers BLOOM and through
`glm eval` on its conversion give the same per-request log-likelihoods
(1e-4) and metrics; packed scoring equals one-at-a-time scoring; the GLM
way of scoring equals a hand-built [gMASK] example; bad input fails in one
line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from glm import cli
from glm.evaluation import eval_cli
from glm.evaluation import harness
from glm.inference import scoring
from test_hf_tokenizer import make_bloom_dir

# One task of each request type: loglikelihood, multiple choice, rolling.
TASKS = ('glm_lambada_en', 'glm_cloze_en', 'glm_bpb_en')
LIMIT = 6
MAX_LEN = 256  # short, so the rolling task is scored in several windows


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf_datasets'))
  monkeypatch.setenv('USE_TF', '0')


@pytest.fixture(scope='module')
def bloom(tmp_path_factory, data_dir):
  """A random HF BLOOM (max length 64) with a locally trained tokenizer,
  and its glm conversion."""
  root = tmp_path_factory.mktemp('eval_bloom')
  hf_dir, glm_dir = str(root / 'hf'), str(root / 'glm')
  make_bloom_dir(hf_dir, data_dir)
  with open(os.path.join(hf_dir, 'config.json')) as f:
    config = json.load(f)
  config['seq_length'] = MAX_LEN
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(config, f)
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', hf_dir,
                   '--out', glm_dir]) == 0
  return hf_dir, glm_dir


def _hf_results(hf_dir, data_dir):
  import lm_eval  # pylint: disable=g-import-not-at-top
  return lm_eval.simple_evaluate(
      model='hf', model_args=(f'pretrained={hf_dir},tokenizer={hf_dir},'
                              f'dtype=float32,device=cpu,max_length={MAX_LEN}'),
      tasks=list(TASKS), batch_size=4, limit=LIMIT, bootstrap_iters=0,
      log_samples=True,
      task_manager=eval_cli.task_manager(TASKS, (), data_dir))


def test_glm_eval_matches_lm_eval_hf_model(bloom, data_dir, tmp_path):
  hf_dir, glm_dir = bloom
  out = str(tmp_path / 'eval.json')
  assert cli.main(['eval', '--checkpoint', glm_dir, '--tasks', ','.join(TASKS),
                   '--limit', str(LIMIT), '--batch_size', '3',
                   '--data_dir', data_dir, '--log_samples',
                   '--output', out]) == 0
  with open(out) as f:
    ours = json.load(f)
  ref = _hf_results(hf_dir, data_dir)
  assert ours['glm']['max_length'] == MAX_LEN
  assert ours['glm']['checkpoint'] == os.path.abspath(glm_dir)
  windows = 0
  for task in TASKS:
    a, b = ours['samples'][task], ref['samples'][task]
    assert len(a) == len(b) == LIMIT
    for x, y in zip(a, b):
      assert x['doc_id'] == y['doc_id']
      assert [list(v) for v in x['arguments']] == [list(v) for v in
                                                  y['arguments']]
      lx = np.array([r[0] if isinstance(r, (list, tuple)) else r
                     for r in x['filtered_resps']], float)
      ly = np.array([r[0] if isinstance(r, (list, tuple)) else r
                     for r in y['filtered_resps']], float)
      # 1e-4, or 1e-6 of a long sum (both sum float32 per-token terms).
      np.testing.assert_allclose(lx, ly, atol=1e-4, rtol=1e-6)
      if isinstance(x['doc'], dict) and 'choices' in x['doc']:
        # acc and acc_norm are compared exactly below: every choice leads,
        # raw and per character, by 20x the tolerance above (both sides' float
        # error on any CPU), so another machine's rounding cannot flip it.
        # (lambada's is_greedy: the random model's targets score -23 to -64,
        # nowhere near its greedy continuation.)
        lens = np.array([len(c) for c in x['doc']['choices']], float)
        tol = 1e-4 + 1e-6 * np.abs(ly)
        for v, t in ((ly, tol), (ly / lens, tol / lens)):
          top2 = np.sort(v)[-2:]
          assert top2[1] - top2[0] > 20 * t.max(), (task, x['doc_id'], v)
      if task == 'glm_bpb_en':
        windows += len(x['doc']['text']) > 4 * MAX_LEN
    for metric, value in ref['results'][task].items():
      if ',' not in metric or 'stderr' in metric:
        continue
      if metric.startswith('acc'):
        assert ours['results'][task][metric] == value, (task, metric)
      else:
        np.testing.assert_allclose(ours['results'][task][metric], value,
                                   rtol=1e-4, err_msg=f'{task} {metric}')
  assert windows, 'no document was long enough to need rolling windows'


@pytest.mark.slow  # two processes on faked devices
def test_mesh_splits_the_batch_and_changes_nothing(bloom, data_dir, tmp_path):
  """`glm eval --mesh data=2` on two faked CPU devices: the same
  per-request log-likelihoods as one device."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  _, glm_dir = bloom
  outs = {}
  for mesh in ('', 'data=2'):
    out = str(tmp_path / f'eval{mesh}.json')
    args = [sys.executable, '-m', 'glm', 'eval', '--checkpoint', glm_dir,
            '--tasks', 'glm_cloze_en,glm_bpb_en', '--limit', '3',
            '--batch_size', '3', '--data_dir', data_dir, '--log_samples',
            '--output', out] + (['--mesh', mesh] if mesh else [])
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out) as f:
      outs[mesh] = json.load(f)['samples']
  for task in ('glm_cloze_en', 'glm_bpb_en'):
    for x, y in zip(outs[''][task], outs['data=2'][task]):
      lx = [r[0] if isinstance(r, list) else r for r in x['filtered_resps']]
      ly = [r[0] if isinstance(r, list) else r for r in y['filtered_resps']]
      np.testing.assert_allclose(lx, ly, atol=1e-4, rtol=1e-6)


def test_packing_equals_scoring_one_at_a_time(bloom):
  _, glm_dir = bloom
  lm = harness.GlmLM(glm_dir, batch_size=2, pack_len=48)
  rng = np.random.default_rng(0)
  pairs = [(list(rng.integers(3, 300, size=int(n))),
            list(rng.integers(3, 300, size=int(m))))
           for n, m in zip(rng.integers(1, 60, 20), rng.integers(1, 10, 20))]
  rows = harness.pack([len(c) + len(x) - 1 for c, x in pairs], 48, MAX_LEN)
  assert len(rows) < len(pairs)   # several requests share a row
  got = lm._loglikelihood_tokens([(None, c, x) for c, x in pairs])
  for (c, x), (ll, greedy) in zip(pairs, got):
    whole = (c + x)[-(MAX_LEN + 1):]
    lp = scoring.score(lm.cfg, lm.params, [whole], batch_size=1)[0]
    n = min(len(x), len(whole) - 1)
    np.testing.assert_allclose(ll, sum(lp[-n:]), atol=1e-4)
    assert isinstance(greedy, bool)


def test_pack_fills_rows_first_fit():
  rows = harness.pack([30, 20, 10, 5, 40, 100], 64, 128)
  lengths = {i: n for i, n in enumerate([30, 20, 10, 5, 40, 100])}
  seen = sorted(i for _, members in rows for i, _ in members)
  assert seen == list(range(6))
  for length, members in rows:
    assert sum(lengths[i] for i, _ in members) <= length
    offsets = sorted(off for _, off in members)
    assert offsets[0] == 0
  assert [length for length, _ in rows] == [128, 64, 64]


def test_missing_checkpoint_and_bad_limit_fail_in_one_line(bloom, tmp_path,
                                                           capsys):
  _, glm_dir = bloom
  out = str(tmp_path / 'x.json')
  assert cli.main(['eval', '--checkpoint', str(tmp_path / 'nope'), '--tasks',
                   'glm_lambada_en', '--output', out]) == 2
  assert 'is not a folder' in capsys.readouterr().err
  assert cli.main(['eval', '--checkpoint', glm_dir, '--tasks',
                   'glm_lambada_en', '--limit', 'x', '--output', out]) == 2
  assert '--limit' in capsys.readouterr().err
  assert not os.path.exists(out)


@pytest.mark.slow  # indexes the harness's 14k tasks twice (~6 s each)
def test_download_and_unknown_tasks_fail_in_one_line(bloom, tmp_path, capsys):
  _, glm_dir = bloom
  out = str(tmp_path / 'x.json')
  # A harness task whose data is on the Hub, and a name nobody knows.
  assert cli.main(['eval', '--checkpoint', glm_dir, '--tasks',
                   'lambada_openai', '--output', out]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'needs a dataset download' in err[0], err
  assert cli.main(['eval', '--checkpoint', glm_dir, '--tasks', 'glm_nope',
                   '--output', out]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "'glm_nope'" in err[-1] and '--include_path' in err[-1], err
  assert not os.path.exists(out)


class _SpecialsOnly:
  """A tokenizer of ids only: GLM's special pieces and an eos."""

  def __init__(self, names):
    self.special_ids = {n: i for i, n in enumerate(names)}
    self.eos_id = self.special_ids['</s>']

  def encode(self, text):
    return [self.special_ids.get(w) or int(w) for w in text.split()]

  def decode(self, ids):
    return ' '.join(str(i) for i in ids)


@pytest.mark.parametrize('family', ['glm130b', 'glm2d'])
def test_glm_scoring_equals_cached_infill_decoding(family):
  """scoring='glm' (packed Part A + [gMASK], Part B teacher-forced) gives
  the log-likelihood that blank-infilling decoding assigns token by token
  (infill.layout, a prefill and cached steps)."""
  import jax  # pylint: disable=g-import-not-at-top
  from test_infill import IDS, FIRST, K, _NAMES, make_cfg  # pylint: disable=g-import-not-at-top
  from glm.inference import generate as gen  # pylint: disable=g-import-not-at-top
  from glm.inference import infill  # pylint: disable=g-import-not-at-top
  from glm.model import transformer  # pylint: disable=g-import-not-at-top
  cfg = make_cfg(family)
  params = transformer.Transformer(cfg).init(
      jax.random.PRNGKey(3), {'tokens': np.zeros((1, 8), np.int32)})['params']
  lm = harness.GlmLM(cfg=cfg, params=params, tokenizer=_SpecialsOnly(_NAMES),
                     scoring='glm', batch_size=2, pack_len=32)
  rng = np.random.default_rng(1)
  m = 3   # one compiled reference: Part A padded to 12, 3 new tokens
  pairs = [(list(FIRST + rng.integers(0, K, size=int(n))),
            list(FIRST + rng.integers(0, K, size=m)))
           for n in rng.integers(1, 11, 4)]
  got = lm._loglikelihood_tokens([(None, c, x) for c, x in pairs])

  @jax.jit
  def reference(lay, x):
    logits, cache, step = gen.prefill(cfg, params, lay, m)
    total = 0.0
    for j in range(m):
      total += jax.nn.log_softmax(logits[0])[x[j]]
      logits, cache = step(cache, x[j:j + 1], 12 + 1 + j)
    return total

  for (c, x), (ll, _) in zip(pairs, got):
    part_a = c + [IDS.gmask]
    lay = infill.layout(cfg, [(part_a, len(part_a) - 1)], IDS, m, length=12)
    np.testing.assert_allclose(ll, float(reference(lay, np.asarray(x))),
                               atol=1e-4)


def test_generate_until_infills_like_infill():
  """A context holding [MASK] (and, with GLM scoring, one without: [gMASK]
  appended) is answered with the span blank-infilling decodes greedily."""
  import jax  # pylint: disable=g-import-not-at-top
  from test_infill import IDS, FIRST, _NAMES, make_cfg  # pylint: disable=g-import-not-at-top
  from glm.inference import infill  # pylint: disable=g-import-not-at-top
  from glm.model import transformer  # pylint: disable=g-import-not-at-top
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  cfg = make_cfg('glm130b')
  params = transformer.init_params(cfg, jax.random.PRNGKey(5))
  lm = harness.GlmLM(cfg=cfg, params=params, tokenizer=_SpecialsOnly(_NAMES),
                     scoring='glm', batch_size=2)
  prompts = [[FIRST + 1, FIRST + 2, IDS.mask, FIRST + 3], [FIRST + 4] * 3]
  kw = {'until': ['never'], 'max_gen_toks': 4}
  got = lm.generate_until([
      Instance('generate_until', {}, (' '.join(map(str, p)), dict(kw)), i)
      for i, p in enumerate(prompts)])
  want = infill.infill(cfg, params, prompts, IDS, max_new_tokens=4)
  assert any(got), got  # spans, not only stop tokens
  assert got == [' '.join(map(str, w['spans'][0]['tokens'])) for w in want]
