"""Scoring (forward pass) throughput: glm vs Hugging Face transformers BLOOM.

Both score the same randomly initialised BLOOM (converted with glm's
hf_bloom) on the same batch, in float32 on the CPU, in one process. Prints a
table and writes JSON with tokens/s of each, their ratio, the max |log-prob|
difference, and glm's achieved FLOP/s as a fraction of a matmul ceiling
measured in the same process.

  .venv/bin/python benchmarks/score_throughput.py [--hidden 256 --layers 4 ...]

Defaults are the project's yardstick shape: vocab 8192, hidden 256, 4 layers,
8 heads, batch 8 x 256.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from glm.hf import bloom as hf_bloom
from glm.inference import scoring
from glm.model import info as model_info
from glm.training import loop


import report  # benchmarks/report.py, next to this script


def _time(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  t = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t) / repeats


def main() -> None:
  p = report.yardstick_parser(__doc__, 'score_throughput.json')
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args()

  torch.manual_seed(0)
  hf_cfg = transformers.BloomConfig(vocab_size=args.vocab,
                                    hidden_size=args.hidden,
                                    n_layer=args.layers, n_head=args.heads)
  hf_model = transformers.BloomForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    cfg, params, _ = hf_bloom.hf_to_glm(d)
  params = jax.tree.map(jnp.asarray, params)

  rng = np.random.RandomState(0)
  tokens = rng.randint(0, args.vocab, (args.batch, args.seq_len)).astype(
      np.int32)
  segs = np.ones_like(tokens)
  n_tokens = tokens.size

  glm_lp = lambda: scoring._token_logprobs(  # pylint: disable=protected-access
      cfg, params, tokens, segs).block_until_ready()
  t_glm = _time(glm_lp, args.repeats)

  tt = torch.from_numpy(tokens.astype(np.int64))

  def hf_lp():
    with torch.no_grad():
      logp = torch.log_softmax(hf_model(tt).logits[:, :-1].float(), -1)
      return logp.gather(-1, tt[:, 1:, None])[..., 0]
  t_hf = _time(hf_lp, args.repeats)

  diff = float(np.abs(np.asarray(glm_lp()) - hf_lp().numpy()).max())
  flops = model_info.info(cfg, args.seq_len)['forward_flops_per_token']
  ceiling = loop.measure_peak_flops('float32')
  rows = {
      'glm_tokens_per_s': n_tokens / t_glm,
      'hf_tokens_per_s': n_tokens / t_hf,
      'glm_over_hf': t_hf / t_glm,
      'glm_flops_per_s': flops * n_tokens / t_glm,
      'matmul_ceiling_flops_per_s': ceiling,
      'glm_fraction_of_ceiling': flops * n_tokens / t_glm / ceiling,
      'max_abs_logprob_diff': diff,
      'shape': vars(args) | {'out': None},
      'devices': [str(d) for d in jax.devices()],
      'torch_threads': torch.get_num_threads(),
  }
  report.write(rows, args.out)

if __name__ == '__main__':
  main()
