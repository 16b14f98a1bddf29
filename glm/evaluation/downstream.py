"""Harness tasks during training: `glm train` with `train.eval_tasks`.

Every `EVAL_EVERY` steps (and at the end) the trainer scores the current
parameters on lm-evaluation-harness tasks (`harness.GlmLM` over the
in-memory model, on the run's mesh) and writes their metrics beside the
held-out loss: `W/eval.jsonl` gets `"tasks/<task>/<metric>"` fields and
TensorBoard the scalars `eval/tasks/<task>/<metric>`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from glm.errors import UserError
from glm.model.config import ModelConfig


def task_evaluator(cfg: ModelConfig, tokenizer: Any, tasks: Sequence[str], *,
                   data_dir: str, limit: int | None = None,
                   mixture: dict[str, float] | None = None,
                   mesh: Any = None, num_fewshot: int | None = None
                   ) -> Callable[[Any], dict[str, float]] | None:
  """params -> {"tasks/<task>/<metric>": value}, or None without tasks.

  The task index is built once here, so a task name that does not exist
  fails before the first step."""
  tasks = list(tasks)
  if not tasks:
    return None
  if limit is not None and limit < 1:
    raise UserError(f'train.eval_task_limit={limit} must be >= 1 (examples '
                    'per task) or None (all).')
  from glm.evaluation import eval_cli  # pylint: disable=g-import-not-at-top
  from glm.evaluation import harness  # pylint: disable=g-import-not-at-top
  manager = eval_cli.task_manager(tasks, (), data_dir)
  unknown = [t for t in tasks
             if t not in manager.all_tasks and t not in manager.all_groups]
  if unknown:
    raise UserError(f'train.eval_tasks: {unknown[0]!r} is not a task the '
                    'harness knows; glm\'s local ones are glm_zero_shot and '
                    'glm_zero_shot_<lang>.')

  def evaluate(params: Any) -> dict[str, float]:
    lm = harness.GlmLM(cfg=cfg, params=params, tokenizer=tokenizer,
                       meta={'mixture': mixture or {}}, mesh=mesh,
                       progress=False)
    res = eval_cli.evaluate(lm, tasks, manager=manager,
                            num_fewshot=num_fewshot, limit=limit)
    return {f'tasks/{task}/{metric}': value
            for task, metrics in eval_cli.metric_rows(res).items()
            for metric, value in metrics.items()}
  return evaluate
