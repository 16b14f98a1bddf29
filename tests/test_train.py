"""The walking skeleton end to end: `glm train` on the machine-built corpus,
then `glm score` on the model folder it writes; and its bad-input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, 'configs', 'runs', 'default.gin')
SMALL = ['--gin.BATCH_SIZE=2', '--gin.SEQ_LEN=32', '--gin.CHECKPOINT_EVERY=2',
         '--gin.ModelConfig.num_layers=1', '--gin.ModelConfig.hidden=48',
         '--gin.ModelConfig.mlp_dim=96', '--gin.ModelConfig.vocab_size=2048',
         '--gin.train.tokenizer_vocab_size=2048', '--gin.train.log_every=1',
         '--gin.train.eval_batches=2', '--gin.train.sample_tokens=4']


def glm(*args):
  return subprocess.run([sys.executable, '-m', 'glm', *args],
                        capture_output=True, text=True, cwd=ROOT)


def test_train_resume_and_score(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  # GLM blank infilling at rate 0: evaluated (task/...), never trained on.
  common = ['train', '--gin_file', RUN, '--workdir', str(workdir),
            f"--gin.train.data_dir='{data_dir}'", *SMALL,
            "--gin.DataConfig.mixture=(('causal_lm', 1.0), "
            "('glm_blank_infilling', 0.0))"]
  # Held-out loss also at 2x and 4x the training length: ALiBi needs no
  # position table, so 4 * 32 tokens evaluate past max_len=64.
  out = glm(*common, '--gin.TRAIN_STEPS=4', '--gin.ModelConfig.max_len=64',
            '--gin.train.eval_lengths=(2, 4)')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'held-out loss' in out.stdout and 'greedy sample' in out.stdout
  assert 'held-out loss at longer lengths: 2x ' in out.stdout
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in rows)
  operative = (workdir / 'config.gin').read_text()
  assert 'TRAIN_STEPS = 4' in operative and 'ModelConfig.hidden = 48' in operative
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  final = json.loads((workdir / 'final.json').read_text())
  assert np.isfinite(final['eval_loss'])
  last = [json.loads(l) for l in open(workdir / 'eval.jsonl')][-1]
  for k in ('len_2x', 'len_4x'):
    # About ln(vocab) after 4 steps, and not the 1x loss copied.
    assert 3 < last[k] < 9 and last[k] != last['all'], last
    assert final[k] == last[k]
  for k in ('all', 'task/causal_lm', 'task/glm_blank_infilling'):
    assert np.isfinite(last[k]) and 0 <= last[f'acc/{k}'] <= 1, last
  assert last['task/glm_blank_infilling'] != last['task/causal_lm']

  # More steps is a new setting: accepted when asked, from the step-4
  # checkpoint.
  out = glm(*common, '--gin.TRAIN_STEPS=6', '--gin.ModelConfig.max_len=64',
            '--accept_new_settings')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed from step 4' in out.stdout
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]

  # The exported model folder scores text with its own tokenizer.
  inp, res = tmp_path / 'in.jsonl', tmp_path / 'out.jsonl'
  inp.write_text(json.dumps({'text': 'The command prints text.'}) + '\n'
                 + json.dumps({'tokens': [5, 6, 7]}) + '\n')
  out = glm('score', '--checkpoint', str(workdir / 'model'), '--input',
            str(inp), '--output', str(res))
  assert out.returncode == 0, out.stderr[-3000:]
  scored = [json.loads(l) for l in open(res)]
  assert scored[1]['tokens'] == [5, 6, 7]
  for row in scored:
    assert row['logprobs'][0] is None
    assert all(lp < 0 for lp in row['logprobs'][1:])


@pytest.mark.parametrize('args,expect', [
    (['--gin.SEQ_LEN=1024'], 'SEQ_LEN=1024 is longer than the model allows'),
    (['--gin.train.bogus=1'], "train has no parameter 'bogus'"),
    (['--gin.ModelConfig.vocab_size=1024'], 'tokenizer vocab 2048 is larger'),
    (['--gin.TRAIN_STEPS=0'], 'train_steps=0 must be a positive integer'),
    (["--gin.ModelConfig.position='learned'", '--gin.ModelConfig.max_len=64',
      '--gin.train.eval_lengths=(4,)'],
     'eval_lengths 4x needs 128 positions but learned positions stop at '
     'ModelConfig.max_len=64'),
])
def test_train_bad_input(tmp_path, data_dir, args, expect):
  workdir = tmp_path / 'w'
  out = glm('train', '--gin_file', RUN, '--workdir', str(workdir),
            f"--gin.train.data_dir='{data_dir}'", *SMALL, *args)
  lines = [l for l in out.stderr.splitlines() if l.startswith('glm train')]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert expect in lines[0]
  assert not workdir.exists()


@pytest.mark.parametrize('run', ['tiny_glm.gin', 'tiny_ul2.gin'])
def test_objective_runs_train(tmp_path, data_dir, run):
  """The GLM and UL2 recipes train a few steps on their objectives."""
  workdir = tmp_path / 'w'
  out = glm('train', '--gin_file', os.path.join(ROOT, 'configs', 'runs', run),
            '--workdir', str(workdir), f"--gin.train.data_dir='{data_dir}'",
            *SMALL, '--gin.TRAIN_STEPS=3', '--gin.SEQ_LEN=64',
            '--gin.ModelConfig.num_heads=4')
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) for r in rows)
  mixture = 'glm_blank_infilling' if 'glm' in run else 'ul2_mixture'
  assert mixture in out.stdout
  # A GLM run's end-of-run samples fill a [gMASK] after the prompt.
  filled = 'greedy sample ([gMASK] filled):' in out.stdout
  assert filled == ('glm' in run), out.stdout[-1000:]
