"""IsoFLOP sweeps (Chinchilla's approach 2, PaLM 2's scaling study): at each
compute budget C, models of several sizes N each trained on D = C / (FLOPs
per token) tokens; the loss-optimal N and D per budget, then the power laws
N_opt ~ C^a and D_opt ~ C^b (PaLM 2 and Chinchilla: a ~ b ~ 0.5).

A sweep file asks for one with an `isoflop:` block instead of axes:

  bindings: {BATCH_SIZE: 16, SEQ_LEN: 128}
  isoflop:
    budgets: [3.0e+11, 1.0e+12, 3.0e+12]         # training FLOPs C
    sizes: [[32, 2, 2], [64, 2, 4], [96, 3, 4]]  # hidden, layers, heads
    tokens_per_param: [2, 500]                   # D / N window kept

Every (budget, size) whose D / N falls in the window becomes a variant with
ModelConfig.hidden, num_layers, num_heads, mlp_dim = 4 x hidden and
TRAIN_STEPS = round(C / (F x BATCH_SIZE x SEQ_LEN)), F the FLOPs per token
of glm.model.info (3 x forward) for the sweep's base model at that size.

`fit` groups finished rows by budget, fits each budget's loss against
log10 N with a parabola (its vertex is N_opt; the smallest loss where the
vertex leaves the sizes run, flagged `edge`), reads D_opt off the budget's
own N -> D relation, and fits both power laws in log space.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from glm.errors import UserError

SIZE_AXES = ('ModelConfig.hidden', 'ModelConfig.num_layers',
             'ModelConfig.num_heads', 'ModelConfig.mlp_dim', 'TRAIN_STEPS')


class ScalingError(UserError):
  """An isoflop: block that cannot make variants, with the fix."""


def _binding(bindings: Sequence[str], name: str) -> int:
  for b in reversed(list(bindings)):
    key, _, value = b.partition('=')
    if key.strip() == name:
      return int(value)
  raise ScalingError(f'an isoflop sweep needs {name} in its bindings (e.g. '
                     f'bindings: {{{name}: 16}}) to turn budgets into steps.')


def plan(gin_files: Sequence[str], bindings: Sequence[str],
         spec: dict[str, Any]) -> tuple[dict[str, list], list[float]]:
  """The zipped axes (SIZE_AXES -> values) of an `isoflop:` block, and its
  budgets."""
  import gin  # pylint: disable=g-import-not-at-top
  from glm import gin_config  # pylint: disable=g-import-not-at-top
  from glm.model import info as info_lib  # pylint: disable=g-import-not-at-top
  from glm.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  unknown = set(spec) - {'budgets', 'sizes', 'tokens_per_param'}
  if unknown or not spec.get('budgets') or not spec.get('sizes'):
    raise ScalingError(f'isoflop: needs budgets: and sizes: (and optionally '
                       f'tokens_per_param:), not {sorted(spec)}.')
  budgets = [float(c) for c in spec['budgets']]
  low, high = (float(x) for x in spec.get('tokens_per_param', (0, math.inf)))
  batch = _binding(bindings, 'BATCH_SIZE')
  seq_len = _binding(bindings, 'SEQ_LEN')
  gin_config.parse(gin_files, bindings)
  try:
    base = ModelConfig()
  finally:
    gin.clear_config()
  axes: dict[str, list] = {k: [] for k in SIZE_AXES}
  for c in budgets:
    for size in spec['sizes']:
      if len(size) != 3:
        raise ScalingError(f'isoflop size {size!r} must be [hidden, '
                           'num_layers, num_heads].')
      hidden, layers, heads = (int(x) for x in size)
      cfg = base.replace(hidden=hidden, num_layers=layers, num_heads=heads,
                         mlp_dim=4 * hidden, head_dim=0)
      stats = info_lib.info(cfg, seq_len)
      steps = round(c / (float(stats['flops_per_token']) * batch * seq_len))
      tokens = steps * batch * seq_len
      if steps < 1 or not low <= tokens / stats['params'] <= high:
        continue
      for k, v in zip(SIZE_AXES, (hidden, layers, heads, 4 * hidden, steps)):
        axes[k].append(v)
  if not axes['TRAIN_STEPS']:
    raise ScalingError('no (budget, size) of the isoflop: block falls in '
                       f'tokens_per_param [{low:g}, {high:g}]; widen it or '
                       'change the sizes.')
  return axes, budgets


def _power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
  from glm.experiments import plot  # pylint: disable=g-import-not-at-top
  return plot.fit_power_law(c, y) if len(c) >= 2 else None


def fit(rows: Sequence[dict[str, Any]], budgets: Sequence[float],
        metric: str = 'eval_loss') -> dict[str, Any]:
  """Per budget: its runs and N_opt, D_opt; then the fitted exponents."""
  per: dict[float, list[dict]] = {c: [] for c in budgets}
  for r in rows:
    if r.get('flops') and isinstance(r.get(metric), (int, float)) and (
        math.isfinite(r[metric])):
      c = min(budgets, key=lambda b: abs(math.log(r['flops'] / b)))
      per[c].append(r)
  out: dict[str, Any] = {'metric': metric, 'budgets': []}
  for c in budgets:
    runs = sorted(per[c], key=lambda r: r['params'])
    if not runs:
      continue
    n = np.array([r['params'] for r in runs], float)
    d = np.array([r['tokens'] for r in runs], float)
    loss = np.array([r[metric] for r in runs], float)
    x = np.log10(n)
    entry = {'budget': c, 'params': n.tolist(), 'tokens': d.tolist(),
             'loss': loss.tolist(), 'edge': True}
    best = int(np.argmin(loss))
    x_opt = x[best]
    if len(set(x.tolist())) >= 3:
      a2, a1, a0 = np.polyfit(x, loss, 2)
      entry['parabola'] = [float(a2), float(a1), float(a0)]
      vertex = -a1 / (2 * a2) if a2 > 0 else None
      if vertex is not None and x.min() <= vertex <= x.max():
        x_opt, entry['edge'] = float(vertex), False
    entry['n_opt'] = float(10 ** x_opt)
    # D at N_opt on this budget's N -> D line (D = C / F(N), F ~ linear in N).
    entry['d_opt'] = float(10 ** np.interp(x_opt, x, np.log10(d)))
    out['budgets'].append(entry)
  inner = [e for e in out['budgets'] if not e['edge']]
  c = np.array([e['budget'] for e in inner], float)
  out['n_fit'] = _power_law(c, np.array([e['n_opt'] for e in inner]))
  out['d_fit'] = _power_law(c, np.array([e['d_opt'] for e in inner]))
  out['fitted_on'] = len(inner)
  return out


def markdown(result: dict[str, Any]) -> str:
  """The section results.md gets for an IsoFLOP sweep."""
  lines = ['', '## IsoFLOP fit', '',
           f'Loss-optimal size per budget (parabola in log10 N of '
           f"{result['metric']}; `edge`: the optimum is not inside the sizes "
           'run, so the budget is left out of the fit).', '',
           '| budget C (FLOPs) | runs | N_opt (params) | D_opt (tokens) | '
           'D_opt / N_opt | edge |', '|---|---|---|---|---|---|']
  for e in result['budgets']:
    lines.append(f"| {e['budget']:.3g} | {len(e['params'])} | "
                 f"{e['n_opt']:,.0f} | {e['d_opt']:,.0f} | "
                 f"{e['d_opt'] / e['n_opt']:.1f} | "
                 f"{'yes' if e['edge'] else 'no'} |")
  lines.append('')
  for key, sym in (('n_fit', 'N_opt'), ('d_fit', 'D_opt')):
    fitted = result.get(key)
    lines.append(f'{sym} ~ C^{fitted[1]:.3f} (fitted on '
                 f"{result['fitted_on']} budgets)" if fitted else
                 f'{sym}: fewer than two budgets with an inner optimum; no '
                 'fit.')
    lines.append('')
  return '\n'.join(lines) + '\n'
