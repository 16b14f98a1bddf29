"""`glm sweep` and `glm plot`: the command-line side of glm.experiments."""

from __future__ import annotations

import json
import os
from typing import Sequence

from glm import files
from glm.errors import UserError
from glm.experiments import results as results_lib
from glm.experiments import sweep as sweep_lib


def add_parsers(sub) -> None:
  sw = sub.add_parser('sweep', help='train a grid of gin variants, one '
                      'workdir each; table and plots of the results')
  sw.add_argument('--gin_file', action='append', default=[])
  sw.add_argument('--sweep', default=None,
                  help='a sweep file (configs/ablations/*.yaml)')
  sw.add_argument('--axis', action='append', default=[],
                  help="NAME=V1,V2 (gin literals, repeatable: a grid), e.g. "
                  "\"ModelConfig.position='alibi','rope'\"")
  sw.add_argument('--workdir', required=True)
  sw.add_argument('--parallel', type=int, default=1,
                  help='variants at once, each on its share of the cores')
  sw.add_argument('--mesh', default=None,
                  help='a device mesh for every variant (glm train --mesh)')
  sw.add_argument('--metric', default=None,
                  help='the final metric of the axis plots (default '
                  'eval_loss, or the sweep file\'s metric:)')
  pl = sub.add_parser('plot', help='loss curves of any workdirs in one '
                      'figure (PNG)')
  pl.add_argument('workdirs', nargs='+')
  pl.add_argument('--out', required=True)
  pl.add_argument('--title', default='')


def cmd_sweep(args, bindings: Sequence[str]) -> int:
  if args.parallel < 1:
    raise UserError(f'--parallel={args.parallel} must be >= 1.')
  if not (args.sweep or args.axis):
    raise UserError('nothing to sweep; give --sweep FILE or one or more '
                    '--axis NAME=V1,V2.')
  sweep = sweep_lib.build(args.gin_file, bindings, args.sweep, args.axis,
                          args.workdir, mesh=args.mesh)
  if args.metric:
    sweep.metric = args.metric
  outcome = sweep_lib.run(sweep, parallel=args.parallel)
  return finish(sweep, outcome)


def finish(sweep: sweep_lib.Sweep, outcome: dict[str, dict]) -> int:
  """results.jsonl, results.md and the plots; 1 when a variant failed."""
  from glm.experiments import plot  # pylint: disable=g-import-not-at-top
  rows = results_lib.sweep_rows(sweep.workdir, outcome)
  extra = ''
  # An IsoFLOP sweep's zipped sizes are no axes to plot one by one.
  axes = [] if sweep.isoflop_budgets else sweep.axes
  pngs = plot.sweep_plots(sweep.workdir, rows, axes, sweep.metric,
                          scaling=sweep.scaling)
  if sweep.isoflop_budgets:
    from glm.experiments import scaling  # pylint: disable=g-import-not-at-top
    fitted = scaling.fit(rows, sweep.isoflop_budgets, sweep.metric)
    files.write_text_atomic(os.path.join(sweep.workdir, 'isoflop.json'),
                            json.dumps(fitted, indent=1))
    extra = scaling.markdown(fitted)
    pngs.append(plot.plot_isoflop(fitted,
                                  os.path.join(sweep.workdir, 'isoflop.png')))
  results_lib.write(sweep.workdir, rows, sweep.axes, extra=extra)
  failed = [r['name'] for r in rows if r['status'] == 'failed']
  print(f'glm sweep: wrote {os.path.join(sweep.workdir, "results.md")}, '
        f'results.jsonl and {len(pngs)} plots'
        + (f'; {len(failed)} failed: {", ".join(failed)}' if failed else ''))
  return 1 if failed else 0


def cmd_plot(args) -> None:
  from glm.experiments import plot  # pylint: disable=g-import-not-at-top
  missing = [w for w in args.workdirs
             if not os.path.isfile(os.path.join(w, 'metrics.jsonl'))]
  if missing:
    raise UserError(f'{missing[0]} has no metrics.jsonl; pass glm train '
                    'workdirs.')
  groups = {os.path.basename(os.path.normpath(w)): [w]
            for w in args.workdirs}
  if len(groups) < len(args.workdirs):
    groups = {w: [w] for w in args.workdirs}
  print(plot.plot_curves(groups, args.out, args.title))
