"""`glm quantize`: a float checkpoint -> an INT8 / INT4 weight-only one.

The scheme is `glm.model.quant`'s (GLM-130B's: symmetric absmax per output
channel of the four block matrices, float32 scales, INT4 two per byte). The
output is an ordinary model folder whose config has `quant_bits` 8 or 4, so
`glm score`, `glm generate` and `checkpoint.load` read it as they read any
other; its manifest's meta records the scheme, the source checkpoint and
the weight bytes. The tokenizer travels with it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from flax import traverse_util

from glm.errors import UserError
from glm.model import checkpoint
from glm.model import quant
from glm.model import transformer
from glm.model.config import ConfigError, ModelConfig

SCHEME = ('symmetric absmax per output channel (scale = max|w| / 127 or / 7, '
          'float32), round half to even; q, k, v, attention output, MLP in '
          'and out of every block; INT4 packed two per byte along the last '
          'input dim (low nibble first)')


def _kernel_name(path: tuple[str, ...]) -> str | None:
  return path[-1] if path[-1] in quant.CONTRACT else None


def quantize_params(cfg: ModelConfig, params: Any, bits: int, *,
                    matmul: str = 'xla') -> tuple[ModelConfig, Any]:
  """(float cfg, params) -> (quantised cfg, params): the kernels of
  `quant.CONTRACT` become int8 values + float32 scales, all else is
  copied."""
  if cfg.quant_bits:
    raise UserError(f'the checkpoint is already INT{cfg.quant_bits}; '
                    'quantise its float source instead.')
  qcfg = cfg.replace(quant_bits=bits,       # checks INT4's even dims
                     quant_matmul_impl=matmul)
  flat = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(transformer.abstract_params(qcfg))
  out = {}
  for path, spec in want.items():
    name = _kernel_name(path)
    if name is None or spec.dtype != np.int8:
      if path[-1].endswith('_scale') and path[-1][:-6] in quant.CONTRACT:
        continue                                  # written with its kernel
      out[path] = np.asarray(flat[path])
      continue
    w = np.asarray(flat[path], np.float32)
    lead = w.ndim - len(_unstacked_shape(cfg, name))  # the layer axis
    rows = [quant.quantize(x, bits, quant.CONTRACT[name])
            for x in w.reshape((-1,) + w.shape[lead:])]
    q = np.stack([r[0] for r in rows]).reshape(w.shape[:lead]
                                               + rows[0][0].shape)
    scale = np.stack([r[1] for r in rows]).reshape(w.shape[:lead]
                                                   + rows[0][1].shape)
    out[path] = q
    out[path[:-1] + (f'{name}_scale',)] = scale
  return qcfg, traverse_util.unflatten_dict(out)


def _unstacked_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
  e, h, d, f = cfg.hidden, cfg.num_heads, cfg.dims_per_head, cfg.mlp_dim
  return {'query': (e, h, d), 'key': (e, h, d), 'value': (e, h, d),
          'out': (h, d, e), 'wi': (e, 2, f) if cfg.is_gated else (e, f),
          'wo': (f, e)}[name]


def weight_bytes(params: Any, *, bf16: bool = False) -> int:
  """Bytes of the quantised kernels (values and scales), or of the same
  kernels in bfloat16 (`bf16`, for a float checkpoint)."""
  total = 0
  for path, a in traverse_util.flatten_dict(params).items():
    stem = path[-1][:-6] if path[-1].endswith('_scale') else path[-1]
    if stem in quant.CONTRACT:
      a = np.asarray(a)
      total += a.size * 2 if bf16 else a.nbytes
  return total


def run(checkpoint_dir: str, *, bits: int, out: str,
        matmul: str = 'xla') -> dict:
  """The `glm quantize` command; returns the manifest's meta."""
  if bits not in (4, 8):
    raise UserError(f'--bits={bits} must be 8 or 4.')
  if os.path.exists(out):
    raise UserError(f'--out {out!r} exists; give a new folder (a quantised '
                    'checkpoint is never written over another).')
  cfg, params = checkpoint.load(checkpoint_dir)
  try:
    qcfg, qparams = quantize_params(cfg, params, bits, matmul=matmul)
  except ConfigError as e:
    raise UserError(str(e)) from None
  source = checkpoint.read_manifest(checkpoint_dir)['meta']
  meta = {**source, 'quantization': {
      'bits': bits, 'scheme': SCHEME, 'source': os.path.abspath(
          checkpoint_dir),
      'kernel_bytes': weight_bytes(qparams),
      'kernel_bytes_bf16': weight_bytes(params, bf16=True)}}
  checkpoint.save(out, qcfg, qparams,
                  tokenizer_path=checkpoint.tokenizer_path(checkpoint_dir),
                  meta=meta)
  q = meta['quantization']
  print(f'INT{bits}: block kernels {q["kernel_bytes"] / 2**20:.2f} MiB '
        f'({q["kernel_bytes"] / q["kernel_bytes_bf16"]:.3f}x bf16) -> {out}',
        file=sys.stderr)
  return meta
