"""The shape of the code: no import cycles, small modules, light start-up,
one error base class, a stable checkpoint layout, no dangling references."""

import ast
import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from glm import cli
from glm.errors import UserError
from glm.model import transformer
from glm.model.config import ModelConfig
from glm.training import optimizers
from glm.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('glm', 'glm.data', 'glm.pallas_kernels')
MAX_MODULE_LINES = 650   # "about 600"
MAX_FUNCTION_LINES = 150


def installed_modules() -> dict[str, str]:
  """Every module of the installed packages: name -> source file."""
  found = {}

  def walk(name: str) -> None:
    spec = importlib.util.find_spec(name)
    found[name] = spec.origin
    if spec.submodule_search_locations is None:
      return
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
      walk(f'{name}.{info.name}')

  for package in PACKAGES:
    walk(package)
  return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
  """Edges module -> project module it imports, at module level or inside
  functions. Importing a submodule runs its parent packages' __init__, which
  is not counted as an edge back from the child."""

  def resolve(name: str) -> str | None:
    while name:
      if name in modules:
        return name
      name = name.rpartition('.')[0]
    return None

  edges = {m: set() for m in modules}
  for name, path in modules.items():
    is_pkg = path.endswith('__init__.py')
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          pkg = name if is_pkg else name.rpartition('.')[0]
          for _ in range(node.level - 1):
            pkg = pkg.rpartition('.')[0]
          base = pkg + ('.' + base if base else '')
        targets = [base] + [f'{base}.{a.name}' for a in node.names]
      else:
        continue
      for t in targets:
        r = resolve(t)
        if r and r != name and not name.startswith(r + '.'):
          edges[name].add(r)
  return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle (as a path that returns to its start), or None."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(v: str) -> list[str] | None:
    state[v] = 1
    stack.append(v)
    for w in sorted(edges[v]):
      if state.get(w) == 1:
        return stack[stack.index(w):] + [w]
      if w not in state:
        cycle = visit(w)
        if cycle:
          return cycle
    stack.pop()
    state[v] = 2
    return None

  for v in sorted(edges):
    if v not in state:
      cycle = visit(v)
      if cycle:
        return cycle
  return None


def test_installed_package_has_no_import_cycle():
  modules = installed_modules()
  assert {'glm.model.transformer', 'glm.parallel.pipeline',
          'glm.training.loop', 'glm.data.pipeline'} <= set(modules)
  edges = import_graph(modules)
  assert find_cycle(edges) is None, ' -> '.join(find_cycle(edges))
  # The model package never imports parallelism or training.
  model = [m for m in modules if m.startswith('glm.model')]
  upward = {(m, t) for m in model for t in edges[m]
            if t.startswith(('glm.parallel', 'glm.training', 'glm.inference',
                             'glm.evaluation', 'glm.hf', 'glm.data'))}
  assert not upward, upward


def test_cycle_finder_finds_a_cycle():
  """The check above can fail: a planted two-module cycle is reported."""
  edges = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert find_cycle(edges) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_modules_and_functions_are_small():
  too_big = []
  for name, path in installed_modules().items():
    with open(path, encoding='utf-8') as f:
      source = f.read()
    lines = source.count('\n') + 1
    if lines > MAX_MODULE_LINES:
      too_big.append(f'{name}: {lines} lines')
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          too_big.append(f'{name}.{node.name}: {n} lines')
  assert not too_big, too_big


def test_subpackage_inits_import_nothing():
  """Package __init__ files are docs only, so importing one module of a
  package never drags in its siblings."""
  for name, path in installed_modules().items():
    if path.endswith('__init__.py'):
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
      imports = [n for n in ast.walk(tree)
                 if isinstance(n, (ast.Import, ast.ImportFrom))]
      assert not imports, name


def _loaded_after(code: str) -> set[str]:
  """Top-level packages loaded by `code` in a fresh interpreter."""
  probe = (f'{code}\nimport sys\n'
           "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
  out = subprocess.run([sys.executable, '-c', probe], capture_output=True,
                       text=True, cwd=ROOT, check=True)
  return set(out.stdout.strip().splitlines()[-1].split())


def test_help_and_info_start_without_heavy_imports():
  """`glm train --help` loads no JAX at all; `glm info` on any shipped run
  gin loads no TensorFlow or seqio (it stays at JAX/flax/orbax import time,
  about a second)."""
  loaded = _loaded_after(
      'from glm import cli\n'
      'try:\n  cli.main(["train", "--help"])\nexcept SystemExit:\n  pass')
  assert not loaded & {'jax', 'flax', 'orbax', 'tensorflow', 'seqio'}, loaded
  for run in ('default', 'tiny_glm', 'tiny_ul2', 'glm130b_recipe',
              'bloom_recipe'):
    loaded = _loaded_after(
        'from glm import cli\n'
        f'cli.main(["info", "--gin_file", "configs/runs/{run}.gin"])')
    assert 'jax' in loaded
    assert not loaded & {'tensorflow', 'seqio'}, (run, loaded)


def test_tensorflow_start_up_noise_is_silenced():
  """Importing the seqio tasks (TensorFlow) prints nothing to stderr."""
  out = subprocess.run([sys.executable, '-c', 'import glm.data.tasks'],
                       capture_output=True, text=True, cwd=ROOT, check=True)
  assert 'absl' not in out.stderr and 'oneDNN' not in out.stderr, out.stderr
  assert out.stderr.strip() == '', out.stderr


def test_cli_turns_only_user_errors_into_one_line(monkeypatch, capsys):
  def user_error(args, bindings):
    raise UserError('bad --flag=3; use 4.')

  def bug(args, bindings):
    raise ValueError('an internal invariant broke')

  monkeypatch.delenv('GLM_DEBUG', raising=False)
  monkeypatch.setitem(cli._COMMANDS, 'info', user_error)
  assert cli.main(['info', '--gin_file', 'x.gin']) == 2
  assert capsys.readouterr().err == 'glm info: error: bad --flag=3; use 4.\n'
  monkeypatch.setitem(cli._COMMANDS, 'info', bug)
  with pytest.raises(ValueError, match='internal invariant'):
    cli.main(['info', '--gin_file', 'x.gin'])


def test_every_error_class_meant_for_users_derives_from_user_error():
  """Each package's error class is a UserError (and so a ValueError)."""
  names = ('glm.model.config.ConfigError', 'glm.model.checkpoint.'
           'CheckpointError', 'glm.parallel.mesh.MeshError',
           'glm.parallel.plan.PlanError', 'glm.parallel.launch.LaunchError',
           'glm.training.workdir.TrainError',
           'glm.training.optimizers.OptimizerError',
           'glm.inference.scoring.ScoreInputError',
           'glm.hf.bloom.HFConversionError', 'glm.gin_config.GinError',
           'glm.data.errors.DataError')
  for name in names:
    module, _, cls = name.rpartition('.')
    assert issubclass(getattr(importlib.import_module(module), cls),
                      UserError), name
  with pytest.raises(UserError, match='num_heads'):
    ModelConfig(hidden=30, num_heads=4)


# The parameter and train-state layout that checkpoints written before the
# package split hold (orbax restores by these paths).
PARAM_PATHS = {
    'embed/embedding', 'embed_norm/bias', 'embed_norm/scale',
    'final_norm/bias', 'final_norm/scale', 'lm_head', 'position_embedding',
    'layers/attention/key', 'layers/attention/key_bias',
    'layers/attention/out', 'layers/attention/out_bias',
    'layers/attention/query', 'layers/attention/query_bias',
    'layers/attention/value', 'layers/attention/value_bias',
    'layers/input_norm/bias', 'layers/input_norm/scale',
    'layers/mlp/wi', 'layers/mlp/wi_bias', 'layers/mlp/wo',
    'layers/mlp/wo_bias', 'layers/post_attention_norm/bias',
    'layers/post_attention_norm/scale',
}


def _paths(tree) -> set[str]:
  name = lambda k: getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
  return {'/'.join(str(name(k)) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_and_state_layout_is_unchanged():
  cfg = ModelConfig(vocab_size=100, hidden=16, num_layers=2, num_heads=2,
                    mlp_dim=32, max_len=16, position='learned',
                    embed_norm=True, tie_embeddings=False)
  assert _paths(transformer.abstract_params(cfg)) == PARAM_PATHS
  oc = optimizers.OptimizerConfig()
  opt = optimizers.make_optimizer(oc, optimizers.lr_table(oc, np.ones(4)))
  state = state_lib.abstract_state(cfg, opt)
  assert set(state) == {'params', 'opt_state', 'loss_ema', 'bad_steps'}
  mu = {p for p in _paths(state['opt_state']) if '/mu/' in f'/{p}/'}
  assert {p.split('mu/', 1)[1] for p in mu} == PARAM_PATHS


def _tracked_files() -> list[str]:
  return subprocess.run(['git', 'ls-files'], capture_output=True, text=True,
                        cwd=ROOT, check=True).stdout.split()


def test_no_file_cites_a_document_missing_from_the_repository():
  """Every document a file cites (an upper-case `NAME.md` such as README.md,
  a notebook, or the planning folders `shared/` and `seeds/`) is in the
  repository; generated reports (`data_card.md`) are not citations."""
  tracked = _tracked_files()
  present = {os.path.basename(f) for f in tracked}
  this = os.path.relpath(__file__, ROOT)  # names the patterns it looks for
  texts = [f for f in tracked if f != this and f.endswith(
      ('.py', '.md', '.gin', '.ipynb', '.ini', 'Makefile', '.ci/run'))]
  missing = []
  for f in texts:
    with open(os.path.join(ROOT, f), encoding='utf-8') as fh:
      text = fh.read()
    for doc in set(re.findall(r'\b[A-Z][A-Z_]+\.md\b|[\w.-]+\.ipynb\b',
                              text)):
      if doc not in present:
        missing.append(f'{f}: {doc}')
    for folder in re.findall(r'\.\./shared/|\bseeds/', text):
      missing.append(f'{f}: {folder}')
  assert not missing, missing
