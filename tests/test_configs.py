"""Every shipped gin file parses; parameter counts match the published sizes."""

import glob
import json
import os
import re
import subprocess
import sys

import gin
import pytest

from glm import gin_config
from glm.model.config import ModelConfig
from glm.model import info as model_info


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.gin'),
                             recursive=True))


def _model_config(gin_file, *bindings):
  gin_config.parse([gin_file], list(bindings))
  try:
    return ModelConfig()
  finally:
    gin.clear_config()


def test_there_are_configs():
  names = {os.path.relpath(f, ROOT) for f in GIN_FILES}
  for size in ('bloom_560m', 'bloom_1b1', 'bloom_1b7', 'bloom_3b', 'bloom_7b1',
               'bloom_176b', 'glm_130b', 'tiny_bloom', 'tiny_glm', 'tiny_ul2'):
    assert f'configs/models/{size}.gin' in names
  assert 'configs/runs/default.gin' in names


@pytest.mark.parametrize('gin_file', GIN_FILES,
                         ids=[os.path.relpath(f, ROOT) for f in GIN_FILES])
def test_every_gin_file_parses(gin_file):
  # Run files may list REQUIRED macros (finetune.gin: INIT_CHECKPOINT).
  required = re.findall(r'^(\w+) = %gin.REQUIRED', open(gin_file).read(),
                        re.MULTILINE)
  gin_config.parse([gin_file], [f"{m} = 'placeholder'" for m in required])
  try:
    cfg = ModelConfig()
    assert cfg.num_layers >= 1
  finally:
    gin.clear_config()


def _count(name):
  return model_info.count_params(
      _model_config(os.path.join(ROOT, 'configs', 'models', f'{name}.gin')))


def test_bloom_560m_count():
  assert _count('bloom_560m')['params'] == 559_214_592


def test_bloom_176b_count():
  assert _count('bloom_176b')['params'] == 176_247_271_424


def bloom_formula(layers, h, vocab=250_880):
  # embedding + embedding LN + per layer (qkv, dense, h->4h, 4h->h with
  # biases, two LNs) + final LN
  per_layer = (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (
      4 * h * h + h) + 4 * h
  return vocab * h + 2 * h + layers * per_layer + 2 * h


@pytest.mark.parametrize('name,layers,hidden', [
    ('bloom_1b1', 24, 1536), ('bloom_1b7', 24, 2048), ('bloom_3b', 30, 2560),
    ('bloom_7b1', 30, 4096)])
def test_bloom_sizes_follow_the_published_shapes(name, layers, hidden):
  assert _count(name)['params'] == bloom_formula(layers, hidden)


def test_glm_130b_count_from_published_shapes():
  # 70 layers, hidden 12288, GeGLU inner 32768 (h -> 2 x 32768 -> h), fused
  # qkv with bias, dense with bias, two LNs per layer, final LN, tied
  # embedding 150528 x 12288 (THUDM GLM-130B configs/model_glm_130b.sh).
  h, f, v, n = 12288, 32768, 150528, 70
  per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * 2 * f + 2 * f) + (
      f * h + h) + 2 * (2 * h)
  expected = v * h + n * per_layer + 2 * h
  counts = _count('glm_130b')
  assert counts['params'] == expected == 128_697_794_560
  assert counts['non_embedding_params'] == expected - v * h


def test_flops_per_token_formula():
  cfg = _model_config(os.path.join(ROOT, 'configs', 'models', 'tiny_bloom.gin'))
  info = model_info.info(cfg, seq_len=128)
  n = info['non_embedding_params']
  attn = 4 * cfg.num_layers * cfg.hidden * 128
  assert info['flops_per_token'] == 3 * (2 * (n + cfg.hidden * 4096) + attn)


def test_info_cli_prints_one_json_line():
  out = subprocess.run(
      [sys.executable, '-m', 'glm', 'info', '--gin_file',
       os.path.join(ROOT, 'configs', 'models', 'bloom_560m.gin'),
       '--gin.ModelConfig.num_layers=2'],
      capture_output=True, text=True, check=True, cwd=ROOT)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  info = json.loads(lines[0])
  assert info['params'] == bloom_formula(2, 1024)
  assert {'params', 'non_embedding_params', 'flops_per_token'} <= set(info)


@pytest.mark.parametrize('binding,expect', [
    ('ModelConfig.hiden=3', "ModelConfig has no parameter 'hiden'"),
    ('Nope.x=3', "unknown gin configurable 'Nope'"),
    ("ModelConfig.position='sinusoid'", "position='sinusoid' is not one of"),
])
def test_bad_bindings_are_one_line_errors(binding, expect):
  out = subprocess.run(
      [sys.executable, '-m', 'glm', 'info', '--gin_file',
       os.path.join(ROOT, 'configs', 'models', 'tiny_bloom.gin'),
       f'--gin.{binding}'], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 2
  err = [l for l in out.stderr.splitlines() if l.startswith('glm ')]
  assert len(err) == 1 and expect in err[0], out.stderr


def test_unset_required_macro_is_named(tmp_path):
  run_file = tmp_path / 'run.gin'
  run_file.write_text(
      "include 'models/tiny_bloom.gin'\n"
      'TRAIN_STEPS = %gin.REQUIRED\n'
      'train.train_steps = %TRAIN_STEPS\n')
  with pytest.raises(gin_config.GinError,
                     match='required macro TRAIN_STEPS is not set'):
    gin_config.parse([str(run_file)], [])
  gin.clear_config()
