"""What a sweep's workdirs hold, as rows: one per variant, then the mean and
std over seeds (variants equal but for `train.seed`).

A row: the variant's axes, status, final and best held-out loss (overall and
per language, and at longer lengths `len_<k>x`) and token accuracy
(`acc/...`), eval task metrics, train
loss, loss spikes (logged steps whose train loss is not finite or above 1.2x
the lowest loss logged before; SPIKE_RATIO), skipped steps, median tokens/s,
wall time, parameters, training tokens and FLOPs (glm.model.info's 3 x
forward per token x train_steps x batch x seq_len).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Sequence

from glm import files

SEED = 'train.seed'
SPIKE_RATIO = 1.2


def loss_spikes(losses: Sequence[float]) -> int:
  """Logged losses that are not finite or above SPIKE_RATIO x the lowest
  finite loss logged before them."""
  spikes, low = 0, math.inf
  for x in losses:
    if not math.isfinite(x) or x > SPIKE_RATIO * low:
      spikes += 1
    if math.isfinite(x):
      low = min(low, x)
  return spikes


# The held-out numbers per set that eval.jsonl rows carry beside 'all': per
# language, per mixture task, harness tasks, longer lengths, accuracies.
PER_SET = ('lang/', 'task/', 'tasks/', 'len_', 'acc/')


def read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_row(workdir: str) -> dict[str, Any]:
  """The numbers of one `glm train` workdir (finished or not)."""
  from glm.model import info as info_lib  # pylint: disable=g-import-not-at-top
  from glm.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  final = read_json(os.path.join(workdir, 'final.json')) or {}
  run = read_json(os.path.join(workdir, 'run.json')) or {}
  metrics = files.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  evals = files.read_jsonl(os.path.join(workdir, 'eval.jsonl'))
  row: dict[str, Any] = {'workdir': workdir, 'steps': final.get('step')}
  if final:
    row |= {'train_loss': final.get('train_loss'),
            'eval_loss': final.get('eval_loss'),
            'wall_s': final.get('elapsed_s'),
            'skipped_steps': final.get('skipped_steps')}
  if metrics:
    row['loss_spikes'] = loss_spikes(
        [float(m['loss']) for m in metrics if m.get('loss') is not None])
  if evals:
    row['best_eval_loss'] = min(e['all'] for e in evals if 'all' in e)
    last = evals[-1]
    row |= {k: v for k, v in last.items() if k.startswith(PER_SET)}
  speeds = [m['tokens_per_s'] for m in metrics[1:] if 'tokens_per_s' in m]
  if speeds:
    row['tokens_per_s'] = statistics.median(speeds)
  if run.get('model_config'):
    cfg = ModelConfig(**run['model_config'])
    s = run.get('settings', {})
    stats = info_lib.info(cfg, s.get('seq_len'))
    row['params'] = stats['params']
    tokens = s.get('train_steps', 0) * s.get('batch_size', 0) * s.get(
        'seq_len', 0)
    row['tokens'] = tokens
    row['flops'] = float(stats['flops_per_token']) * tokens
  return row


def sweep_rows(sweep_dir: str, outcome: dict[str, dict] | None = None
               ) -> list[dict[str, Any]]:
  """One row per variant of D/sweep.json, in its order."""
  meta = read_json(os.path.join(sweep_dir, 'sweep.json'))
  if meta is None:
    raise FileNotFoundError(os.path.join(sweep_dir, 'sweep.json'))
  rows = []
  for v in meta['variants']:
    row = {'name': v['name'], 'axes': v['axes']}
    row |= run_row(os.path.join(sweep_dir, v['name']))
    status = (outcome or {}).get(v['name'], {})
    row['status'] = status.get('status') or (
        'done' if row.get('steps') is not None else 'unfinished')
    if status.get('error'):
      row['error'] = status['error']
    rows.append(row)
  return rows


NUMBERS = ('eval_loss', 'best_eval_loss', 'train_loss', 'loss_spikes',
           'skipped_steps', 'tokens_per_s', 'wall_s', 'params', 'tokens',
           'flops')


def group_by_seed(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Rows equal but for train.seed -> {axes, n, <metric>: (mean, std)}."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    key = json.dumps({k: v for k, v in r['axes'].items() if k != SEED},
                     sort_keys=True)
    groups.setdefault(key, []).append(r)
  out = []
  for key, members in groups.items():
    done = [m for m in members if m['status'] in ('done', 'skipped')]
    g: dict[str, Any] = {'axes': json.loads(key), 'n': len(done),
                         'failed': len(members) - len(done),
                         'names': [m['name'] for m in members]}
    fields = sorted({k for m in done for k in m
                     if k in NUMBERS or k.startswith(PER_SET)})
    for k in fields:
      vals = [m[k] for m in done if isinstance(m.get(k), (int, float))]
      if vals:
        g[k] = (statistics.fmean(vals),
                statistics.stdev(vals) if len(vals) > 1 else 0.0)
    out.append(g)
  return out


def _num(x: float) -> str:
  if x == 0 or not math.isfinite(x):
    return f'{x:g}'
  if abs(x) >= 1e5:
    return f'{x:.3g}'
  return f'{x:.4g}' if abs(x) < 100 else f'{x:,.0f}'


def _cell(value) -> str:
  if value is None:
    return ''
  mean, std = value
  return _num(mean) + (f' ± {_num(std)}' if std else '')


def markdown(rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> str:
  """results.md: the seed-mean table, a per-language table, the variants."""
  groups = group_by_seed(rows)
  shown = [a for a in axes if a != SEED]
  cols = ['eval_loss', 'best_eval_loss', 'train_loss', 'loss_spikes',
          'skipped_steps', 'tokens_per_s', 'wall_s', 'params', 'flops']
  extra = sorted({k for g in groups for k in g
                  if k.startswith(('tasks/', 'task/', 'len_', 'acc/task/'))
                  or k == 'acc/all'})
  head = [*shown, 'seeds', *cols, *extra]
  lines = ['# Sweep results', '',
           'Mean ± std over seeds (variants equal but for train.seed); '
           'losses are held-out cross-entropy in nats per token.', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for g in groups:
    cells = [str(g['axes'].get(a, '')) for a in shown]
    seeds = str(g['n']) + (f' ({g["failed"]} failed)' if g['failed'] else '')
    cells += [seeds, *(_cell(g.get(c)) for c in (*cols, *extra))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  langs = sorted({k for g in groups for k in g if k.startswith('lang/')})
  if langs:
    head = [*shown, *(l[len('lang/'):] for l in langs)]
    lines += ['', '## Final held-out loss per language', '',
              '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for g in groups:
      cells = [str(g['axes'].get(a, '')) for a in shown]
      cells += [_cell(g.get(l)) for l in langs]
      lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', '## Variants', '', '| variant | status | eval_loss | note |',
            '|---|---|---|---|']
  for r in rows:
    loss = r.get('eval_loss')
    status = {'skipped': 'done (by an earlier run)'}.get(r['status'],
                                                          r['status'])
    lines.append(f"| {r['name']} | {status} | "
                 f"{'' if loss is None else _num(loss)} | "
                 f"{r.get('error', '')} |")
  return '\n'.join(lines) + '\n'


def write(sweep_dir: str, rows: Sequence[dict[str, Any]],
          axes: Sequence[str], extra: str = '') -> None:
  """D/results.jsonl and D/results.md (+ `extra` sections), each written
  whole then renamed."""
  text = ''.join(json.dumps(r) + '\n' for r in rows)
  files.write_text_atomic(os.path.join(sweep_dir, 'results.jsonl'), text)
  files.write_text_atomic(os.path.join(sweep_dir, 'results.md'),
                          markdown(rows, axes) + extra)
