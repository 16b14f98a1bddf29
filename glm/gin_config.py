"""Gin at the edge: parsing run files and command-line bindings.

Gin only binds top-level entry points (`train`, `ModelConfig`, ...), never
layers. Errors from gin are rewritten as one line naming the value and the
fix, raised as `GinError`.
"""

from __future__ import annotations

import difflib
import glob
import inspect
import logging
import os
import re
from typing import Any, Sequence

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
  _check_macro_bindings(bindings)


def _nearest(name: str, choices) -> str:
  near = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.5)
  return f'; did you mean {near[0]}?' if near else ''  # ends the message


def _referenced_macros() -> set[str]:
  """Names of the macros some binding of the parsed config refers to."""
  used = set()

  def walk(value: Any) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
      selector = value.scoped_selector
      if selector.endswith('/gin.macro'):
        used.add(selector[:-len('/gin.macro')])
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        walk(v)
    elif isinstance(value, dict):
      for v in value.values():
        walk(v)

  for params in gin.config._CONFIG.values():  # pylint: disable=protected-access
    walk(params)
  return used


def _check_macro_bindings(bindings: Sequence[str]) -> None:
  """A command-line NAME=VALUE (no dot: a macro) must be one the config
  uses; gin itself accepts any macro, so a misspelt TRAIN_STEPZ would be
  ignored and the run would go on with the default."""
  used = _referenced_macros()
  for b in bindings:
    name = b.split('=', 1)[0].strip()
    if '.' in name or '/' in name or name in used:
      continue
    hint = _nearest(name, used) or (
        f'; the macros this config uses are {", ".join(sorted(used))}.'
        if used else '; this config uses no macros.')
    raise GinError(f'--gin.{name}=... sets a macro that no gin file '
                   f'uses{hint}')


def check_required(configurable: str) -> None:
  """Every gin.REQUIRED parameter of `configurable` is bound, or one
  GinError names the missing ones and the run files that bind them."""
  match = gin.config._REGISTRY.get_match(configurable)  # pylint: disable=protected-access
  required = [n for n, p in inspect.signature(match.wrapped).parameters
              .items() if p.default is gin.REQUIRED]
  missing = []
  for name in required:
    try:
      gin.query_parameter(f'{configurable}.{name}')
    except ValueError:
      missing.append(f'{configurable}.{name}')
  if not missing:
    return
  root = configs_root()
  runs = sorted(os.path.basename(f) for f in glob.glob(
      os.path.join(root, 'runs', '*.gin'))) if root else []
  provide = (f'; the run files in configs/runs/ bind them ({", ".join(runs)}): '
             'pass one first, then model files and bindings, as in '
             '--gin_file configs/runs/default.gin --gin_file '
             'configs/models/tiny_glm.gin' if runs else
             '; pass a run file (configs/runs/*.gin in a checkout)')
  raise GinError(f'the gin files bind no {", ".join(missing)} (a model file '
                 f'alone is not a run){provide}.')


def _explain(e: Exception, bindings: Sequence[str]) -> str:
  msg = str(e)
  first = msg.splitlines()[0] if msg else repr(e)
  m = re.search(r"(\w+)/(?:gin\.)?macro\.value set to `%gin.REQUIRED`", msg)
  if m:
    return (f'required macro {m.group(1)} is not set; pass '
            f'--gin.{m.group(1)}=VALUE or bind it in a gin file.')
  m = re.search(r"No configurable matching '([^']+)'", msg)
  if m:
    known = _known_configurables()
    hint = _nearest(m.group(1), known) or (
        f'; known: {", ".join(sorted(known))}.')
    return f'unknown gin configurable {m.group(1)!r}{hint}'
  m = re.search(r"Configurable '([^']+)' doesn't have a parameter named "
                r"'([^']+)'", msg)
  if m:
    hint = (_nearest(m.group(2), _parameters(m.group(1)))
            or '; check the spelling.')
    return (f'unknown gin binding {m.group(1)}.{m.group(2)}: '
            f'{m.group(1)} has no parameter {m.group(2)!r}{hint}')
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


def _parameters(configurable: str) -> list[str]:
  """The parameter names gin can bind on `configurable`."""
  try:
    match = gin.config._REGISTRY.get_match(configurable)  # pylint: disable=protected-access
    params = inspect.signature(match.wrapped).parameters
  except (ValueError, TypeError, AttributeError):
    return []
  deny = set(match.denylist or ())
  return [n for n in params if n not in deny and n != 'self']


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
