"""The run's orbax checkpoints of the train state (`W/checkpoints/`).

  manager = open_manager(workdir, keep=2)         # async saves, keep-N
  manager.save(step, args=ocp.args.StandardSave(state_lib.to_saved(state)))
  state, step = restore_latest(manager, state)     # or (state, 0)

A checkpoint that no longer restores (a truncated or missing array file, a
disk error) does not end the run: `restore_latest` falls back to the newest
checkpoint that restores, says which ones it skipped and why, and moves the
skipped ones to `W/checkpoints_unrestorable/` so that the run can save those
steps again. Nothing is deleted.
"""

from __future__ import annotations

import os
import shutil

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from glm.training import state as state_lib
from glm.training.workdir import TrainError

UNRESTORABLE = 'checkpoints_unrestorable'


def open_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=True))


def _reason(e: Exception) -> str:
  text = ' '.join(str(e).split()) or repr(e)
  text = text.split(' See full TensorStore details')[0]
  return f'{type(e).__name__}: {text[:200]}'


def restore_latest(manager: ocp.CheckpointManager, state: dict
                   ) -> tuple[dict, int]:
  """The newest checkpoint that restores (into `state`'s shardings,
  whatever mesh saved it) and its step; (state, 0) when there is none.

  Every process takes the same path (the files are shared), so the
  collective restores and the manager's view of its steps stay in step.
  """
  directory = str(manager.directory)
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(
          step, args=ocp.args.StandardRestore(state_lib.to_saved(state)))
    except Exception as e:  # pylint: disable=broad-except
      skipped.append((step, _reason(e)))
      continue
    if skipped:
      _set_aside(manager, skipped)
    print(f'glm train: resumed from step {step} in {directory}', flush=True)
    return state_lib.from_saved(restored, state), step
  if skipped:
    steps = ', '.join(f'step {s} ({why})' for s, why in skipped)
    raise TrainError(f'no checkpoint in {directory} restores: {steps}; '
                     'move the folder away to start over, or use a new '
                     '--workdir.')
  return state, 0


def _set_aside(manager: ocp.CheckpointManager,
               skipped: list[tuple[int, str]]) -> None:
  """Moves checkpoints that did not restore out of orbax's folder (so the
  run can save those steps again) and makes the manager forget them."""
  directory = str(manager.directory)
  aside = os.path.join(os.path.dirname(directory.rstrip('/')), UNRESTORABLE)
  for step, why in skipped:
    dest = os.path.join(aside, str(step))
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      if os.path.exists(dest):
        dest = f'{dest}.{len(os.listdir(aside))}'
      shutil.move(os.path.join(directory, str(step)), dest)
    print(f'glm train: checkpoint step {step} does not restore ({why}); '
          f'skipped it and moved it to {dest} (kept, not deleted).',
          flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('glm: unrestorable checkpoints moved')
  manager.reload()
