"""Hugging Face BLOOM <-> glm parameter conversion.

HF layout (optionally under a `transformer.` prefix; `lm_head` is tied):
  word_embeddings.weight [V, E], word_embeddings_layernorm.{weight,bias},
  h.{i}.input_layernorm, h.{i}.self_attention.query_key_value [3E, E],
  h.{i}.self_attention.dense [E, E], h.{i}.post_attention_layernorm,
  h.{i}.mlp.dense_h_to_4h [F, E], h.{i}.mlp.dense_4h_to_h [E, F], ln_f.
torch Linear weights are [out, in]; glm kernels are [in, ..., out].

The fused query_key_value rows are interleaved per head: output row
r = h*3D + j*D + d with j in (q, k, v), i.e. [3E] = [H, 3, D].
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from glm.errors import UserError
from glm.model.config import ModelConfig
from glm.model import transformer


PREFIX = 'transformer.'


class HFConversionError(UserError):
  """An input that is not a convertible Hugging Face BLOOM model."""


# Reading ----------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise HFConversionError(
        f'{hf_dir!r} has no config.json; pass a Hugging Face BLOOM folder '
        '(config.json plus model.safetensors or pytorch_model.bin).')
  with open(path) as f:
    hf = json.load(f)
  if hf.get('model_type') != 'bloom':
    raise HFConversionError(
        f'{hf_dir!r} holds model_type={hf.get("model_type")!r}, not '
        "'bloom'; only BLOOM checkpoints convert.")
  if hf.get('apply_residual_connection_post_layernorm', False):
    raise HFConversionError(
        'apply_residual_connection_post_layernorm=true is not BLOOM\'s '
        'layout and is not supported; set it to false.')
  return hf


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors or torch .bin checkpoint (maybe sharded)."""
  st_files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
  bin_files = sorted(glob.glob(os.path.join(hf_dir, '*.bin')))
  tensors: dict[str, np.ndarray] = {}
  if st_files:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    for f in st_files:
      with safe_open(f, framework='np') as sf:
        for k in sf.keys():
          tensors[k] = sf.get_tensor(k)
  elif bin_files:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise HFConversionError(
          f'{hf_dir!r} holds torch .bin weights; install torch==2.13.0 '
          "(pip install -e '.[dev]') or convert them to safetensors."
      ) from None
    for f in bin_files:
      sd = torch.load(f, map_location='cpu', weights_only=True)
      for k, v in sd.items():
        tensors[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  else:
    raise HFConversionError(
        f'{hf_dir!r} has no *.safetensors or *.bin weights next to '
        'config.json.')
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def config_from_hf(hf: dict, mlp_dim: int) -> ModelConfig:
  hidden = hf.get('hidden_size', hf.get('n_embed'))
  return ModelConfig(
      vocab_size=hf['vocab_size'], vocab_pad_multiple=128, hidden=hidden,
      num_layers=hf['n_layer'], num_heads=hf['n_head'], mlp_dim=mlp_dim,
      max_len=hf.get('seq_length', 2048), position='alibi',
      norm_layout='pre', norm_type='layernorm',
      norm_eps=hf.get('layer_norm_epsilon', 1e-5), embed_norm=True,
      final_norm=True, mlp_activation='gelu', use_bias=True,
      tie_embeddings=True, init_std=hf.get('initializer_range', 0.02))


def hf_to_glm(hf_dir: str, *, scan_layers: bool = True
              ) -> tuple[ModelConfig, Any, dict]:
  """Reads a BLOOM folder; returns (config, glm params, hf config dict)."""
  hf = read_hf_config(hf_dir)
  sd = read_hf_weights(hf_dir)
  if any(k.startswith(PREFIX) for k in sd):
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v
          for k, v in sd.items()}
  lm_head = sd.pop('lm_head.weight', None)
  if 'word_embeddings.weight' not in sd:
    raise HFConversionError(
        f'{hf_dir!r} has no word_embeddings.weight; found '
        f'{sorted(sd)[:4]}... — is this a BLOOM checkpoint?')
  mlp_dim = sd['h.0.mlp.dense_h_to_4h.weight'].shape[0]
  cfg = config_from_hf(hf, mlp_dim).replace(scan_layers=scan_layers)
  emb = sd['word_embeddings.weight']
  if lm_head is not None and not np.array_equal(lm_head, emb):
    raise HFConversionError('lm_head.weight differs from word_embeddings; '
                            'BLOOM ties them, untied heads are unsupported.')
  e, h, d = cfg.hidden, cfg.num_heads, cfg.dims_per_head

  def ln(name):
    return {'scale': sd[f'{name}.weight'], 'bias': sd[f'{name}.bias']}

  padded = np.zeros((cfg.padded_vocab_size, e), np.float32)
  padded[:cfg.vocab_size] = emb
  params: dict[str, Any] = {'embed': {'embedding': padded},
                            'embed_norm': ln('word_embeddings_layernorm'),
                            'final_norm': ln('ln_f')}
  for i in range(cfg.num_layers):
    p = f'h.{i}.'
    qkv_w = sd[p + 'self_attention.query_key_value.weight']  # [H*3*D, E]
    qkv_b = sd[p + 'self_attention.query_key_value.bias']    # [H*3*D]
    qkv_w = qkv_w.reshape(h, 3, d, e).transpose(1, 3, 0, 2)   # [3, E, H, D]
    qkv_b = qkv_b.reshape(h, 3, d).transpose(1, 0, 2)         # [3, H, D]
    dense_w = sd[p + 'self_attention.dense.weight']           # [E, H*D]
    attention = {
        'query': qkv_w[0], 'key': qkv_w[1], 'value': qkv_w[2],
        'query_bias': qkv_b[0], 'key_bias': qkv_b[1], 'value_bias': qkv_b[2],
        'out': dense_w.T.reshape(h, d, e),
        'out_bias': sd[p + 'self_attention.dense.bias'],
    }
    mlp = {
        'wi': sd[p + 'mlp.dense_h_to_4h.weight'].T,   # [E, F]
        'wi_bias': sd[p + 'mlp.dense_h_to_4h.bias'],
        'wo': sd[p + 'mlp.dense_4h_to_h.weight'].T,   # [F, E]
        'wo_bias': sd[p + 'mlp.dense_4h_to_h.bias'],
    }
    params[f'layers_{i}'] = {
        'input_norm': ln(p + 'input_layernorm'),
        'post_attention_norm': ln(p + 'post_attention_layernorm'),
        'attention': attention, 'mlp': mlp}
  params = _contiguous(params)
  if scan_layers:
    params = transformer.stack_layers(params, cfg.num_layers)
  return cfg, params, hf


def _contiguous(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, np.float32)


# Writing ----------------------------------------------------------------------

def check_bloom_compatible(cfg: ModelConfig) -> None:
  """Raises unless the config is expressible as an HF BLOOM model."""
  want = dict(position='alibi', norm_layout='pre', norm_type='layernorm',
              embed_norm=True, final_norm=True, mlp_activation='gelu',
              use_bias=True, tie_embeddings=True)
  for name, value in want.items():
    if getattr(cfg, name) != value:
      raise HFConversionError(
          f'ModelConfig.{name}={getattr(cfg, name)!r} has no HF BLOOM '
          f'equivalent (BLOOM needs {value!r}); only BLOOM-style models '
          'convert to HF.')
  if cfg.quant_bits:
    raise HFConversionError(
        f'the checkpoint is INT{cfg.quant_bits} (glm quantize); convert its '
        'float source, which HF BLOOM can hold.')
  if cfg.head_dim and cfg.head_dim * cfg.num_heads != cfg.hidden:
    raise HFConversionError(
        f'head_dim={cfg.head_dim} x num_heads={cfg.num_heads} != hidden='
        f'{cfg.hidden}; HF BLOOM needs head_dim = hidden / num_heads.')


def glm_to_hf(cfg: ModelConfig, params: Any, hf_extra: dict | None = None
              ) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (HF config dict, BloomForCausalLM state dict as numpy)."""
  check_bloom_compatible(cfg)
  if 'layers' in params:
    params = transformer.unstack_layers(params, cfg.num_layers)
  e, h, d = cfg.hidden, cfg.num_heads, cfg.dims_per_head
  sd: dict[str, np.ndarray] = {}

  def put(name, value):
    sd[PREFIX + name] = np.ascontiguousarray(np.asarray(value, np.float32))

  def put_ln(name, p):
    put(f'{name}.weight', p['scale'])
    put(f'{name}.bias', p['bias'])

  put('word_embeddings.weight',
      np.asarray(params['embed']['embedding'])[:cfg.vocab_size])
  put_ln('word_embeddings_layernorm', params['embed_norm'])
  for i in range(cfg.num_layers):
    lp = params[f'layers_{i}']
    a, m = lp['attention'], lp['mlp']
    p = f'h.{i}.'
    put_ln(p + 'input_layernorm', lp['input_norm'])
    put_ln(p + 'post_attention_layernorm', lp['post_attention_norm'])
    qkv_w = np.stack([np.asarray(a[n]) for n in ('query', 'key', 'value')])
    qkv_b = np.stack([np.asarray(a[f'{n}_bias'])
                      for n in ('query', 'key', 'value')])
    # [3, E, H, D] -> [H, 3, D, E] -> [H*3*D, E]
    put(p + 'self_attention.query_key_value.weight',
        qkv_w.transpose(2, 0, 3, 1).reshape(3 * h * d, e))
    put(p + 'self_attention.query_key_value.bias',
        qkv_b.transpose(1, 0, 2).reshape(3 * h * d))
    put(p + 'self_attention.dense.weight',
        np.asarray(a['out']).reshape(h * d, e).T)
    put(p + 'self_attention.dense.bias', a['out_bias'])
    put(p + 'mlp.dense_h_to_4h.weight', np.asarray(m['wi']).T)
    put(p + 'mlp.dense_h_to_4h.bias', m['wi_bias'])
    put(p + 'mlp.dense_4h_to_h.weight', np.asarray(m['wo']).T)
    put(p + 'mlp.dense_4h_to_h.bias', m['wo_bias'])
  put_ln('ln_f', params['final_norm'])

  hf = dict(hf_extra or {})
  hf.update({
      'architectures': ['BloomForCausalLM'],
      'model_type': 'bloom',
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden,
      'n_layer': cfg.num_layers,
      'n_head': cfg.num_heads,
      'layer_norm_epsilon': cfg.norm_eps,
      'initializer_range': cfg.init_std,
      'apply_residual_connection_post_layernorm': False,
      'hidden_dropout': hf.get('hidden_dropout', 0.0),
      'attention_dropout': hf.get('attention_dropout', 0.0),
      'pretraining_tp': 1,
      'slow_but_exact': False,
      'seq_length': cfg.max_len,
      'torch_dtype': 'float32',
      'tie_word_embeddings': True,
  })
  return hf, sd


def write_hf_dir(out_dir: str, hf_config: dict,
                 state_dict: dict[str, np.ndarray]) -> None:
  """Writes config.json + model.safetensors into an (empty) folder."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  save_file(state_dict, os.path.join(out_dir, 'model.safetensors'),
            metadata={'format': 'pt'})
