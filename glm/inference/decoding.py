"""Greedy decoding for causal models (`greedy_generate`) and the end-of-run
samples (`run_samples`), on the KV-cache path of `glm.inference.generate`
and, for a model trained on GLM blank infilling, `glm.inference.infill`."""

from __future__ import annotations

from typing import Any, Sequence

from glm.model.config import ModelConfig
from glm.inference import generate as generate_lib
from glm.inference import infill


def greedy_generate(cfg: ModelConfig, params: Any, prompt: Sequence[int],
                    num_new: int, eos_id: int | None = None) -> list[int]:
  """Returns up to num_new greedily chosen tokens after `prompt` (cut
  before the first eos)."""
  return generate_lib.generate(cfg, params, [list(prompt)],
                               max_new_tokens=num_new, eos_id=eos_id)[0]


def run_samples(cfg: ModelConfig, params: Any, tok: Any, prompt: str,
                num_new: int, sampling: generate_lib.Sampling, *,
                blank_infilling: bool) -> tuple[str, str | None]:
  """The end-of-run greedy and sampled (`sampling`, seed 0) texts after
  `prompt`. A model trained mostly on GLM blank infilling continues the
  prompt as it was trained to: a [gMASK] blank after it, filled up to
  `<eop>` (otherwise it would be asked for a causal continuation it never
  learned)."""
  ids = tok.encode(prompt)
  if num_new < 1:
    return tok.decode(ids), None
  if blank_infilling:
    from glm.data import objectives  # pylint: disable=g-import-not-at-top
    blank_ids = infill.BlankIds.from_special(
        objectives.SpecialIds.from_tokenizer(tok))
    fill = lambda **kw: infill.infill(
        cfg, params, [ids], blank_ids, max_new_tokens=num_new,
        **kw)[0]['tokens']
    return tok.decode(fill()), tok.decode(fill(sampling=sampling, seed=0))
  greedy = greedy_generate(cfg, params, ids, num_new, eos_id=tok.eos_id)
  sampled = generate_lib.generate(cfg, params, [ids], max_new_tokens=num_new,
                                  eos_id=tok.eos_id, sampling=sampling,
                                  seed=0)[0]
  return tok.decode(ids + greedy), tok.decode(ids + sampled)
