"""Will a training run fit? Per-device memory of a model on a mesh.

Nothing is allocated: parameter shapes come from `transformer.abstract_params`
and their shardings from `glm.parallel.mesh.param_specs`.

  mc = MeshConfig.parse('tensor=4,pipeline=12,data=8', zero1=True,
                        microbatches=16)
  result = plan(cfg, mc, device_memory='80GB', micro_batch=128, seq_len=2048)
  print(format_plan(result))          # or: glm plan --gin_file ... --mesh ...

Per device (the most loaded one; GB = 1e9 bytes):

  parameters   the weights the step computes with, in `param_dtype` (fp32,
               or bf16 with 16-bit weights), every leaf measured exactly with
               `mesh.per_device_bytes` under its PartitionSpec (a
               dimension that does not split evenly counts its largest shard).
  gradients    in `param_dtype`, sharded like the parameters.
  optimizer    Adam mu and nu, fp32, two per parameter, plus the fp32 master
               weights with 16-bit weights (GLM-130B's scheme), sharded like
               the parameters; with ZeRO-1 also over `data`
               (`mesh.zero1_spec`).
  activations  the estimate below.

Activations. Letters: s sequence length; R = micro_batch / (data * fsdp) rows
of a micro-batch on one data shard; M pipeline microbatches (1 without a
pipeline); b = R / M rows of one pipeline microbatch; h hidden; a heads; d head
dim; f FFN width (per half for GLUs); t tensor; V padded vocabulary; S
pipeline stages, r repeats; C = ceil(num_layers / (S r)) layers in a chunk;
c = compute-dtype bytes / 2.

Bytes one layer keeps for its backward, per pipeline microbatch, generalising
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", Sec. 4: 16-bit activations, tensor parallelism without
sequence parallelism), all times c:

  none            s*b*(10h + (8ad + m)/t) + 5*a*s^2*b/t, m = 4f (GeLU), 6f (GLU)
  dots            s*b*(6h + (8ad + 2gf)/t) + 2*a*s^2*b/t,  g = 1 (GeLU), 2 (GLU)
  dots_no_batch   s*b*(6h + (6ad + 2gf)/t)

`none` is the paper's s*b*h*(10 + 24/t + 5as/(ht)) when ad = h and f = 4h
(BLOOM): 10h for the tensor-replicated tensors (two LayerNorm inputs, the q/k/v
and FFN-in inputs, two dropout masks), 8ad/t for q, k, v and the attention
output, 16h/t for the GeLU input and output, 5as/t for the softmax output, its
dropout mask and output (here fp32 probabilities and no attention dropout, 4;
the paper's 5 is kept). A GLU keeps both halves of its input projection and
their product (6f). `dots` keeps the outputs of the matmuls (q, k, v, QK^T,
AV, attention-out, FFN in and out) and the layer input; `dots_no_batch`
(`dots_with_no_batch_dims_saveable`) drops the two attention products, whose
dot_generals have batch dimensions. `full` keeps only the input of each
rematerialised unit, 2*s*b*h*c: a layer without a pipeline (`nn.remat` on the
block), a whole chunk of C layers with one (`jax.checkpoint` on the stage
body of glm.parallel.pipeline).

The pipeline (glm.parallel.pipeline) is one `lax.scan` over K = M r + S - 1 ticks;
every stage runs its chunk at every tick (bubble ticks included) and autodiff
keeps each tick's residuals until the backward, so a stage holds K chunk
passes (a 1F1B schedule would hold at most S). Without a pipeline K = 1 and
the chunk is the whole stack (C = num_layers). On a device:

  layers     K * C * (bytes one layer keeps); remat `full`: K * (C / unit) *
             2*s*b*h*c, unit = C with a pipeline, else 1
  recompute  with remat: one unit's `none` bytes, rebuilt in its backward
  bias       4 * (a/t with ALiBi, else 1) * s^2 * rows: the fp32 attention
             bias and mask [B, H|1, T, S], once per forward for the micro-batch
             (rows = R) without a pipeline; built per tick inside the stage
             with one, kept for K ticks (rows = K b) without remat, rebuilt
             (rows = b) with it
  head       R * s * (n * 2c*h + 4h) + 4 * V/t * (3 * 512 + h): the stack's
             input and output (n = 2; with a pipeline also its microbatch and
             output buffers, n = 4), the fp32 gradient of the final hidden
             states and of the output matrix that `losses.output_loss` keeps,
             and one chunk of 512 rows of fp32 logits, their exp and their
             gradient (the full [B, T, V] logits are never materialised)

Assumptions (also listed under the table):
  * Activations as above: per layer Korthikanti et al.; a pipeline keeps the
    residuals of all its K ticks.
  * Embedding, final norm and the chunked output loss run outside the
    pipeline on the whole micro-batch, replicated over `pipeline`; the
    embedding table is split by `tensor` (and `fsdp`) only, so every stage
    holds a full share.
  * Uneven layer splits are estimated for the heaviest stage (ceil), with a
    warning: Megatron-style trainers allow them, `glm train` does not.
  * Not counted: XLA temporaries and fragmentation, collective buffers, the
    running gradient sum when a step accumulates several micro-batches (one
    more `gradients`), weight copies kept as residuals (with remat `none`,
    the compute-dtype casts of the layer weights), the input batch, the
    runtime's own reserve.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glm.errors import UserError
from glm.model.config import DTYPES, REMAT_POLICIES, ModelConfig
from glm.model import transformer
from glm.parallel import mesh as mesh_lib
from glm.training import optimizers
from glm.training import state as state_lib
from glm.training import step as step_lib


GB = 1e9


class PlanError(UserError):
  """A plan request that cannot be answered, with the fix."""

_UNITS = {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12,
          'ki': 2 ** 10, 'mi': 2 ** 20, 'gi': 2 ** 30, 'ti': 2 ** 40}
_SIZE = re.compile(r'^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*'
                   r'([kmgt]i?)?(b)?\s*$', re.IGNORECASE)

ASSUMPTIONS = (
    'activations: Korthikanti et al. 2022 per layer (no sequence '
    'parallelism); a pipeline keeps the residuals of all its M*repeats + '
    'pipeline - 1 ticks',
    'embedding and the chunked output loss (512-row fp32 logit chunks) on '
    'the whole micro-batch on every device; embedding table replicated over '
    'pipeline',
    'not counted: XLA temporaries, collective buffers, a second gradient '
    'buffer when accumulating micro-batches, weight copies kept as residuals',
)


def activation_bytes_per_value(dtype: str) -> int:
  """Bytes of one activation under a compute policy. A plan is for the
  accelerators a run will use, where 'auto' means full bf16; 'mixed' keeps
  float32 activations."""
  return {'float32': 4, 'mixed': 4, 'bfloat16': 2, 'auto': 2}[dtype]


def parse_bytes(text: str | float | int) -> int:
  """'80GB', '80G', '80e9' (GB = 1e9), '96GiB' -> bytes."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value, scale = float(text), 1.0
  else:
    m = _SIZE.match(str(text))
    if not m:
      raise PlanError(f'--device_memory {text!r} is not a size; write it as '
                       '80GB, 80G, 80e9 (bytes) or 96GiB.')
    value, scale = float(m.group(1)), _UNITS[(m.group(2) or '').lower()]
    if not m.group(2) and not m.group(3) and 0 < value < 1e6:
      raise PlanError(f'--device_memory {text!r} has no unit and would be '
                       f'{text} bytes; write {text}GB (1e9) or {text}GiB.')
  if not value > 0:
    raise PlanError(f'--device_memory {text!r} must be positive, as in '
                     '80GB.')
  return int(round(value * scale))


def _is_spec(x) -> bool:
  return isinstance(x, P)


def leaf_bytes(cfg: ModelConfig, mc: mesh_lib.MeshConfig
               ) -> dict[str, dict[str, Any]]:
  """Per-device bytes of every parameter leaf ('layers/mlp/wi' -> {...}).

  Each entry: shape, spec (the parameter's), params and grads (bytes in
  cfg.param_dtype), optimizer (Adam mu + nu, fp32, and the fp32 master copy
  with 16-bit weights; ZeRO-1 spec when mc.zero1).
  """
  weight_dtype = np.float32 if cfg.param_dtype == 'float32' else np.float16
  opt_copies = 2 if cfg.param_dtype == 'float32' else 3
  shapes = transformer.abstract_params(cfg)
  specs = mesh_lib.param_specs(transformer.logical_axes(cfg))
  mesh_shape = mc.shape
  out = {}

  def one(path, spec, leaf):
    shape = tuple(leaf.shape)
    p = mesh_lib.per_device_bytes(shape, weight_dtype, spec, mesh_shape)
    opt_spec = (mesh_lib.zero1_spec(spec, shape, mesh_shape) if mc.zero1
                else spec)
    opt = opt_copies * mesh_lib.per_device_bytes(shape, np.float32, opt_spec,
                                                 mesh_shape)
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    out[name] = {'shape': shape, 'spec': spec, 'opt_spec': opt_spec,
                 'size': math.prod(shape), 'params': p, 'grads': p,
                 'optimizer': opt}

  jax.tree_util.tree_map_with_path(one, specs, shapes, is_leaf=_is_spec)
  return out


def layer_activation_bytes(cfg: ModelConfig, *, seq_len: int, rows: int,
                           tensor: int, remat: str, dtype: str) -> float:
  """Bytes one layer keeps for its backward (module docstring's formulas).

  remat 'full' gives the input of a rematerialised unit, 2*s*b*h*c.
  """
  s, b, h, a, t = seq_len, rows, cfg.hidden, cfg.num_heads, tensor
  ad, f = a * cfg.dims_per_head, cfg.mlp_dim
  g = 2 if cfg.is_gated else 1
  c = activation_bytes_per_value(dtype) / 2
  if remat == 'none':
    mlp = 6 * f if cfg.is_gated else 4 * f
    kept = s * b * (10 * h + (8 * ad + mlp) / t) + 5 * a * s * s * b / t
  elif remat == 'dots':
    kept = s * b * (6 * h + (8 * ad + 2 * g * f) / t) + 2 * a * s * s * b / t
  elif remat == 'dots_no_batch':
    kept = s * b * (6 * h + (6 * ad + 2 * g * f) / t)
  else:  # 'full'
    kept = 2 * s * b * h
  return kept * c


def activation_bytes(cfg: ModelConfig, mc: mesh_lib.MeshConfig, *,
                     micro_batch: int, seq_len: int, remat: str,
                     dtype: str) -> dict[str, int]:
  """Per-device activation bytes by part (module docstring's formulas)."""
  pipelined = mc.pipeline > 1
  m = mc.num_microbatches if pipelined else 1
  rows = micro_batch // mc.batch_shards  # R
  b = rows // m
  t, s = mc.tensor, seq_len
  if pipelined:
    ticks = m * mc.repeats + mc.pipeline - 1
    chunk = -(-cfg.num_layers // (mc.pipeline * mc.repeats))
    unit = chunk
  else:
    ticks, chunk, unit = 1, cfg.num_layers, 1
  kw = dict(seq_len=s, rows=b, tensor=t, dtype=dtype)
  full_layer = layer_activation_bytes(cfg, remat='none', **kw)
  kept = layer_activation_bytes(cfg, remat=remat, **kw)
  if remat == 'full':
    layers = ticks * (chunk / unit) * kept
  else:
    layers = ticks * chunk * kept
  if not pipelined:
    bias_rows = rows
  else:
    bias_rows = ticks * b if remat == 'none' else b
  heads = cfg.num_heads / t if cfg.position == 'alibi' else 1
  itemsize = activation_bytes_per_value(dtype)
  act = {
      'layers': layers,
      'recompute': unit * full_layer if remat != 'none' else 0.0,
      'attention_bias': 4.0 * heads * s * s * bias_rows,
      'head': rows * s * ((4 if pipelined else 2) * itemsize * cfg.hidden
                          + 4.0 * cfg.hidden)
              + 4.0 * cfg.padded_vocab_size / t * (3 * 512 + cfg.hidden),
  }
  return {k: int(round(v)) for k, v in act.items()}


def _check_mesh(mc: mesh_lib.MeshConfig, cfg: ModelConfig,
                micro_batch: int) -> list[str]:
  """mesh.validate, except that an uneven layer split is a warning."""
  try:
    mesh_lib.validate(mc, cfg, micro_batch=micro_batch)
    return []
  except mesh_lib.MeshError as e:
    if mc.pipeline == 1:
      raise
    chunks = mc.pipeline * mc.repeats
    padded = -(-cfg.num_layers // chunks) * chunks
    if padded == cfg.num_layers:
      raise
    # Raises any other problem; passes when the split was the only one.
    mesh_lib.validate(mc, cfg.replace(num_layers=padded),
                      micro_batch=micro_batch)
    return [f'{e} Estimated for the heaviest stage, '
            f'{-(-cfg.num_layers // chunks) * mc.repeats} layers, as a '
            'Megatron-style uneven split; glm train needs equal chunks.']


def plan(cfg: ModelConfig, mesh_cfg: mesh_lib.MeshConfig, *,
         device_memory: int | float | str, micro_batch: int | None = None,
         seq_len: int | None = None, remat: str | None = None,
         dtype: str = 'bfloat16') -> dict[str, Any]:
  """Per-device memory of training `cfg` on `mesh_cfg`; see the module doc.

  micro_batch: rows per gradient-accumulation round (default: one row per
    data shard per pipeline microbatch); seq_len default cfg.max_len; remat
    default cfg.remat_policy; dtype: the compute dtype (weights stay fp32).
  Raises PlanError (mesh.MeshError for layouts) with a one-line fix.
  """
  mc = mesh_cfg
  memory = parse_bytes(device_memory)
  seq_len = cfg.max_len if seq_len is None else seq_len
  remat = cfg.remat_policy if remat is None else remat
  pipelined = mc.pipeline > 1
  m = mc.num_microbatches if pipelined else 1
  if micro_batch is None:
    micro_batch = mc.batch_shards * m
  if remat not in REMAT_POLICIES:
    raise PlanError(f'remat={remat!r} is not one of {REMAT_POLICIES}.')
  if dtype not in DTYPES:
    raise PlanError(f'dtype={dtype!r} is not one of {DTYPES}.')
  if not 1 <= seq_len <= cfg.max_len:
    raise PlanError(f'seq_len={seq_len} must be in [1, max_len='
                     f'{cfg.max_len}]; pass a shorter --seq_len or raise '
                     'ModelConfig.max_len.')
  if micro_batch < 1:
    raise PlanError(f'micro_batch={micro_batch} must be >= 1.')
  warnings = _check_mesh(mc, cfg, micro_batch)

  leaves = leaf_bytes(cfg, mc)
  state = {k: sum(v[k] for v in leaves.values())
           for k in ('params', 'grads', 'optimizer')}

  rows = micro_batch // mc.batch_shards
  chunks = mc.pipeline * mc.repeats
  act = activation_bytes(cfg, mc, micro_batch=micro_batch, seq_len=seq_len,
                         remat=remat, dtype=dtype)
  activations = sum(act.values())
  total = sum(state.values()) + activations
  return {
      'params': sum(v['size'] for v in leaves.values()),
      'mesh': mc.describe(),
      'mesh_shape': mc.shape,
      'num_devices': mc.num_devices,
      'zero1': mc.zero1,
      'schedule': mc.schedule if pipelined else None,
      'microbatches': m,
      'ticks': m * mc.repeats + mc.pipeline - 1 if pipelined else 1,
      'micro_batch': micro_batch,
      'rows_per_data_shard': rows,
      'rows_per_microbatch': rows // m,
      'seq_len': seq_len,
      'remat': remat,
      'dtype': dtype,
      'param_dtype': cfg.param_dtype,
      'layers_per_stage': -(-cfg.num_layers // chunks) * mc.repeats,
      'bubble_fraction': mc.bubble_fraction(),
      'bytes': {**state, 'activations': activations, 'total': total},
      'activation_bytes': act,
      'device_memory': memory,
      'fits': total <= memory,
      'margin_bytes': memory - total,
      'warnings': warnings,
      'assumptions': list(ASSUMPTIONS),
  }


def format_plan(r: dict[str, Any]) -> str:
  """The plan as an aligned table with the verdict and its assumptions."""
  gb = lambda n: f'{n / GB:10.2f}'
  w = 'fp32' if r['param_dtype'] == 'float32' else 'bf16'
  opt = ('Adam mu, nu fp32' if w == 'fp32' else
         'fp32 master, mu, nu')
  by, act = r['bytes'], r['activation_bytes']
  rows = lambda n: f'{n} row' + ('s' if n != 1 else '')
  pipe = (f'{r["schedule"]}, {r["microbatches"]} microbatches of '
          f'{rows(r["rows_per_microbatch"])} per data shard, '
          f'{r["ticks"]} ticks, '
          f'{r["layers_per_stage"]} layers per stage, bubble '
          f'{100 * r["bubble_fraction"]:.1f}%' if r['schedule'] else 'none')
  lines = [
      f'model       {r["params"] / 1e9:.2f}B parameters',
      f'mesh        {r["mesh"]} ({r["num_devices"]} devices), ZeRO-1 '
      f'{"on" if r["zero1"] else "off"}',
      f'batch       micro-batch {r["micro_batch"]} x {r["seq_len"]} tokens '
      f'({rows(r["rows_per_data_shard"])} per data shard)',
      f'pipeline    {pipe}',
      f'compute     {r["dtype"]}, remat {r["remat"]}',
      '',
      f'{"per device":<32}{"GB":>10}',
      f'{"  parameters (" + w + ")":<32}{gb(by["params"])}',
      f'{"  gradients (" + w + ")":<32}{gb(by["grads"])}',
      f'{"  optimizer (" + opt + ")":<32}{gb(by["optimizer"])}',
      f'{"  activations":<32}{gb(by["activations"])}',
      f'{"    layer stack (all ticks)":<32}{gb(act["layers"])}',
      f'{"    recompute (one unit)":<32}{gb(act["recompute"])}',
      f'{"    attention bias/mask":<32}{gb(act["attention_bias"])}',
      f'{"    embeddings + logits":<32}{gb(act["head"])}',
      f'{"  total":<32}{gb(by["total"])}',
      f'{"device memory":<32}{gb(r["device_memory"])}',
  ]
  margin = r['margin_bytes'] / GB
  lines.append(f'fits: {margin:.2f} GB to spare' if r['fits'] else
               f'does not fit: {-margin:.2f} GB over')
  lines += [f'warning: {w}' for w in r['warnings']]
  lines += ['assumes:'] + [f'  - {a}' for a in r['assumptions']]
  return '\n'.join(lines)


def lower_train_step(cfg: ModelConfig, mc: mesh_lib.MeshConfig, *,
                     layers: int, micro_batch: int, seq_len: int) -> dict:
  """Lowers the real sharded train step on the production mesh shape.

  The model keeps its widths but gets `layers` layers (a multiple of
  pipeline x repeats), so that tracing stays cheap; nothing is allocated
  (abstract inputs with their shardings) and nothing is compiled. Needs
  mc.num_devices devices: fake them on CPU (`glm plan --lower_layers` sets
  the CPU device count before JAX starts).
  """
  small = cfg.replace(num_layers=layers, scan_layers=True)
  mesh_lib.validate(mc, small, micro_batch=micro_batch,
                    num_devices=jax.device_count())
  mesh = mesh_lib.make_mesh(mc)
  oc = optimizers.OptimizerConfig()
  opt = optimizers.make_optimizer(oc, optimizers.lr_table(
      oc, np.full(10, micro_batch * seq_len)))
  t = time.perf_counter()

  state = state_lib.abstract_state(small, opt)
  shardings = state_lib.state_shardings(state, small, mc, mesh)
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)
  shape = (1, micro_batch, seq_len)
  batch = {'tokens': jnp.int32, 'targets': jnp.int32,
           'loss_mask': jnp.float32}
  batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=jax.sharding
                                   .NamedSharding(mesh, mesh_lib.batch_spec(3)))
           for k, dt in batch.items()}
  step, _ = step_lib.make_train_step(small, opt, mesh_cfg=mc, mesh=mesh)
  lowered = step.lower(state, batch)
  text = lowered.as_text()
  return {'layers': layers, 'devices': mc.num_devices,
          'lower_s': time.perf_counter() - t,
          'collective_permutes': text.count('collective_permute'),
          'all_reduces': text.count('all_reduce'),
          'stablehlo_chars': len(text)}
