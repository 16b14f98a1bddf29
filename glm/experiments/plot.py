"""Pictures of runs (matplotlib, PNG): loss curves with a band over seeds, a
final metric against each sweep axis, and loss against compute with a fitted
power law. `glm plot W1 W2 ... --out fig.png` draws any workdirs' curves.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from glm import files
from glm.experiments import results as results_lib


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only; no screen
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def curve(workdir: str, key: str = 'loss', name: str = 'metrics.jsonl'
          ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one workdir's metrics.jsonl (or eval.jsonl, 'all')."""
  rows = [r for r in files.read_jsonl(os.path.join(workdir, name))
          if key in r]
  return (np.asarray([r['step'] for r in rows]),
          np.asarray([r[key] for r in rows], float))


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]):
  """Seeds' curves on their common steps -> (steps, mean, low, high)."""
  common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
  stack = np.stack([np.interp(common, s, v) for s, v in curves])
  return (np.asarray(common), stack.mean(0), stack.min(0), stack.max(0))


def plot_curves(groups: dict[str, Sequence[str]], out: str,
                title: str = '') -> str:
  """Train loss (lines, band = min..max over the group's runs) and held-out
  loss (markers) against step, one colour per group of workdirs."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, dirs) in enumerate(groups.items()):
    color = f'C{i % 10}'
    train = [c for c in (curve(d) for d in dirs) if len(c[0])]
    if train:
      steps, mean, lo, hi = mean_band(train)
      n = f' ({len(train)} runs)' if len(train) > 1 else ''
      ax.plot(steps, mean, color=color, lw=1.2, label=label + n)
      if len(train) > 1:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    held = [c for c in (curve(d, 'all', 'eval.jsonl') for d in dirs)
            if len(c[0])]
    if held:
      steps, mean, lo, hi = mean_band(held)
      ax.errorbar(steps, mean, yerr=[mean - lo, hi - mean], color=color,
                  fmt='o', ms=4, capsize=2, lw=0.8)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token): line train, dots held-out')
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  return _save(fig, plt, out)


def plot_axes(groups: Sequence[dict[str, Any]], axes: Sequence[str],
              metric: str, out_prefix: str) -> list[str]:
  """For each axis: the metric (mean +- std over seeds) at its values, one
  line per setting of the other axes. Returns the PNG paths."""
  plt = _pyplot()
  paths = []
  shown = [a for a in axes if a != results_lib.SEED]
  for axis in shown:
    others = [a for a in shown if a != axis]
    values = list(dict.fromkeys(g['axes'][axis] for g in groups))
    lines: dict[str, dict[str, tuple[float, float]]] = {}
    for g in groups:
      if metric in g:
        key = ', '.join(f'{a.rsplit(".", 1)[-1]}={g["axes"][a]}'
                        for a in others) or metric
        lines.setdefault(key, {})[g['axes'][axis]] = g[metric]
    if not lines:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, pts) in enumerate(lines.items()):
      xs = [j for j, v in enumerate(values) if v in pts]
      ms = [pts[values[j]][0] for j in xs]
      ss = [pts[values[j]][1] for j in xs]
      ax.errorbar(xs, ms, yerr=ss, fmt='-o', capsize=3, color=f'C{i % 10}',
                  label=label)
    ax.set_xticks(range(len(values)), [v.strip('\'"') for v in values])
    ax.set_xlabel(axis)
    ax.set_ylabel(f'{metric} (mean ± std over seeds)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    name = axis.rsplit('.', 1)[-1]
    paths.append(_save(fig, plt, f'{out_prefix}{name}.png'))
  return paths


def plot_lengths(groups: Sequence[dict[str, Any]], out: str) -> str | None:
  """Held-out loss against the evaluated length (1x = the training length,
  then each `len_<k>x`), one line per variant (mean +- std over seeds)."""
  ks = sorted({int(k[4:-1]) for g in groups for k in g
               if k.startswith('len_')})
  if not ks:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, g in enumerate(groups):
    pts = [(1, g['eval_loss'])] if 'eval_loss' in g else []
    pts += [(k, g[f'len_{k}x']) for k in ks if f'len_{k}x' in g]
    if not pts:
      continue
    label = ', '.join(f'{a.rsplit(".", 1)[-1]}={v.strip(chr(39))}'
                      for a, v in g['axes'].items()) or 'runs'
    ax.errorbar([k for k, _ in pts], [m for _, (m, _) in pts],
                yerr=[s for _, (_, s) in pts], fmt='-o', capsize=3,
                color=f'C{i % 10}', label=label)
  ax.set_xscale('log', base=2)
  ax.set_xticks([1, *ks], ['1x', *(f'{k}x' for k in ks)])
  ax.set_xlabel('evaluated length / training length')
  ax.set_ylabel('held-out loss (mean ± std over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, plt, out)


def fit_power_law(x: Sequence[float], y: Sequence[float]
                  ) -> tuple[float, float]:
  """Least squares on logs: y = a * x**b -> (a, b)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
    raise ValueError('a power law needs two or more positive points')
  b, log_a = np.polyfit(np.log(x), np.log(y), 1)
  return float(math.exp(log_a)), float(b)


def plot_compute(groups: Sequence[dict[str, Any]], metric: str,
                 out: str) -> tuple[str, tuple[float, float] | None]:
  """Loss against training FLOPs (log-log) with the fitted power law."""
  plt = _pyplot()
  pts = [(g['flops'][0], g[metric][0], g[metric][1]) for g in groups
         if 'flops' in g and metric in g]
  fig, ax = plt.subplots(figsize=(6, 4))
  fit = None
  if pts:
    c, l, s = (np.asarray(v) for v in zip(*sorted(pts)))
    ax.errorbar(c, l, yerr=s, fmt='o', capsize=3, label='runs')
    if len(set(c.tolist())) > 1:
      fit = fit_power_law(c, l)
      grid = np.geomspace(c.min(), c.max(), 50)
      ax.plot(grid, fit[0] * grid ** fit[1], '--',
              label=f'fit: {fit[0]:.3g} · C^{fit[1]:.3f}')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('training compute C (FLOPs)')
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7)
  return _save(fig, plt, out), fit


def plot_isoflop(result: dict[str, Any], out: str) -> str:
  """Left: loss against parameters per budget (the fitted parabola, N_opt
  marked). Right: N_opt and D_opt against C with the fitted power laws."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for i, e in enumerate(result['budgets']):
    color = f'C{i % 10}'
    left.plot(e['params'], e['loss'], 'o', color=color,
              label=f"C = {e['budget']:.2g}")
    if 'parabola' in e:
      x = np.linspace(math.log10(min(e['params'])),
                      math.log10(max(e['params'])), 50)
      left.plot(10 ** x, np.polyval(e['parabola'], x), '-', color=color,
                lw=0.8)
    left.axvline(e['n_opt'], color=color, ls=':' if e['edge'] else '--',
                 lw=0.8)
  left.set_xscale('log')
  left.minorticks_off()  # log-axis minor labels collide on a narrow range
  left.set_xlabel('parameters N')
  left.set_ylabel(result['metric'])
  left.set_title('IsoFLOP curves (dotted: optimum at the edge)')
  left.legend(fontsize=7)
  left.grid(alpha=0.3, which='both')
  inner = [e for e in result['budgets'] if not e['edge']]
  for color, (key, fit_key, marker, name) in enumerate((
      ('n_opt', 'n_fit', 'o', 'N_opt'), ('d_opt', 'd_fit', 's', 'D_opt'))):
    c = np.array([e['budget'] for e in inner], float)
    right.plot(c, [e[key] for e in inner], marker, color=f'C{color}',
               label=name)
    fitted = result.get(fit_key)
    if fitted:
      grid = np.geomspace(c.min(), c.max(), 20)
      right.plot(grid, fitted[0] * grid ** fitted[1], '--', color=f'C{color}',
                 label=f'{name} ~ C^{fitted[1]:.2f}')
  right.set_xscale('log')
  right.set_yscale('log')
  right.set_xlabel('training compute C (FLOPs)')
  right.set_ylabel('parameters / tokens')
  right.set_title('compute-optimal N and D')
  right.legend(fontsize=7)
  right.grid(alpha=0.3, which='both')
  return _save(fig, plt, out)


def _save(fig, plt, out: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(out + '.tmp.png', dpi=110)
  plt.close(fig)
  os.replace(out + '.tmp.png', out)
  return out


def sweep_plots(sweep_dir: str, rows: Sequence[dict[str, Any]],
                axes: Sequence[str], metric: str = 'eval_loss',
                scaling: bool = False) -> list[str]:
  """D/curves.png, D/axis_<axis>.png per axis, D/lengths.png when runs were
  evaluated at longer lengths, D/compute.png for scaling sweeps."""
  groups = results_lib.group_by_seed(rows)
  by_label = {}
  for g in groups:
    label = ', '.join(f'{k.rsplit(".", 1)[-1]}={v.strip(chr(39))}'
                      for k, v in g['axes'].items()) or 'runs'
    by_label[label] = [os.path.join(sweep_dir, n) for n in g['names']]
  paths = [plot_curves(by_label, os.path.join(sweep_dir, 'curves.png'),
                       os.path.basename(os.path.abspath(sweep_dir)))]
  paths += plot_axes(groups, axes, metric, os.path.join(sweep_dir, 'axis_'))
  lengths = plot_lengths(groups, os.path.join(sweep_dir, 'lengths.png'))
  if lengths:
    paths.append(lengths)
  if scaling:
    paths.append(plot_compute(groups, metric,
                              os.path.join(sweep_dir, 'compute.png'))[0])
  return paths
