"""`glm eval`: lm-evaluation-harness tasks on a glm checkpoint.

  glm eval --checkpoint C --tasks T1,T2 [--include_path DIR] [--num_fewshot K]
           [--limit N] [--batch_size B] [--scoring auto|causal|glm]
           [--mesh data=N] [--data_dir D] [--log_samples] --output OUT.json

Runs `lm_eval.simple_evaluate` with `harness.GlmLM` and prints the
harness's table, one per language for glm's local tasks
(`glm/evaluation/tasks`, always on the include path; `--include_path` adds
folders of your own YAMLs). OUT.json is the harness's result (its
per-request samples only with `--log_samples`) plus `"glm"`: the
checkpoint, the git commit of this code, the seconds taken and the data
folder. Any task the harness knows runs where its data is on this machine;
one that needs a download fails in one line (the harness runs offline:
`HF_DATASETS_OFFLINE=1`, `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from glm import files
from glm.errors import UserError


class EvalError(UserError):
  """A task list, a data folder or an option glm eval cannot run."""


def _offline() -> None:
  for var in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE'):
    os.environ.setdefault(var, '1')


def task_manager(tasks: Sequence[str], include_path: Sequence[str] = (),
                 data_dir: str = '.cache/data'):
  """The harness's task index: glm's local tasks and the folders given,
  plus the harness's own ~14k tasks when `tasks` names one of those
  (indexing them takes seconds); the local tasks read `data_dir`."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  from glm.evaluation import local_tasks  # pylint: disable=g-import-not-at-top
  for d in include_path:
    if not os.path.isdir(d):
      raise EvalError(f'--include_path {d!r} is not a folder of task YAMLs.')
  kwargs = dict(include_path=[local_tasks.tasks_dir(), *include_path],
                metadata={'glm_data_dir': os.path.abspath(data_dir)})
  manager = TaskManager(include_defaults=False, **kwargs)
  known = set(manager.all_tasks) | set(manager.all_groups)
  if all(t in known or t.endswith('.yaml') for t in tasks):
    return manager
  return TaskManager(**kwargs)


def evaluate(lm: Any, tasks: Sequence[str], *, manager: Any,
             num_fewshot: int | None = None, limit: float | None = None,
             log_samples: bool = False) -> dict:
  """`simple_evaluate` of `tasks` on `lm`, with one-line errors for task
  names it does not know and tasks whose data is not on this machine."""
  _offline()
  import lm_eval  # pylint: disable=g-import-not-at-top
  try:
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager,
        num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0,
        log_samples=log_samples, verbosity='WARNING')
  except KeyError as e:
    if 'registered task' not in str(e):
      raise
    raise EvalError(f'{e.args[0]}; glm\'s local tasks are glm_zero_shot and '
                    'glm_zero_shot_<lang> (glm/evaluation/tasks); give your '
                    'own YAMLs with --include_path DIR.') from None
  except ConnectionError as e:
    raise EvalError(f'a task needs a dataset download and glm eval runs '
                    f'offline: {e}. Use a task whose data is on this machine '
                    '(a local YAML with dataset_path: json).') from None


def _git_commit() -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here,
                          capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def tables(results: dict) -> str:
  """The harness's table, one per language for glm's local tasks."""
  from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top
  from glm.evaluation import local_tasks  # pylint: disable=g-import-not-at-top
  by_lang: dict[str, list[str]] = {}
  for name in results['results']:
    lang = local_tasks.task_language(name) or 'other'
    by_lang.setdefault(lang, []).append(name)
  out = []
  for lang in sorted(by_lang):
    names = set(by_lang[lang])
    sub = {**results,
           'results': {k: v for k, v in results['results'].items()
                       if k in names}}
    out.append(f'## {lang}\n{make_table(sub)}')
  return '\n'.join(out)


def metric_rows(results: dict) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} of the harness's numeric results (the
  trainer's eval.jsonl and TensorBoard)."""
  rows = {}
  for task, values in results['results'].items():
    rows[task] = {k.split(',')[0]: float(v) for k, v in values.items()
                  if ',' in k and '_stderr' not in k
                  and isinstance(v, (int, float))}
  return rows


def _mesh(text: str | None):
  if not text:
    return None
  from glm.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mc = mesh_lib.MeshConfig.parse(text)
  if mc.tensor > 1 or mc.pipeline > 1:
    raise EvalError(f'--mesh {text!r}: glm eval splits the batch only; use '
                    'data= and fsdp= axes.')
  return mesh_lib.make_mesh(mc)


def parse_tasks(text: str) -> list[str]:
  tasks = [t.strip() for t in text.split(',') if t.strip()]
  if not tasks:
    raise EvalError(f'--tasks {text!r} names no task; e.g. '
                    '--tasks glm_zero_shot.')
  return tasks


def parse_limit(text: str | None) -> float | None:
  if text is None:
    return None
  try:
    value = float(text)
  except ValueError:
    raise EvalError(f'--limit {text!r} must be a number of examples per task '
                    'or a fraction below 1.') from None
  if value <= 0:
    raise EvalError(f'--limit {text} must be positive.')
  return value if value < 1 else int(value)


def run(checkpoint: str, *, tasks: str, output: str,
        include_path: Sequence[str] = (), num_fewshot: int | None = None,
        limit: str | None = None, batch_size: int = 8,
        scoring: str = 'auto', mesh: str | None = None,
        data_dir: str = '.cache/data', log_samples: bool = False) -> dict:
  """The `glm eval` command; returns what it wrote to `output`."""
  t0 = time.time()
  names, lim = parse_tasks(tasks), parse_limit(limit)
  if num_fewshot is not None and num_fewshot < 0:
    raise EvalError(f'--num_fewshot={num_fewshot} must be >= 0.')
  if not os.path.isdir(checkpoint):
    raise EvalError(f'--checkpoint {checkpoint!r} is not a folder; give a '
                    'glm checkpoint (glm train\'s W/model, glm convert or '
                    'glm quantize output).')
  manager = task_manager(names, include_path, data_dir)
  from glm.evaluation import harness  # pylint: disable=g-import-not-at-top
  device_mesh = _mesh(mesh)
  lm = harness.GlmLM(checkpoint, batch_size=batch_size, scoring=scoring,
                     mesh=device_mesh)
  if device_mesh is not None:
    import jax  # pylint: disable=g-import-not-at-top
    lm.params = jax.device_put(lm.params, jax.sharding.NamedSharding(
        device_mesh, jax.sharding.PartitionSpec()))
  res = evaluate(lm, names, manager=manager, num_fewshot=num_fewshot,
                 limit=lim, log_samples=log_samples)
  print(tables(res))
  res['glm'] = {'checkpoint': os.path.abspath(checkpoint),
                'commit': _git_commit(), 'seconds': time.time() - t0,
                'data_dir': os.path.abspath(data_dir), 'scoring': lm.scoring,
                'max_length': lm.max_length}
  files.write_text_atomic(output, json.dumps(res, indent=2, default=repr)
                          + '\n')
  print(f'glm eval: {len(res["results"])} tasks in '
        f'{res["glm"]["seconds"]:.0f}s -> {output}', file=sys.stderr)
  return res
