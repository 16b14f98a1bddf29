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


def write(rows: dict, out: str) -> None:
  """Prints the float metrics as a table and writes every row as JSON."""
  print(f'{"metric":<32}{"value":>16}')
  for k, v in rows.items():
    if isinstance(v, float):
      print(f'{k:<32}{v:>16.4g}')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(rows, f, indent=2)
  print(f'wrote {out}')
