"""What the glm-vs-transformers benchmarks share: the yardstick shape flags
and the metric table + JSON they end with."""

from __future__ import annotations

import argparse
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def yardstick_parser(doc: str, out_name: str) -> argparse.ArgumentParser:
  """Flags of the project's yardstick BLOOM (vocab 8192, hidden 256, 4 layers,
  8 heads, batch 8 x 256) and --out (default results/<out_name>)."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--out', default=os.path.join(RESULTS, out_name))
  return p


def write(rows: dict, out: str | None, extra: dict | None = None) -> None:
  """Prints the float metrics of `rows` as a table; writes `extra` (or,
  without it, every row) as JSON to `out` when given."""
  if rows:
    width = max(32, 2 + max(len(k) for k in rows))
    print(f'{"metric":<{width}}{"value":>12}')
    for k, v in rows.items():
      if isinstance(v, float):
        print(f'{k:<{width}}{v:>12.4g}')
  if out:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
      json.dump(rows if extra is None else extra, f, indent=2)
    print(f'wrote {out}')
