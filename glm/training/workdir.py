"""A run's workdir: what it records, and the checks that protect it.

  W/config.gin        the operative gin config (also in TensorBoard as text)
  W/run.json          the model config of the run, checked on every restart
  W/metrics.jsonl     one JSON object per logged step
  W/eval.jsonl        held-out loss per task and per language
  W/tensorboard/      event files (scalars and the config)
  W/checkpoints/      orbax CheckpointManager of the train state
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

from glm.errors import UserError
from glm.model.config import ModelConfig
from glm.training.tensorboard import EventWriter


class TrainError(UserError):
  """A run that cannot start or go on, with the fix."""


def check_workdir(workdir: str, cfg: ModelConfig) -> None:
  """Refuses a workdir whose recorded run has another model config.

  A field the recorded config lacks (written before the field existed)
  counts as its default value.
  """
  path = os.path.join(workdir, 'run.json')
  if not os.path.isfile(path):
    return
  with open(path) as f:
    recorded = json.load(f).get('model_config', {})
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  recorded = {**defaults, **recorded}
  ours = cfg.to_dict()
  diff = sorted(k for k in set(recorded) | set(ours)
                if recorded.get(k) != ours.get(k))
  if diff:
    k = diff[0]
    raise TrainError(
        f'workdir {workdir} holds a run with another model config '
        f'({k}: {recorded.get(k)!r} there, {ours.get(k)!r} here; '
        f'{len(diff)} fields differ); use a new --workdir.')


class RunFiles:
  """The run's records: config files, metrics and evals as JSON lines and
  TensorBoard scalars. On processes other than 0 every write is skipped."""

  def __init__(self, workdir: str, cfg: ModelConfig, gin_config: str):
    self.workdir = workdir
    self.lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.board = None
    if self.lead:
      with open(self.path('config.gin'), 'w') as f:
        f.write(gin_config)
      with open(self.path('run.json'), 'w') as f:
        json.dump({'model_config': cfg.to_dict()}, f, indent=2,
                  sort_keys=True)
      self.board = EventWriter(self.path('tensorboard'))
      self.board.text(0, 'config', gin_config)

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def resume_at(self, step: int) -> None:
    """Drops rows logged after the checkpoint a run resumes from."""
    if self.lead:
      for name in ('metrics.jsonl', 'eval.jsonl'):
        _truncate_jsonl(self.path(name), step)

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
