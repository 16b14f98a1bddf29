"""Held-out loss: overall, per task of the mixture and per language.

  sets = eval_sets(valid_split, data_cfg, seq_len=128, batch_size=16, seed=0,
                   num_batches=8, breakdown=True, lengths=(2, 4))
  row = evaluate(eval_step, params, sets, put)   # {'all': 3.2, 'len_2x': ...,
                                                 #  'acc/all': 0.31, ...}

`all` draws `num_batches` batches of the run's own mixture from the valid
split; with `breakdown`, every task of a mixture of several gets a quarter
as many batches of its own (`task/<name>`; also a task at rate 0, which is
how a run is evaluated on an objective it does not train on), and every
language of the
corpus one batch of causal windows (`lang/<code>`). Batches are fixed for
the run (pure functions of the seed), so evaluations are comparable across
steps and resumes.

`lengths` (multiples k of the training length) add `len_<k>x`: the run's
mixture in windows of k * seq_len tokens, max(1, num_batches // k) batches
(about as many tokens as `all`), to measure how the position encoding
extrapolates past the length the model was trained at.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from glm.data import pipeline

Batch = dict[str, Any]


def eval_sets(valid: pipeline.SplitData, data_cfg: pipeline.DataConfig, *,
              seq_len: int, batch_size: int, seed: int, num_batches: int,
              breakdown: bool, gmask_positions: str = 'mask',
              lengths: Sequence[int] = ()) -> dict[str, list[Batch]]:
  """Named lists of held-out batches [B, T] (numpy) for `evaluate`."""
  make = lambda cfg, t=seq_len: pipeline.Pipeline(
      valid, cfg, seq_len=t, batch_size=batch_size, seed=seed,
      gmask_positions=gmask_positions)
  sets = {'all': make(data_cfg).eval_batches(num_batches)}
  for k in lengths:
    sets[f'len_{k}x'] = make(data_cfg, k * seq_len).eval_batches(
        max(1, num_batches // k))
  if not breakdown:
    return sets
  tasks = [t for t, _ in data_cfg.mixture]
  if len(tasks) > 1:
    for t in tasks:
      sets[f'task/{t}'] = make(pipeline.DataConfig.for_task(t)).eval_batches(
          max(1, num_batches // 4))
  for lang, batches in pipeline.language_eval_batches(
      valid, seq_len=seq_len, batch_size=batch_size, num_batches=1).items():
    sets[f'lang/{lang}'] = batches
  return sets


def evaluate(eval_step: Callable, params: Any, sets: dict[str, list[Batch]],
             put: Callable[[Batch], Batch]) -> dict[str, float]:
  """Mean token loss of every set (`name`) and its teacher-forced top-1
  token accuracy (`acc/<name>`): eval_step(params, put(batch)) returns
  (loss sum, token count, correct count); `put` places a numpy batch on the
  devices."""
  row, acc = {}, {}
  for name, batches in sets.items():
    total = count = correct = 0.0
    for b in batches:
      s, c, k = eval_step(params, put(b))
      total, count = total + float(s), count + float(c)
      correct += float(k)
    row[name] = total / max(count, 1.0)
    acc[f'acc/{name}'] = correct / max(count, 1.0)
  return row | acc
