"""Running `glm` as a user does, for the trainer tests: a subprocess on the
tiny model every trainer test uses."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, 'configs', 'runs')
MODELS = os.path.join(ROOT, 'configs', 'models')
TINY = ['--gin.BATCH_SIZE=4', '--gin.SEQ_LEN=32',
        '--gin.ModelConfig.num_layers=2', '--gin.ModelConfig.hidden=32',
        '--gin.ModelConfig.num_heads=4', '--gin.ModelConfig.mlp_dim=64',
        '--gin.ModelConfig.vocab_size=2048',
        '--gin.train.tokenizer_vocab_size=2048', '--gin.LOG_EVERY=1',
        '--gin.EVAL_EVERY=0', '--gin.train.eval_batches=1',
        '--gin.train.sample_tokens=2', '--gin.train.peak_flops=1e11']


def train_argv(run: str, workdir, data_dir, *extra) -> list[str]:
  """`glm train` on configs/runs/<run> and the tiny model; `extra` last."""
  return [sys.executable, '-m', 'glm', 'train', '--gin_file',
          os.path.join(RUNS, run), '--workdir', str(workdir),
          f"--gin.train.data_dir='{data_dir}'", *TINY, *extra]


def glm(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'glm', *args],
                        capture_output=True, text=True, cwd=ROOT)


def train(workdir, data_dir, *extra, run: str = 'default.gin'
          ) -> subprocess.CompletedProcess:
  return subprocess.run(train_argv(run, workdir, data_dir, *extra),
                        capture_output=True, text=True, cwd=ROOT)
