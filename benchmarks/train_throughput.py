"""Training throughput: glm vs Hugging Face's Flax and torch BLOOM.

For each shape (the yardstick: vocab 8192, hidden 256, 4 layers, 8 heads,
batch 8 x 256; and hidden 768 / 16 heads) and each dtype (fp32, bf16), one
process builds three trainers of the same randomly initialised BLOOM (the HF
init, converted with glm's converter, so all start from the same weights):

  glm    its real jitted train step (`glm.training.step.make_train_step`,
         AdamW + clipping, NaN / spike guard); bf16 = glm's policy for this
         backend (`dtype='auto'`: on CPU 'mixed', bf16 matmul inputs with
         fp32 accumulation and elementwise work)
  flax   transformers' `FlaxBloomForCausalLM` (dtype bfloat16 for bf16,
         fp32 parameters) with optax AdamW + global-norm clipping, jitted,
         state donated
  torch  transformers' `BloomForCausalLM` with torch AdamW and gradient
         clipping; bf16 = `torch.autocast('cpu', torch.bfloat16)`

All use the same AdamW hyper-parameters (decay on matrices only). Timing
runs in interleaved rounds (every trainer takes `--steps` steps per round,
in turn, `--rounds` times) so machine noise hits all alike; each figure is
the median step time over all rounds. glm's achieved FLOP/s (`glm info`
training FLOPs) is also given as a fraction of an fp32 matmul ceiling
measured in the same process (best of five 2048^3 products).

  .venv/bin/python benchmarks/train_throughput.py [--rounds 3 --steps 3]

Prints a table per shape and writes JSON (benchmarks/results/...). Goals:
glm >= 1.25x Flax at every shape and dtype, >= 1.0x torch at hidden 768 in
fp32, bf16 >= 1.2x glm's own fp32 at hidden 768, >= 50% of the fp32 ceiling
at hidden 768. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault('USE_TF', '0')  # transformers: no TensorFlow start-up
# torch's OpenMP threads otherwise spin after each step and slow whichever
# trainer runs next in this process.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from glm.hf import bloom as hf_bloom
from glm.model import info as model_info
from glm.training import loop
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib

import report  # benchmarks/report.py, next to this script

OPT = optimizers.OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                 min_lr_ratio=0.1, weight_decay=0.1, b1=0.9,
                                 b2=0.95, eps=1e-8, grad_clip=1.0)
TOTAL_STEPS = 1000
SHAPES = {'hidden256': dict(hidden=256, heads=8),
          'hidden768': dict(hidden=768, heads=16)}


def lm_batch(tokens: np.ndarray) -> dict[str, jax.Array]:
  """Next-token batch: targets are tokens shifted left, last position masked
  (the same T - 1 predictions HF's `labels=tokens` loss averages)."""
  targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], 1)
  mask = np.ones(tokens.shape, np.float32)
  mask[:, -1] = 0.0
  return {'tokens': jnp.asarray(tokens), 'targets': jnp.asarray(targets),
          'loss_mask': jnp.asarray(mask)}


def lrs(tokens_per_step: int) -> np.ndarray:
  return optimizers.lr_table(OPT, np.full(TOTAL_STEPS, tokens_per_step))


def glm_trainer(cfg, params, tokens):
  """step() -> loss (a device array) of glm's own jitted train step."""
  opt = optimizers.make_optimizer(OPT, lrs(tokens.size))
  step_fn, _ = step_lib.make_train_step(cfg, opt)
  box = [state_lib.new_state(jax.tree.map(jnp.copy, params), opt)]
  batch = jax.tree.map(lambda x: x[None], lm_batch(tokens))  # [A=1, B, T]

  def step():
    box[0], m = step_fn(box[0], batch)
    return m['loss']
  return step


def flax_trainer(hf_dir: str, tokens: np.ndarray, dtype):
  """step() -> loss of FlaxBloomForCausalLM with optax AdamW + clipping."""
  model = transformers.FlaxBloomForCausalLM.from_pretrained(
      hf_dir, from_pt=True, dtype=dtype)
  params = model.params  # float32
  decay = jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and 'word_embeddings' not in
      jax.tree_util.keystr(path), params)
  table = jnp.asarray(lrs(tokens.size))
  tx = optax.chain(
      optax.clip_by_global_norm(OPT.grad_clip),
      optax.adamw(lambda c: table[jnp.minimum(c, TOTAL_STEPS - 1)],
                  b1=OPT.b1, b2=OPT.b2, eps=OPT.eps,
                  weight_decay=OPT.weight_decay, mask=decay))
  ids = jnp.asarray(tokens)

  def loss_fn(p):
    logits = model(ids, params=p, train=False).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  def update(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  update = jax.jit(update, donate_argnums=(0, 1))
  box = [params, tx.init(params)]

  def step():
    box[0], box[1], loss = update(box[0], box[1])
    return loss
  return step


def torch_trainer(hf_dir: str, tokens: np.ndarray, bf16: bool):
  """step() -> loss of BloomForCausalLM with torch AdamW (+ autocast)."""
  model = transformers.BloomForCausalLM.from_pretrained(hf_dir)
  model.train()
  table = lrs(tokens.size)
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    is_matrix = p.ndim >= 2 and 'word_embeddings' not in name
    (decay if is_matrix else no_decay).append(p)
  opt = torch.optim.AdamW(
      [{'params': decay, 'weight_decay': OPT.weight_decay},
       {'params': no_decay, 'weight_decay': 0.0}],
      lr=float(table[0]), betas=(OPT.b1, OPT.b2), eps=OPT.eps)
  ids = torch.from_numpy(tokens.astype(np.int64))
  count = [0]

  def step():
    for group in opt.param_groups:
      group['lr'] = float(table[min(count[0], TOTAL_STEPS - 1)])
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
    opt.step()
    count[0] += 1
    return loss
  return step


def sync(loss) -> float:
  """Waits for the step: a jax scalar, or a torch one (detached)."""
  return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)


def measure_shape(name: str, shape: dict, args) -> dict:
  torch.manual_seed(0)
  hf_cfg = transformers.BloomConfig(
      vocab_size=args.vocab, hidden_size=shape['hidden'], n_layer=args.layers,
      n_head=shape['heads'])
  tokens = np.random.RandomState(0).randint(
      0, args.vocab, (args.batch, args.seq_len)).astype(np.int32)
  with tempfile.TemporaryDirectory() as d:
    transformers.BloomForCausalLM(hf_cfg).save_pretrained(d)
    cfg, params, _ = hf_bloom.hf_to_glm(d)
    params = jax.tree.map(jnp.asarray, params)
    trainers, first = {}, {}
    for dtype in ('fp32', 'bf16'):
      glm_cfg = cfg.replace(dtype='float32' if dtype == 'fp32' else 'auto')
      jdt = jnp.float32 if dtype == 'fp32' else jnp.bfloat16
      made = {f'glm_{dtype}': glm_trainer(glm_cfg, params, tokens),
              f'flax_{dtype}': flax_trainer(d, tokens, jdt),
              f'torch_{dtype}': torch_trainer(d, tokens, dtype == 'bf16')}
      for k, step in made.items():  # compile and warm up
        t = time.perf_counter()
        first[k] = sync(step())
        first[k + '_first_step_s'] = time.perf_counter() - t
      trainers |= made
  times = {k: [] for k in trainers}
  for r in range(args.rounds):
    for k, step in trainers.items():
      for _ in range(args.steps):
        t = time.perf_counter()
        sync(step())
        times[k].append(time.perf_counter() - t)
    print(f'{name}: round {r + 1}/{args.rounds} done', flush=True)
  med = {k: float(np.median(v)) for k, v in times.items()}
  flops = model_info.info(cfg, args.seq_len)['flops_per_token'] * tokens.size
  ceiling = loop.measure_peak_flops('float32')
  rows = {f'{k}_step_s': v for k, v in med.items()}
  for dt in ('fp32', 'bf16'):
    g = med[f'glm_{dt}']
    rows |= {f'glm_over_flax_{dt}': med[f'flax_{dt}'] / g,
             f'glm_over_torch_{dt}': med[f'torch_{dt}'] / g,
             f'glm_tokens_per_s_{dt}': tokens.size / g,
             f'glm_fraction_of_fp32_ceiling_{dt}': flops / g / ceiling}
  rows |= {'glm_bf16_over_fp32': med['glm_fp32'] / med['glm_bf16'],
           'torch_bf16_over_fp32': med['torch_fp32'] / med['torch_bf16'],
           'fp32_ceiling_flops_per_s': ceiling,
           'first_step_losses': {k: v for k, v in first.items()
                                 if not k.endswith('_s')},
           'first_step_s': {k: v for k, v in first.items()
                            if k.endswith('_s')},
           'step_times_s': times}
  return rows


def main() -> None:
  p = report.yardstick_parser(__doc__, 'train_throughput.json')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--steps', type=int, default=3,
                 help='timed steps of each trainer per round')
  p.add_argument('--shapes', default=','.join(SHAPES),
                 help=f'comma-separated subset of {list(SHAPES)}')
  args = p.parse_args()
  out = {'goals': {'glm_over_flax': 1.25, 'glm_over_torch_fp32_hidden768': 1.0,
                   'glm_bf16_over_fp32_hidden768': 1.2,
                   'glm_fraction_of_fp32_ceiling_hidden768': 0.5}}
  for name in args.shapes.split(','):
    out[name] = measure_shape(name, SHAPES[name], args)
    print(f'\n{name} (vocab {args.vocab}, {args.layers} layers, batch '
          f'{args.batch} x {args.seq_len}):')
    report.write(out[name], None)
  out |= {'settings': {k: v for k, v in vars(args).items() if k != 'out'},
          'devices': [str(d) for d in jax.devices()],
          'torch_threads': torch.get_num_threads(),
          'load_average': os.getloadavg()}
  report.write({}, args.out, extra=out)


if __name__ == '__main__':
  main()
