"""Loader of the glm_* lm-eval tasks: `custom_dataset: !function glm_local.load`.

lm-eval imports this file from the YAML folder and calls `load` with the
TaskManager metadata (e.g. glm_data_dir) merged with the task's
dataset_kwargs (family, language); see glm/evaluation/local_tasks.py.
"""

import logging

from glm.evaluation import local_tasks


def _not_custom_kwargs_hint(record: logging.LogRecord) -> bool:
  # lm-eval warns about `--metadata` once per task with a custom_dataset.
  return 'Custom kwargs can be passed' not in str(record.msg)


logging.getLogger('lm_eval.api.task').addFilter(_not_custom_kwargs_hint)


def load(**kwargs):
  return local_tasks.load_dataset(**kwargs)
