"""A run's workdir: what it records, and the checks that protect it.

  W/config.gin        the operative gin config (also in TensorBoard as text)
  W/config_history/   earlier config.gin files, when a resume changed settings
  W/run.json          the model config, the run settings and their history,
                      checked on every restart
  W/metrics.jsonl     one JSON object per logged step
  W/eval.jsonl        held-out loss per task and per language
  W/tensorboard/      event files (scalars and the config)
  W/checkpoints/      orbax CheckpointManager of the train state
  W/checkpoints_unrestorable/  checkpoints a resume found broken (kept)
  W/model/            final self-describing checkpoint (glm.model.checkpoint)
  W/final.json        the run's final metrics

One process (index 0) writes these files; the others only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from typing import Any

import jax

from glm import files
from glm.errors import UserError
from glm.model.config import ModelConfig
from glm.training.tensorboard import EventWriter


class TrainError(UserError):
  """A run that cannot start or go on, with the fix."""


# Model-config fields that are numerics, not architecture: a resumed run may
# change them (with --accept_new_settings); every other field must match.
NUMERICS = ('dtype', 'remat_policy', 'scan_unroll', 'attention_impl')


def _read_run(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'run.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _diff(recorded: dict, ours: dict, prefix: str = '') -> list[str]:
  """'name: old there, new here' for every key whose value differs."""
  out = []
  for k in sorted(set(recorded) | set(ours)):
    a, b = recorded.get(k), ours.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} there, {b!r} here')
  return out


def normalised(settings: dict) -> dict:
  """Settings as they read back from JSON (tuples become lists)."""
  return json.loads(json.dumps(settings))


def check_workdir(workdir: str, cfg: ModelConfig, settings: dict, *,
                  accept_new_settings: bool = False) -> list[str]:
  """Refuses a workdir that holds another run; returns the settings that
  change (empty for a new workdir or the same settings).

  Another model architecture is always refused. Other run settings (batch,
  sequence length, mixture, schedule, steps, dtype, ...) are refused unless
  `accept_new_settings`. A field the recorded model config lacks (written
  before the field existed) counts as its default; a run recorded before
  settings were recorded is accepted as it is.
  """
  run = _read_run(workdir)
  if run is None:
    return []
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  recorded = {**defaults, **run.get('model_config', {})}
  ours = cfg.to_dict()
  arch = [d for d in _diff(recorded, ours) if d.split(':')[0] not in NUMERICS]
  if arch:
    raise TrainError(
        f'workdir {workdir} holds a run with another model ({arch[0]}; '
        f'{len(arch)} fields differ); use a new --workdir.')
  if 'settings' not in run:
    return []
  changes = _diff(run['settings'], normalised(settings))
  if changes and not accept_new_settings:
    raise TrainError(
        f'workdir {workdir} was trained with other settings '
        f'({"; ".join(changes)}); rerun with the same settings, use a new '
        '--workdir, or pass --accept_new_settings to go on with these (the '
        'earlier config.gin is kept).')
  return changes


class RunFiles:
  """The run's records: config files, metrics and evals as JSON lines and
  TensorBoard scalars. On processes other than 0 every write is skipped."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.board = EventWriter(self.path('tensorboard')) if self.lead else None

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def record_config(self, cfg: ModelConfig, settings: dict, gin_config: str,
                    step: int, changes: list[str]) -> None:
    """Writes W/config.gin and W/run.json for a run (re)starting at `step`.

    When `changes` is not empty the run goes on with new settings: the
    config.gin in force until now is kept as config_history/from_step_S.gin
    (S = the step it took effect) and run.json's history gets an entry
    with the step the new settings take effect and what changed.
    """
    if not self.lead:
      return
    run = _read_run(self.workdir) or {}
    history = run.get('history') or [
        {'from_step': 0, 'config': 'config.gin'}]
    if changes:
      old = history[-1]
      kept = os.path.join('config_history',
                          f'from_step_{old["from_step"]:06d}.gin')
      os.makedirs(self.path('config_history'), exist_ok=True)
      if os.path.isfile(self.path('config.gin')):
        os.replace(self.path('config.gin'), self.path(kept))
      old['config'] = kept
      history.append({'from_step': step, 'config': 'config.gin',
                       'changed': changes})
    with open(self.path('config.gin'), 'w') as f:
      f.write(gin_config)
    run = {'model_config': cfg.to_dict(), 'settings': normalised(settings),
           'history': history}
    tmp = self.path('run.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(run, f, indent=2, sort_keys=True)
    os.replace(tmp, self.path('run.json'))
    self.board.text(step, 'config', gin_config)

  def resume_at(self, step: int) -> None:
    """Drops rows logged after the checkpoint a run resumes from."""
    if self.lead:
      for name in ('metrics.jsonl', 'eval.jsonl'):
        _truncate_jsonl(self.path(name), step)

  def read(self, name: str) -> list[dict[str, Any]]:
    """The rows of W/name (a JSON-lines file), [] if there is none."""
    return files.read_jsonl(self.path(name))

  def log(self, name: str, row: dict[str, Any], prefix: str) -> None:
    """Appends `row` (with a 'step') to W/name and to TensorBoard."""
    if not self.lead:
      return
    with open(self.path(name), 'a', encoding='utf-8') as f:
      f.write(json.dumps(row) + '\n')
    self.board.scalars(row['step'], {f'{prefix}/{k}': v
                                     for k, v in row.items() if k != 'step'})

  def write_json(self, name: str, obj: Any) -> None:
    if self.lead:
      with open(self.path(name), 'w') as f:
        json.dump(obj, f, indent=2)

  def close(self) -> None:
    if self.board is not None:
      self.board.close()


def _truncate_jsonl(path: str, after_step: int) -> None:
  if not os.path.isfile(path):
    return
  with open(path) as f:
    rows = [l for l in f if l.strip() and json.loads(l)['step'] <= after_step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(rows)
  os.replace(tmp, path)


@contextlib.contextmanager
def preemption_flag():
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""
  caught = {'signal': None}
  handler = lambda signum, frame: caught.update(signal=signum)
  previous = {s: signal.signal(s, handler)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


class Progress:
  """A one-line progress bar on a terminal; plain log lines otherwise."""

  def __init__(self, total: int):
    self.total = total
    self.tty = sys.stdout.isatty()

  def update(self, step: int, text: str) -> None:
    if self.tty:
      width = 24
      done = int(width * step / self.total)
      bar = '#' * done + '.' * (width - done)
      end = '\n' if step == self.total else ''
      print(f'\r[{bar}] {text}', end=end, flush=True)
    else:
      print(text, flush=True)

  def message(self, text: str) -> None:
    print(('\n' if self.tty else '') + text, flush=True)


def fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 60}m{seconds % 60:02d}s'
