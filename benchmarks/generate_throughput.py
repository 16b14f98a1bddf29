"""Generation throughput: glm's KV-cache decode vs transformers' generate.

Both decode the same randomly initialised BLOOM (converted with glm's
hf_bloom), greedily, in float32 on the CPU, in one process: prompts of
--prompt_len tokens, --new_tokens new tokens (no eos: every row runs to the
end), batch 1 and 8, at the yardstick shape (hidden 256) and at hidden 768.
glm runs `glm.inference.generate.generate` (prefill + a compiled while_loop);
transformers runs `BloomForCausalLM.generate(do_sample=False)` with its KV
cache. Rounds are interleaved and the medians taken; compilation is excluded
(one warm-up call each). Also glm's per-token decode time at contexts 64 to
1024 (batch 1): (time for N new tokens - time for 1) / (N - 1).

Goals: glm >= 3x transformers' new tokens/s at batch 1 and 8; per-token time
at context 1024 within 1.5x of that at 64.

  .venv/bin/python benchmarks/generate_throughput.py [--hiddens 256,768 ...]
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from glm.hf import bloom as hf_bloom
from glm.inference import generate as generate_lib

import report  # benchmarks/report.py, next to this script


def _model(args, hidden):
  torch.manual_seed(0)
  hf_cfg = transformers.BloomConfig(vocab_size=args.vocab, hidden_size=hidden,
                                    n_layer=args.layers, n_head=args.heads)
  hf_model = transformers.BloomForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    cfg, params, _ = hf_bloom.hf_to_glm(d)
  return hf_model, cfg, jax.tree.map(jnp.asarray, params)


def _glm(cfg, params, prompts, new):
  return generate_lib.generate(cfg, params, prompts.tolist(),
                               max_new_tokens=new)


def _hf(model, prompts, new):
  with torch.no_grad():
    out = model.generate(torch.from_numpy(prompts.astype(np.int64)),
                         attention_mask=torch.ones(prompts.shape,
                                                   dtype=torch.long),
                         max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)
  return out[:, prompts.shape[1]:].tolist()


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def throughput(args, hidden) -> dict:
  hf_model, cfg, params = _model(args, hidden)
  rng = np.random.RandomState(0)
  rows = {}
  for batch in (1, 8):
    prompts = rng.randint(3, args.vocab, (batch, args.prompt_len))
    run_glm = lambda: _glm(cfg, params, prompts, args.new_tokens)
    run_hf = lambda: _hf(hf_model, prompts, args.new_tokens)
    run_glm()                                        # compile
    t_glm, t_hf = [], []
    for _ in range(args.rounds):                    # interleaved
      dt, glm_out = _timed(run_glm)
      t_glm.append(dt)
      dt, hf_out = _timed(run_hf)
      t_hf.append(dt)
    n = batch * args.new_tokens
    g, h = statistics.median(t_glm), statistics.median(t_hf)
    same = np.mean([a == b for ra, rb in zip(glm_out, hf_out)
                    for a, b in zip(ra, rb)])
    key = f'h{hidden}/b{batch}'
    rows.update({f'{key}/glm_tokens_per_s': n / g,
                 f'{key}/hf_tokens_per_s': n / h,
                 f'{key}/glm_over_hf': h / g,
                 f'{key}/same_greedy_tokens': float(same)})
    print(f'{key}: glm {n / g:.0f} tok/s, transformers {n / h:.0f} tok/s, '
          f'{h / g:.2f}x, same tokens {same:.3f}', flush=True)
  return rows


def per_token(args, hidden) -> dict:
  """glm's decode time per token at each context length (batch 1)."""
  _, cfg, params = _model(args, hidden)
  rng = np.random.RandomState(1)
  n = args.context_new_tokens
  rows = {}
  for ctx in args.contexts:
    prompts = rng.randint(3, args.vocab, (1, ctx))
    full = lambda: _glm(cfg, params, prompts, n)
    one = lambda: _glm(cfg, params, prompts, 1)
    full(), one()                                    # compile both
    t_full, t_one = [], []
    for _ in range(args.rounds):
      t_full.append(_timed(full)[0])
      t_one.append(_timed(one)[0])
    dt = (statistics.median(t_full) - statistics.median(t_one)) / (n - 1)
    rows[f'h{hidden}/ctx{ctx}/ms_per_token'] = 1e3 * dt
    print(f'h{hidden} context {ctx}: {1e3 * dt:.3f} ms per token', flush=True)
  first, last = args.contexts[0], args.contexts[-1]
  rows[f'h{hidden}/ctx{last}_over_ctx{first}'] = (
      rows[f'h{hidden}/ctx{last}/ms_per_token']
      / rows[f'h{hidden}/ctx{first}/ms_per_token'])
  return rows


def main() -> None:
  p = report.yardstick_parser(__doc__, 'generate_throughput.json')
  p.add_argument('--hiddens', default='256,768')
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--new_tokens', type=int, default=256)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--contexts', default='64,128,256,512,1024')
  p.add_argument('--context_new_tokens', type=int, default=64)
  args = p.parse_args()
  args.contexts = [int(c) for c in args.contexts.split(',')]
  rows = {}
  for hidden in (int(h) for h in args.hiddens.split(',')):
    rows.update(throughput(args, hidden))
    rows.update(per_token(args, hidden))
  goals = {k: v >= 3.0 for k, v in rows.items() if k.endswith('glm_over_hf')}
  goals.update({k: v <= 1.5 for k, v in rows.items()
                if k.endswith('_over_ctx64')})
  report.write(rows, args.out, {
      'rows': rows, 'goals': goals, 'settings': vars(args),
      'devices': [str(d) for d in jax.devices()],
      'torch_threads': torch.get_num_threads()})
  for k, ok in goals.items():
    print(f'{k}: {"met" if ok else "NOT met"}')


if __name__ == '__main__':
  main()
