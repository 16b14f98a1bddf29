"""The local lm-eval tasks: deterministic, leak-free, solvable by memory."""

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

from glm.data import corpus
from glm.evaluation import local_tasks as lt

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MC = ('cloze', 'code_line')


def _squash(text):
  return ''.join(text.split())


@pytest.fixture(scope='module')
def corpus_dir(data_dir):
  path = os.path.join(data_dir, 'corpus')
  corpus.ensure_corpus(path)
  return path


@pytest.fixture(scope='module')
def heldout(corpus_dir):
  return [d for d in corpus.iter_documents(corpus_dir, 'valid')]


@pytest.fixture(scope='module')
def all_rows(corpus_dir):
  return {(f, l): lt.build_rows(corpus_dir, f, l)
          for l in lt.LANGUAGES for f in lt.families(l)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('USE_TF', '0')
  monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf'))


def _digest(rows):
  return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def test_rows_are_deterministic_and_independent_of_call_order(corpus_dir):
  keys = [('cloze', 'de'), ('infill', 'ja'), ('code_line', 'code'),
          ('lambada', 'en'), ('bpb', 'ru'), ('cloze', 'en')]
  first = {k: lt.build_rows(corpus_dir, *k) for k in keys}
  lt._read.cache_clear()  # pylint: disable=protected-access
  second = {k: lt.build_rows(corpus_dir, *k) for k in reversed(keys)}
  assert first == second
  assert any(first.values())
  # Another process with another str hash seed builds the same rows.
  code = ('import hashlib, json, sys; from glm.evaluation import local_tasks'
          ' as lt; keys = json.loads(sys.argv[2]); print(json.dumps([hashlib.'
          'sha256(json.dumps(lt.build_rows(sys.argv[1], *k), sort_keys=True)'
          '.encode()).hexdigest() for k in keys]))')
  out = subprocess.run(
      [sys.executable, '-c', code, corpus_dir, json.dumps(keys)], cwd=_ROOT,
      env={**os.environ, 'PYTHONHASHSEED': '12345'}, check=True,
      capture_output=True, text=True).stdout
  assert json.loads(out) == [_digest(first[k]) for k in keys]


def test_every_listed_task_has_rows_and_few_shot_rows(corpus_dir, all_rows):
  for (family, lang), rows in all_rows.items():
    # Fails when this machine's corpus no longer fits LANGUAGES: check
    # `--summary` and update LANGUAGES, then --write_yaml.
    assert 1 <= len(rows) <= lt.CAPS[family], (family, lang)
    if family != 'bpb':
      assert len(rows) >= lt.MIN_ROWS, (family, lang)
    train = lt.build_rows(corpus_dir, family, lang, 'train')
    assert train and len(train) <= lt.FEWSHOT_ROWS, (family, lang)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in rows}


def test_no_leakage_and_label_positions_vary(heldout, all_rows):
  by_id = {d['id']: d['text'] for d in heldout}
  flat = '\x00'.join(_squash(t) for t in by_id.values())
  labels = []
  for (family, lang), rows in all_rows.items():
    delim = lt.yaml_files()[f'{lt.task_name(family, lang)}.yaml']
    for row in rows:
      if family in ('lambada', 'infill'):
        ctx = row['context']
        target = row.get('target') or row['answer']
        assert 2 <= len(target.strip()) <= 60 and target.strip().replace(
            ' ', '').isalpha(), row
        whole = (ctx + target if family == 'lambada'
                 else ctx.replace('[MASK]', target))
        assert _squash(whole) in flat
        assert family == 'lambada' or ctx.count('[MASK]') == 1
        continue
      if family not in _MC:
        assert row['text'].strip() and len(row['text']) <= 2000
        continue
      sep = '' if family == 'code_line' or "delimiter: ''" in delim else ' '
      choices, label = row['choices'], row['label']
      labels.append(label)
      assert len(choices) == 4 and len({_squash(c).casefold()
                                        for c in choices}) == 4
      answer = choices[label]
      assert _squash(row['context'] + sep + answer) in flat
      assert _squash(answer).casefold() not in _squash(
          row['context']).casefold()
      sources = [t for t in by_id.values()
                 if _squash(row['context'] + sep + answer) in _squash(t)]
      for i, choice in enumerate(choices):
        if i != label:
          assert _squash(row['context'] + sep + choice) not in flat
          assert not any(_squash(choice.strip()).casefold()
                         in _squash(t).casefold() for t in sources), choice
  counts = [labels.count(i) for i in range(4)]
  assert min(counts) > 0.15 * len(labels), counts


def test_yaml_files_are_what_write_yaml_writes(tmp_path):
  files = lt.yaml_files()
  on_disk = {n for n in os.listdir(lt.tasks_dir())
             if n.endswith('.yaml') or n.endswith('_template_yaml')}
  assert on_disk == set(files)
  for name, text in files.items():
    with open(os.path.join(lt.tasks_dir(), name), encoding='utf-8') as f:
      assert f.read() == text, f'{name} is stale: run --write_yaml'
  assert sorted(lt.write_yaml(str(tmp_path))) == sorted(files)
  assert lt.task_language('glm_lambada_pt_br') == 'pt-BR'
  assert lt.task_language('glm_code_line') == 'code'
  assert lt.task_language('glm_zero_shot_ja') == 'ja'
  assert lt.task_language('lambada_openai') == ''
  assert lt.task_language('glm_zero_shot') == ''
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  manager = TaskManager(include_path=lt.tasks_dir(), include_defaults=False)
  assert set(manager.all_groups) == {'glm_zero_shot'} | {
      lt.group_name(l) for l in lt.LANGUAGES}
  assert set(manager.all_subtasks) == {
      lt.task_name(f, l) for l in lt.LANGUAGES for f in lt.families(l)}


def test_missing_corpus_is_one_line(tmp_path):
  with pytest.raises(lt.DataError, match='make run') as err:
    lt.load_dataset(family='cloze', language='en',
                    glm_data_dir=str(tmp_path), version=1.0)
  assert '\n' not in str(err.value)


def _lm_classes():
  from lm_eval.api.model import LM  # pylint: disable=g-import-not-at-top

  class Memorised(LM):
    """Knows the held-out documents by heart (whitespace aside)."""

    def __init__(self, texts):
      super().__init__()
      self.texts = texts
      self.flat = '\x00'.join(_squash(t) for t in texts)

    def loglikelihood(self, requests):
      out = []
      for r in requests:
        ctx, cont = r.args
        hit = _squash(ctx + cont) in self.flat
        out.append((0.0, True) if hit else (-10.0 * len(cont), False))
      return out

    def loglikelihood_rolling(self, requests):
      return [0.0 for _ in requests]

    def generate_until(self, requests):
      out = []
      for r in requests:
        before, after = r.args[0].split('[MASK]')
        spans = [t[t.index(before) + len(before):] for t in self.texts
                 if before in t]
        out.append(next((s[:s.index(after)] for s in spans if after in s),
                        ''))
      return out

  class Uniform(LM):
    """Every byte equally likely: knows nothing."""

    def loglikelihood(self, requests):
      return [(-math.log(256) * len(r.args[1].encode()), False)
              for r in requests]

    def loglikelihood_rolling(self, requests):
      return [-math.log(256) * len(r.args[0].encode()) for r in requests]

    def generate_until(self, requests):
      return ['' for _ in requests]

  return Memorised, Uniform


def _evaluate(lm, tasks, data_dir, num_fewshot=None):
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  manager = TaskManager(include_path=lt.tasks_dir(), include_defaults=False,
                        metadata={'glm_data_dir': data_dir})
  res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                num_fewshot=num_fewshot, bootstrap_iters=0,
                                log_samples=False)
  return res['results']


def test_memorising_model_scores_100_and_uniform_chance(data_dir, heldout,
                                                       all_rows):
  memorised, uniform = _lm_classes()
  langs = [l for l in lt.LANGUAGES
           if all(all_rows[(f, l)] for f in lt.families(l))]
  assert {'code', 'en', 'ja', 'ru'} <= set(langs)
  tasks = [lt.group_name(l) for l in langs]
  res = _evaluate(memorised([d['text'] for d in heldout]), tasks, data_dir)
  leaves = {lt.task_name(f, l) for l in langs for f in lt.families(l)}
  assert leaves <= set(res)
  for name in leaves:
    family = name.split('_')[1]
    r = res[name]
    if family in ('cloze', 'code'):
      assert r['acc,none'] == 1.0 and r['acc_norm,none'] == 1.0, name
    elif family == 'lambada':
      assert r['acc,none'] == 1.0 and r['perplexity,none'] == 1.0, name
    elif family == 'infill':
      assert r['exact_match,strip'] == 1.0, name
    else:
      assert r['bits_per_byte,none'] == 0.0, name
  # Few-shot prompts (from the train split) build for every family.
  res = _evaluate(uniform(), tasks, data_dir, num_fewshot=1)
  mc = [(res[n]['acc_norm,none'], res[n]['acc,none'], res[n]['sample_len'])
        for n in leaves if n.split('_')[1] in ('cloze', 'code')]
  total = sum(n for _, _, n in mc)
  assert sum(a * n for a, _, n in mc) / total < 0.45
  assert sum(a * n for _, a, n in mc) / total < 0.45
  for name in leaves:
    if '_lambada_' in name:
      assert res[name]['acc,none'] == 0.0
    elif '_infill_' in name:
      assert res[name]['exact_match,strip'] == 0.0
    elif '_bpb_' in name:
      assert res[name]['bits_per_byte,none'] == pytest.approx(8.0)
