"""`glm sweep`: a grid (or zipped lists) of gin bindings, one `glm train`
workdir per variant, results and plots at the end.

  D/sweep.json        the sweep: base command, axes and every variant's argv
  D/<variant>/        an ordinary `glm train` workdir (its config.gin, run.json,
                      metrics.jsonl, eval.jsonl, model/, final.json)
  D/logs/<variant>.log  the variant's stdout and stderr
  D/results.jsonl     one row per variant (glm.experiments.results)
  D/results.md        the table, mean +- std over seeds
  D/*.png             loss curves, final metric per axis, loss vs compute

A variant whose final.json exists (and whose command is unchanged) is done: a
rerun skips it; an interrupted one resumes from its last checkpoint (the same
`glm train` command); a failed one is recorded and the others go on.

A sweep file (configs/ablations/*.yaml) names the axes:

  gin_file: [configs/runs/tiny_bloom.gin]   # optional; --gin_file adds more
  bindings: {TRAIN_STEPS: 200}              # every variant
  grid: {ModelConfig.position: [alibi, rope], train.seed: [0, 1]}
  zip: {ModelConfig.hidden: [32, 64], ModelConfig.num_layers: [2, 4]}
  isoflop: {budgets: [...], sizes: [...]}   # glm.experiments.scaling

Values are YAML scalars (strings become gin strings; '@x' and '%X' stay gin
references) or, with --axis NAME=V1,V2 on the command line, gin literals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Sequence

from glm import files
from glm.errors import UserError


class SweepError(UserError):
  """A sweep that cannot start, with the fix."""


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  axes: tuple[tuple[str, str], ...]  # (gin name, gin literal) per axis

  @property
  def bindings(self) -> list[str]:
    return [f'{k}={v}' for k, v in self.axes]


def gin_literal(value: Any) -> str:
  """A YAML value as gin text: strings quoted unless a gin reference."""
  if isinstance(value, str):
    return value if value[:1] in '@%' else repr(value)
  if isinstance(value, (bool, int, float, type(None), list, tuple)):
    return repr(value)
  raise SweepError(f'sweep value {value!r} is a {type(value).__name__}; use '
                   'a number, string, boolean or list.')


def split_values(text: str) -> list[str]:
  """'a','b,c',[1, 2],3 -> ["'a'", "'b,c'", '[1, 2]', '3']: commas outside
  quotes and brackets separate the gin literals of --axis."""
  out, depth, quote, cur = [], 0, '', ''
  for ch in text:
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      out.append(cur.strip())
      cur = ''
      continue
    cur += ch
  out.append(cur.strip())
  if quote or depth or not all(out):
    raise SweepError(f'--axis values {text!r} do not split into gin literals '
                     "(an empty value, an open quote or bracket); write "
                     "--axis NAME=V1,V2 as in --axis \"ModelConfig.position="
                     "'alibi','rope'\".")
  return out


def parse_axis(text: str) -> tuple[str, list[str]]:
  name, sep, values = text.partition('=')
  if not sep or not name.strip():
    raise SweepError(f'--axis {text!r} needs NAME=V1,V2,...; e.g. --axis '
                     'train.seed=0,1.')
  return name.strip(), split_values(values)


def load_spec(path: str) -> dict:
  """A sweep file: {gin_file, bindings, grid, zip} (all optional but an axis)."""
  import yaml  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise SweepError(f'no sweep file {path}; the ones in this repository are '
                     'in configs/ablations/.')
  with open(path) as f:
    spec = yaml.safe_load(f) or {}
  unknown = set(spec) - {'gin_file', 'bindings', 'grid', 'zip', 'scaling',
                         'description', 'metric', 'isoflop'}
  if unknown:
    raise SweepError(f'sweep file {path} has unknown keys {sorted(unknown)}; '
                     'use gin_file, bindings, grid, zip, isoflop, scaling, '
                     'metric, description.')
  for key in ('grid', 'zip'):
    for name, values in (spec.get(key) or {}).items():
      if not isinstance(values, list) or not values:
        raise SweepError(f'{key}.{name} in {path} must be a non-empty list, '
                         f'not {values!r}.')
  return spec


def _short(name: str) -> str:
  return name.rsplit('.', 1)[-1]


def _slug(value: str) -> str:
  value = value.strip('\'"')
  return re.sub(r'[^A-Za-z0-9.+-]+', '-', value).strip('-') or 'x'


def variants(grid: dict[str, list[str]], zipped: dict[str, list[str]]
             ) -> list[Variant]:
  """The product of the grid axes with the zipped lists (as one axis)."""
  if not grid and not zipped:
    raise SweepError('the sweep has no axis; give --axis NAME=V1,V2 or a '
                     'sweep file with grid: or zip:.')
  lengths = {len(v) for v in zipped.values()}
  if len(lengths) > 1:
    raise SweepError('the zip: lists have different lengths '
                     f'({ {k: len(v) for k, v in zipped.items()} }); give '
                     'each the same number of values.')
  names = [*grid, *zipped]
  shorts = [_short(n) for n in names]
  label = {n: (s if shorts.count(s) == 1 else n) for n, s in zip(names,
                                                                   shorts)}
  zip_rows = [tuple(zip(zipped, vals)) for vals in zip(*zipped.values())] or [
      ()]
  out = []
  for combo in itertools.product(*(list(v) for v in grid.values())):
    for zrow in zip_rows:
      axes = (*zip(grid, combo), *zrow)
      name = '_'.join(f'{label[k]}={_slug(v)}' for k, v in axes)
      if len(name) > 100:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name[:90] + '-' + digest
      out.append(Variant(name, tuple(axes)))
  if len({v.name for v in out}) != len(out):
    raise SweepError('two variants get the same workdir name (values that '
                     'differ only in punctuation); make the values distinct.')
  return out


@dataclasses.dataclass
class Sweep:
  """What `glm sweep` runs: base train arguments and the variants."""
  workdir: str
  gin_files: list[str]
  bindings: list[str]      # every variant, before its own axes
  variants: list[Variant]
  axes: list[str]
  mesh: str | None = None
  scaling: bool = False
  metric: str = 'eval_loss'
  isoflop_budgets: list[float] | None = None  # an IsoFLOP sweep's budgets

  def argv(self, v: Variant) -> list[str]:
    out = [sys.executable, '-m', 'glm', 'train']
    for f in self.gin_files:
      out += ['--gin_file', f]
    out += ['--workdir', os.path.join(self.workdir, v.name)]
    out += [f'--gin.{b}' for b in (*self.bindings, *v.bindings)]
    if self.mesh:
      out += ['--mesh', self.mesh]
    return out


def build(gin_files: Sequence[str], bindings: Sequence[str],
          sweep_file: str | None, axis_args: Sequence[str], workdir: str,
          mesh: str | None = None) -> Sweep:
  spec = load_spec(sweep_file) if sweep_file else {}
  files = [*(spec.get('gin_file') or []), *gin_files]
  if isinstance(spec.get('gin_file'), str):
    files = [spec['gin_file'], *gin_files]
  if not files:
    raise SweepError('no gin file; give --gin_file F (or gin_file: in the '
                     'sweep file).')
  for f in files:
    if not os.path.isfile(f):
      raise SweepError(f'no gin file {f}; pass the path of a .gin file, e.g. '
                       'configs/runs/default.gin.')
  fixed = [f'{k}={gin_literal(v)}' for k, v in
           (spec.get('bindings') or {}).items()]
  grid = {k: [gin_literal(x) for x in v] for k, v in
          (spec.get('grid') or {}).items()}
  for text in axis_args:
    name, values = parse_axis(text)
    grid[name] = values
  zipped = {k: [gin_literal(x) for x in v] for k, v in
            (spec.get('zip') or {}).items()}
  budgets = None
  if spec.get('isoflop'):
    from glm.experiments import scaling  # pylint: disable=g-import-not-at-top
    sizes, budgets = scaling.plan(files, [*fixed, *bindings], spec['isoflop'])
    zipped |= {k: [str(x) for x in v] for k, v in sizes.items()}
  vs = variants(grid, zipped)
  return Sweep(workdir=workdir, gin_files=files,
               bindings=[*fixed, *bindings], variants=vs,
               axes=[*grid, *zipped], mesh=mesh,
               scaling=bool(spec.get('scaling') or budgets),
               metric=spec.get('metric', 'eval_loss'),
               isoflop_budgets=budgets)


def is_done(sweep: Sweep, v: Variant, recorded: dict[str, list[str]]) -> bool:
  """final.json is written last; an unchanged command makes it this run's."""
  final = os.path.join(sweep.workdir, v.name, 'final.json')
  return os.path.isfile(final) and recorded.get(v.name) == sweep.argv(v)[1:]


def _cpu_shares(n: int) -> list[set[int]]:
  cores = sorted(os.sched_getaffinity(0))
  n = max(1, min(n, len(cores)))
  return [set(cores[i::n]) for i in range(n)]


def _latest_step(workdir: str) -> int | None:
  path = os.path.join(workdir, 'metrics.jsonl')
  try:
    with open(path, 'rb') as f:
      f.seek(max(0, os.path.getsize(path) - 4096))
      lines = f.read().decode(errors='replace').strip().splitlines()
    return json.loads(lines[-1])['step'] if lines else None
  except (OSError, ValueError, KeyError):
    return None


def _fmt(seconds: float) -> str:
  seconds = int(round(seconds))
  return (f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600
          else f'{seconds // 60}m{seconds % 60:02d}s')


def run(sweep: Sweep, parallel: int = 1, poll_s: float = 2.0,
        status_every_s: float = 30.0, log=print) -> dict[str, dict]:
  """Trains every unfinished variant, `parallel` at once; returns
  {name: {'status': done|skipped|failed, 'seconds', 'error'}}."""
  os.makedirs(os.path.join(sweep.workdir, 'logs'), exist_ok=True)
  meta_path = os.path.join(sweep.workdir, 'sweep.json')
  recorded = {}
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      recorded = json.load(f).get('argv', {})
  outcome = {v.name: {'status': 'skipped'} for v in sweep.variants
             if is_done(sweep, v, recorded)}
  todo = [v for v in sweep.variants if v.name not in outcome]
  meta = {'gin_files': sweep.gin_files, 'bindings': sweep.bindings,
          'axes': sweep.axes, 'mesh': sweep.mesh, 'scaling': sweep.scaling,
          'metric': sweep.metric, 'isoflop_budgets': sweep.isoflop_budgets,
          'variants': [{'name': v.name, 'axes': dict(v.axes)}
                       for v in sweep.variants],
          'argv': {**recorded, **{v.name: sweep.argv(v)[1:]
                                  for v in sweep.variants}}}
  _write_json(meta_path, meta)
  total = len(sweep.variants)
  log(f'glm sweep: {total} variants in {sweep.workdir}: {len(outcome)} '
      f'finished before, {len(todo)} to run, {parallel} at once')
  shares = _cpu_shares(parallel)
  free = list(range(len(shares)))
  running: dict[int, tuple[Variant, subprocess.Popen, float, Any]] = {}
  # The first variant runs alone until it logs a step: the corpus and the
  # tokenizer it builds on first use are then not built twice at once.
  gate: tuple[str, subprocess.Popen] | None = None
  durations: list[float] = []
  last_status = time.time()
  while todo or running:
    while todo and free:
      if (gate is not None and gate[1].poll() is None
          and _latest_step(gate[0]) is None):
        break
      slot, v = free.pop(0), todo.pop(0)
      env = dict(os.environ)
      if parallel > 1:  # each child compiles and runs on its own cores
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_'
                            f'thread_eigen=false').strip()
      logf = open(os.path.join(sweep.workdir, 'logs', v.name + '.log'), 'a')
      share = shares[slot]
      proc = subprocess.Popen(
          sweep.argv(v), stdout=logf, stderr=subprocess.STDOUT, env=env,
          preexec_fn=(lambda s=share: os.sched_setaffinity(0, s))
          if parallel > 1 else None)
      running[slot] = (v, proc, time.time(), logf)
      gate = gate or (os.path.join(sweep.workdir, v.name), proc)
      log(f'start {v.name}')
    time.sleep(poll_s)
    for slot, (v, proc, t0, logf) in list(running.items()):
      if proc.poll() is None:
        continue
      logf.close()
      seconds = time.time() - t0
      del running[slot]
      free.append(slot)
      if proc.returncode == 0:
        durations.append(seconds)
        outcome[v.name] = {'status': 'done', 'seconds': seconds}
      else:
        outcome[v.name] = {'status': 'failed', 'seconds': seconds,
                           'error': _last_error(sweep, v, proc.returncode)}
      left = len(todo) + len(running)
      eta = (sum(durations) / len(durations) * left / max(1, len(shares))
             if durations else None)
      log(f'[{len(outcome)}/{total}] {outcome[v.name]["status"]} {v.name} '
          f'in {_fmt(seconds)}'
          + (f': {outcome[v.name]["error"]}' if proc.returncode else '')
          + (f'; ETA {_fmt(eta)}' if eta is not None and left else ''))
    if running and time.time() - last_status >= status_every_s:
      last_status = time.time()
      parts = []
      for v, _, t0, _ in running.values():
        step = _latest_step(os.path.join(sweep.workdir, v.name))
        parts.append(f'{v.name} step {step if step is not None else "-"} '
                     f'({_fmt(time.time() - t0)})')
      log('  running: ' + '; '.join(parts))
  return outcome


def _last_error(sweep: Sweep, v: Variant, rc: int) -> str:
  path = os.path.join(sweep.workdir, 'logs', v.name + '.log')
  with open(path, errors='replace') as f:
    lines = [l.strip() for l in f if l.strip()]
  return (lines[-1] if lines else '') + f' (exit status {rc}; log {path})'


def _write_json(path: str, obj: Any) -> None:
  files.write_text_atomic(path, json.dumps(obj, indent=1))
