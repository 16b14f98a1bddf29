"""Training throughput: glm vs Hugging Face transformers BLOOM.

Both train the same randomly initialised BLOOM (the HF init converted with
glm's hf_bloom, so both start from the same weights) on the same batch of
random tokens, in float32 on the CPU, in one process, with the same AdamW
(betas, eps, weight decay on matrices only, global-norm clip 1.0, the same
warmup + cosine learning-rate table). glm runs its real jitted step
(`glm.training.step.make_train_step` with `glm.training.optimizers.make_optimizer`);
transformers runs `BloomForCausalLM` with `torch.optim.AdamW`.

Prints a table and writes JSON with tokens/s of each, their ratio, glm's
achieved FLOP/s (`glm.model.info` training FLOPs) as a fraction of an fp32
matmul ceiling measured in the same process, the first-step losses of both
(they agree to ~1e-5 since the weights are identical), glm's compile time,
and the compile time + first step of the default run
(configs/runs/default.gin's model at its batch and sequence length).

  .venv/bin/python benchmarks/train_throughput.py [--hidden 256 --layers 4 ...]

Defaults are the project's yardstick shape: vocab 8192, hidden 256, 4 layers,
8 heads, batch 8 x 256. Goals: glm >= 1.5x transformers, >= 60% of the
ceiling. Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import os
import re
import tempfile
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from glm import gin_config
from glm.hf import bloom as hf_bloom
from glm.model.config import ModelConfig
from glm.model import info as model_info
from glm.model import transformer
from glm.training import loop
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib


import report  # benchmarks/report.py, next to this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared optimiser hyper-parameters and the learning-rate table of both.
OPT = optimizers.OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                 min_lr_ratio=0.1, weight_decay=0.1, b1=0.9,
                                 b2=0.95, eps=1e-8, grad_clip=1.0)
TOTAL_STEPS = 1000


def lm_batch(tokens: np.ndarray) -> dict[str, jax.Array]:
  """Next-token batch: targets are tokens shifted left, last position masked
  (the same T - 1 predictions HF's `labels=tokens` loss averages)."""
  targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], 1)
  mask = np.ones(tokens.shape, np.float32)
  mask[:, -1] = 0.0
  return {'tokens': jnp.asarray(tokens), 'targets': jnp.asarray(targets),
          'loss_mask': jnp.asarray(mask)}


def lr_table(tokens_per_step: int) -> np.ndarray:
  return optimizers.lr_table(OPT, np.full(TOTAL_STEPS, tokens_per_step))


def glm_trainer(cfg: ModelConfig, params, batch):
  """Returns (step(), first-step seconds incl. compile, first-step loss).

  The step is the trainer's own: one micro-batch ([1, B, T]), loss-spike and
  NaN guards included.
  """
  opt = optimizers.make_optimizer(OPT, lr_table(batch['tokens'].size))
  step_fn, _ = step_lib.make_train_step(cfg, opt)
  state = state_lib.new_state(params, opt)
  batch = jax.tree.map(lambda x: x[None], batch)  # [B, T] -> [A=1, B, T]
  box = [state]

  def step():
    box[0], m = step_fn(box[0], batch)
    return m

  t = time.perf_counter()
  m = step()
  loss = float(m['loss'])
  return step, time.perf_counter() - t, loss


def hf_trainer(model, tokens: np.ndarray):
  """Returns (step(), first-step seconds, first-step loss) for torch AdamW
  with glm's hyper-parameters: decay on matrices but not on the embedding,
  biases or norms; global-norm clip; the same warmup + cosine schedule."""
  lrs = lr_table(tokens.size)
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    is_matrix = p.ndim >= 2 and 'word_embeddings' not in name
    (decay if is_matrix else no_decay).append(p)
  opt = torch.optim.AdamW(
      [{'params': decay, 'weight_decay': OPT.weight_decay},
       {'params': no_decay, 'weight_decay': 0.0}],
      lr=float(lrs[0]), betas=(OPT.b1, OPT.b2), eps=OPT.eps)
  tt = torch.from_numpy(tokens.astype(np.int64))
  model.train()
  count = [0]

  def step():
    for group in opt.param_groups:
      group['lr'] = float(lrs[min(count[0], len(lrs) - 1)])
    loss = model(input_ids=tt, labels=tt).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
    opt.step()
    count[0] += 1
    return loss

  t = time.perf_counter()
  loss = step().item()
  return step, time.perf_counter() - t, loss


def time_steps(step, steps: int, sync) -> float:
  """Median seconds per step over `steps` calls (after the first)."""
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    sync(step())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def default_run_compile() -> dict:
  """Compile time + first step of configs/runs/default.gin's model."""
  gin_config.parse([os.path.join(ROOT, 'configs', 'runs', 'default.gin')], [])
  cfg = ModelConfig()
  macros = gin.config_str()
  gin.clear_config()
  batch_size = int(re.search(r'BATCH_SIZE\s*=\s*(\d+)', macros).group(1))
  seq_len = int(re.search(r'SEQ_LEN\s*=\s*(\d+)', macros).group(1))
  tokens = np.random.RandomState(1).randint(
      0, cfg.vocab_size, (batch_size, seq_len)).astype(np.int32)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  step, first, _ = glm_trainer(cfg, params, lm_batch(tokens))
  per_step = time_steps(step, 5, lambda m: m['loss'].block_until_ready())
  return {'default_run_first_step_s': first,
          'default_run_step_s': per_step,
          'default_run_tokens_per_s': batch_size * seq_len / per_step,
          'default_run_shape': {'batch': batch_size, 'seq_len': seq_len}}


def main() -> None:
  p = report.yardstick_parser(__doc__, 'train_throughput.json')
  p.add_argument('--steps', type=int, default=10,
                 help='timed steps of each (median), after one warm-up')
  p.add_argument('--skip_default_run', action='store_true',
                 help='do not time the default run config')
  args = p.parse_args()

  torch.manual_seed(0)
  hf_cfg = transformers.BloomConfig(vocab_size=args.vocab,
                                    hidden_size=args.hidden,
                                    n_layer=args.layers, n_head=args.heads)
  hf_model = transformers.BloomForCausalLM(hf_cfg)
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    cfg, params, _ = hf_bloom.hf_to_glm(d)
  params = jax.tree.map(jnp.asarray, params)

  tokens = np.random.RandomState(0).randint(
      0, args.vocab, (args.batch, args.seq_len)).astype(np.int32)
  n_tokens = tokens.size

  glm_step, glm_first, glm_loss = glm_trainer(cfg, params, lm_batch(tokens))
  t_glm = time_steps(glm_step, args.steps,
                     lambda m: m['loss'].block_until_ready())
  hf_step, hf_first, hf_loss = hf_trainer(hf_model, tokens)
  t_hf = time_steps(hf_step, args.steps, lambda loss: loss.item())

  flops = model_info.info(cfg, args.seq_len)['flops_per_token'] * n_tokens
  ceiling = loop.measure_peak_flops('float32')
  rows = {
      'glm_tokens_per_s': n_tokens / t_glm,
      'hf_tokens_per_s': n_tokens / t_hf,
      'glm_over_hf': t_hf / t_glm,
      'glm_step_s': t_glm,
      'hf_step_s': t_hf,
      'glm_flops_per_s': flops / t_glm,
      'matmul_ceiling_flops_per_s': ceiling,
      'glm_fraction_of_ceiling': flops / t_glm / ceiling,
      'glm_compile_and_first_step_s': glm_first,
      'hf_first_step_s': hf_first,
      'first_step_loss_glm': glm_loss,
      'first_step_loss_hf': hf_loss,
  }
  if not args.skip_default_run:
    try:
      rows |= default_run_compile()
    except gin_config.GinError as e:  # the run file and train() disagree
      rows['default_run_error'] = str(e)
      print(f'default run not timed: {e}')
  rows |= {
      'shape': vars(args) | {'out': None},
      'devices': [str(d) for d in jax.devices()],
      'torch_threads': torch.get_num_threads(),
      'load_average': os.getloadavg(),
  }
  report.write(rows, args.out)

if __name__ == '__main__':
  main()
