"""Self-describing model checkpoints: a folder with the config and the weights.

Layout of a checkpoint folder C:
  C/glm_checkpoint.json   {"format": ..., "model_config": {...},
                           "tokenizer": "tokenizer.model" | null, "meta": {}}
  C/params/               orbax PyTree checkpoint of float32 parameters
  C/tokenizer.model       optional SentencePiece model

Writes go to a temporary sibling folder that is renamed into place at the
end, so an interrupted save never leaves a folder that `load` would accept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from glm.errors import UserError
from glm.model.config import ModelConfig
from glm.model import transformer


FORMAT = 'glm-checkpoint-v1'
MANIFEST = 'glm_checkpoint.json'


class CheckpointError(UserError):
  """A folder that is not a usable glm checkpoint."""


@contextlib.contextmanager
def atomic_dir(out: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary folder that becomes `out` only if the body succeeds."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise CheckpointError(f'output {out!r} already exists; remove it or '
                          'choose another path.')
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  os.chmod(tmp, 0o755)
  try:
    yield tmp
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.old-',
                             dir=parent)
      os.replace(out, os.path.join(old, 'x'))
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def save(out: str, cfg: ModelConfig, params: Any, *,
         tokenizer_path: str | None = None, meta: dict | None = None,
         overwrite: bool = False) -> str:
  """Writes params (in cfg's layout) + config (+ tokenizer) to folder `out`:
  float params as float32, integer ones (quantised kernels) as they are."""
  params = jax.tree.map(
      lambda a: np.asarray(a) if np.issubdtype(np.asarray(a).dtype,
                                               np.integer)
      else np.asarray(a, np.float32), params)
  expected = transformer.abstract_params(cfg)
  _check_structure(expected, params, where='params to save')
  with atomic_dir(out, overwrite=overwrite) as tmp:
    ckptr = _local_checkpointer()
    ckptr.save(os.path.join(tmp, 'params'), params)
    tok = None
    if tokenizer_path and tokenizer_path.endswith('.json'):
      # A Hugging Face tokenizer.json and the config files beside it.
      tok = 'tokenizer.json'
      folder = os.path.dirname(tokenizer_path)
      for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
          shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
    elif tokenizer_path:
      tok = 'tokenizer.model'
      shutil.copyfile(tokenizer_path, os.path.join(tmp, tok))
    manifest = {'format': FORMAT, 'model_config': cfg.to_dict(),
                'tokenizer': tok, 'meta': meta or {}}
    with open(os.path.join(tmp, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
  return os.path.abspath(out)


HF_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                      'special_tokens_map.json')


def _local_checkpointer() -> ocp.Checkpointer:
  """A checkpointer for host (numpy) arrays written by this process alone,
  also inside a multi-process run (no barriers with the other processes)."""
  me = jax.process_index()
  mp = ocp.options.MultiprocessingOptions(primary_host=me,
                                          active_processes={me})
  return ocp.Checkpointer(
      ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
      multiprocessing_options=mp)


def read_manifest(path: str) -> dict:
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise CheckpointError(
        f'{path!r} is not a glm checkpoint (no {MANIFEST}); pass a folder '
        'written by `glm train` or `glm convert hf-to-glm`.')
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{manifest_path!r} is not valid JSON ({e}); the '
                          'checkpoint is damaged: export it again.') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    manifest = manifest if isinstance(manifest, dict) else {}
    raise CheckpointError(f'{path!r} has format {manifest.get("format")!r}, '
                          f'this glm reads {FORMAT!r}.')
  return manifest


def load_config(path: str) -> ModelConfig:
  config = read_manifest(path).get('model_config')
  if not isinstance(config, dict):
    raise CheckpointError(f'{path!r} has no model_config in {MANIFEST}; the '
                          'checkpoint is damaged: export it again.')
  return ModelConfig.from_dict(config)


def tokenizer_path(path: str) -> str | None:
  tok = read_manifest(path).get('tokenizer')
  return os.path.join(path, tok) if tok else None


def load(path: str) -> tuple[ModelConfig, Any]:
  """Returns (config, params as numpy float32 arrays; int8 for the kernels
  of a quantised checkpoint)."""
  cfg = load_config(path)
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        transformer.abstract_params(cfg))
  ckptr = ocp.PyTreeCheckpointer()
  try:
    params = ckptr.restore(os.path.join(os.path.abspath(path), 'params'),
                           item=target)
  except Exception as e:  # pylint: disable=broad-except
    # orbax and tensorstore raise many types for a missing or truncated
    # file; all mean the same to the user.
    why = ' '.join(str(e).split())[:200]
    raise CheckpointError(
        f'the weights in {os.path.join(path, "params")!r} do not restore '
        f'({type(e).__name__}: {why}); the checkpoint is damaged: export or '
        'convert it again.') from None
  _check_structure(target, params, where=f'checkpoint {path!r}')
  return cfg, params


def _check_structure(expected: Any, got: Any, *, where: str) -> None:
  exp = {jax.tree_util.keystr(k): v.shape
         for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  act = {jax.tree_util.keystr(k): np.shape(v)
         for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  if exp != act:
    missing = sorted(set(exp) - set(act))[:3]
    extra = sorted(set(act) - set(exp))[:3]
    shape = [k for k in exp if k in act and exp[k] != act[k]][:3]
    raise CheckpointError(
        f'{where} do not match the model config: missing {missing}, '
        f'unexpected {extra}, wrong shapes {[(k, exp[k], act[k]) for k in shape]}.')
