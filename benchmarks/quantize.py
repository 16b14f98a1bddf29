"""INT8 / INT4 weight-only quantisation: weight bytes and held-out loss.

For each model (default: the `make run` BLOOM at runs/default/model on the
causal-LM task, and a tiny GLM trained with configs/runs/tiny_glm.gin at
runs/tiny_glm/model on GLM blank infilling) it quantises the float
checkpoint with `glm quantize`'s code and reports:
  - the bytes of the quantised block kernels (values and scales) against the
    same kernels in bfloat16 (goals: INT8 <= 0.52x, INT4 <= 0.27x);
  - the held-out loss (and perplexity) of float, INT8 and INT4 on the same
    held-out batches of the model's task (GLM-130B reported INT8 lossless and
    INT4 about +2.5% perplexity on its benchmarks).
A model whose checkpoint is missing is reported as such with the command
that builds it.

  .venv/bin/python benchmarks/quantize.py [--model NAME=CKPT:TASK ...]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import numpy as np

from glm.data import pipeline
from glm.evaluation import heldout
from glm.inference import quantize
from glm.model import checkpoint
from glm.model import transformer
from glm.training import losses

import report  # benchmarks/report.py, next to this script

DEFAULT_MODELS = (
    'bloom=runs/default/model:causal_lm',
    'tiny_glm=runs/tiny_glm/model:glm_blank_infilling',
)
BUILD = {'bloom': 'make run',
         'tiny_glm': 'glm train --gin_file configs/runs/tiny_glm.gin '
                     '--workdir runs/tiny_glm'}


def held_out_loss(cfg, params, batches) -> float:
  model = transformer.Transformer(cfg)

  @jax.jit
  def step(params, batch):
    inputs = {k: v for k, v in batch.items()
              if k not in ('targets', 'loss_mask')}
    return losses.cross_entropy(model.apply({'params': params}, inputs),
                                batch['targets'], batch['loss_mask'])

  total = count = 0.0
  for b in batches:
    s, c = step(params, b)
    total, count = total + float(s), count + float(c)
  return total / count


def _batches(cfg, ckpt, task, args):
  """The held-out batches of `task` (the corpus and tokenizer the run
  files train on, under --data_dir)."""
  del ckpt
  split = pipeline.open_split(os.path.abspath(args.data_dir), 'train',
                              vocab_size=args.vocab)
  valid = pipeline.SplitData(split.corpus_dir, split.tok, 'valid')
  sets = heldout.eval_sets(valid, pipeline.DataConfig.for_task(task),
                           seq_len=args.seq_len, batch_size=args.batch,
                           seed=0, num_batches=args.num_batches,
                           breakdown=False,
                           gmask_positions=cfg.gmask_positions)
  keep = ('tokens', 'targets', 'loss_mask', 'segment_ids', 'position_ids',
          'block_position_ids', 'prefix_mask')
  return [{k: v for k, v in b.items() if k in keep} for b in sets['all']]


def measure(name, ckpt, task, args) -> dict:
  cfg, params = checkpoint.load(ckpt)
  batches = _batches(cfg, ckpt, task, args)
  row = {'checkpoint': ckpt, 'task': task,
         'tokens': int(sum(b['loss_mask'].sum() for b in batches))}
  base = None
  for bits in (0, 8, 4):
    t = time.perf_counter()
    if bits:
      qcfg, qparams = quantize.quantize_params(cfg, params, bits)
      ratio = (quantize.weight_bytes(qparams)
               / quantize.weight_bytes(params, bf16=True))
      row[f'int{bits}_bytes_vs_bf16'] = ratio
    else:
      qcfg, qparams = cfg, params
    loss = held_out_loss(qcfg, qparams, batches)
    tag = f'int{bits}' if bits else 'float'
    row[f'{tag}_loss'] = loss
    row[f'{tag}_ppl'] = math.exp(loss)
    if bits:
      row[f'{tag}_ppl_change_pct'] = 100 * (math.exp(loss - base) - 1)
    else:
      base = loss
    print(f'{name} {tag}: loss {loss:.4f} ({time.perf_counter() - t:.0f}s)',
          flush=True)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', action='append',
                 help='NAME=CHECKPOINT:TASK (repeatable)')
  p.add_argument('--data_dir', default='.cache/data')
  p.add_argument('--vocab', type=int, default=4096)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--num_batches', type=int, default=16)
  p.add_argument('--out', default=os.path.join(report.RESULTS,
                                                'quantize.json'))
  args = p.parse_args()
  results, flat = {}, {}
  for spec in args.model or DEFAULT_MODELS:
    name, rest = spec.split('=', 1)
    ckpt, task = rest.rsplit(':', 1)
    if not os.path.isdir(ckpt):
      print(f'{name}: {ckpt} is missing; build it with: '
            f'{BUILD.get(name, "glm train ...")}')
      results[name] = {'checkpoint': ckpt, 'missing': True}
      continue
    results[name] = measure(name, ckpt, task, args)
    flat.update({f'{name}/{k}': v for k, v in results[name].items()
                 if isinstance(v, float)})
  goals = {}
  for name, r in results.items():
    if 'int8_bytes_vs_bf16' in r:
      goals[name] = {'int8_bytes_le_0.52': r['int8_bytes_vs_bf16'] <= 0.52,
                     'int4_bytes_le_0.27': r['int4_bytes_vs_bf16'] <= 0.27}
  report.write(flat, args.out, {'models': results, 'goals': goals,
                                'settings': vars(args)})
  for name, g in goals.items():
    print(name, ', '.join(f'{k}: {"met" if v else "NOT met"}'
                          for k, v in g.items()))


if __name__ == '__main__':
  main()
