"""Gin at the edge: parsing run files and command-line bindings.

Gin only binds top-level entry points (`train`, `ModelConfig`, ...), never
layers. Errors from gin are rewritten as one line naming the value and the
fix, raised as `GinError`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import gin

from glm.data import pipeline as _pipeline
from glm.errors import UserError
# Importing these registers their configurables (ModelConfig, train, ...):
# every module that gin may bind is listed here, nowhere else.
from glm.model import config as _config  # noqa: F401
from glm.parallel import mesh as _mesh
from glm.training import loop as _loop  # noqa: F401
from glm.training import optimizers as _optimizers
from glm.training import step as _step

gin.external_configurable(_pipeline.DataConfig, 'DataConfig')
gin.external_configurable(_optimizers.OptimizerConfig, 'OptimizerConfig')
gin.external_configurable(_optimizers.BatchRamp, 'BatchRamp')
gin.external_configurable(_step.FailurePolicy, 'FailurePolicy')
gin.external_configurable(_mesh.MeshConfig, 'MeshConfig')


class GinError(UserError):
  """A gin file or binding that cannot be applied, with the fix."""


def configs_root() -> str | None:
  """The repository's `configs/` folder, when running from a checkout."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  root = os.path.join(here, 'configs')
  return root if os.path.isdir(root) else None


def _search_paths(gin_files: Sequence[str]) -> list[str]:
  """Folders that `include` statements resolve against."""
  paths = []
  for f in gin_files:
    d = os.path.dirname(os.path.abspath(f))
    # Includes are written relative to `configs/` (e.g. 'models/x.gin').
    while d and d != os.path.dirname(d):
      if os.path.basename(d) == 'configs':
        paths.append(d)
        break
      d = os.path.dirname(d)
  root = configs_root()
  if root:
    paths.append(root)
  return list(dict.fromkeys(paths))


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files then bindings ('NAME=VALUE'); raises GinError."""
  for f in gin_files:
    if not os.path.isfile(f):
      raise GinError(f'gin file {f!r} does not exist; pass a path such as '
                     'configs/runs/default.gin.')
  gin.clear_config()
  # Our folders go before gin's default '' (the working directory): a
  # relative include that misses there is next looked up as a Python package
  # by gin, which fails on namespace folders such as a `runs/` workdir.
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  prefixes[:] = _search_paths(gin_files) + ['']
  gin_files = [os.path.abspath(f) for f in gin_files]
  # gin logs an ERROR for every search path an include is not found under
  # before it tries the next; only a failure of all of them matters.
  root_logger = logging.getLogger()
  level = root_logger.level
  root_logger.setLevel(logging.CRITICAL)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings),
                                        finalize_config=True)
  except (ValueError, SyntaxError, IOError) as e:
    raise GinError(_explain(e, bindings)) from None
  finally:
    root_logger.setLevel(level)


def _explain(e: Exception, bindings: Sequence[str]) -> str:
  msg = str(e)
  first = msg.splitlines()[0] if msg else repr(e)
  m = re.search(r"(\w+)/(?:gin\.)?macro\.value set to `%gin.REQUIRED`", msg)
  if m:
    return (f'required macro {m.group(1)} is not set; pass '
            f'--gin.{m.group(1)}=VALUE or bind it in a gin file.')
  m = re.search(r"No configurable matching '([^']+)'", msg)
  if m:
    known = ', '.join(sorted(_known_configurables()))
    return (f'unknown gin configurable {m.group(1)!r}; check the spelling '
            f'(known: {known}).')
  m = re.search(r"Configurable '([^']+)' doesn't have a parameter named "
                r"'([^']+)'", msg)
  if m:
    return (f'unknown gin binding {m.group(1)}.{m.group(2)}: '
            f'{m.group(1)} has no parameter {m.group(2)!r}; check the '
            'spelling.')
  m = re.search(r"No bindings specified for '([^'/]+)/gin.macro'", msg)
  if m:
    return (f'gin macro {m.group(1)} is used but never defined; pass '
            f'--gin.{m.group(1)}=VALUE or define it in a gin file.')
  if isinstance(e, SyntaxError) and getattr(e, 'args', None):
    loc = e.args[1] if len(e.args) > 1 else None
    where = getattr(loc, 'line_content', '') if loc else ''
    return (f'gin syntax error in {where.strip()!r}: {e.args[0]} (bindings '
            'look like NAME=VALUE, strings quoted).')
  return f'gin: {first}'


def _known_configurables() -> list[str]:
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  names = {selector.split('.')[-1] for selector, _ in registry.items()}
  return [n for n in names if not n.startswith('_')]


def operative_config() -> str:
  return gin.operative_config_str()


def bindings_from_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits '--gin.NAME=VALUE' arguments from the rest."""
  bindings, rest = [], []
  for a in argv:
    if a.startswith('--gin.'):
      binding = a[len('--gin.'):]
      if '=' not in binding:
        raise GinError(f'{a!r} has no value; write --gin.NAME=VALUE.')
      bindings.append(binding)
    else:
      rest.append(a)
  return bindings, rest
