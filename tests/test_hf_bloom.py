"""Hugging Face BLOOM interop: log-prob parity of `glm score` with
transformers (torch, fp32) and an exact glm-to-hf round trip.

The HF models are randomly initialised here and saved locally; their weights
are then perturbed well beyond BLOOM's 0.02 init so that a wiring mistake
(a transposed kernel, a mis-interleaved qkv, a wrong ALiBi slope) cannot hide
in a near-uniform softmax.
"""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from glm import cli
from glm.model import checkpoint

from tolerances import assert_close_at_scale, scale_of  # tests/tolerances.py


# (vocab, hidden, heads, layers): non-power-of-two head counts (6, 12, 5) and
# vocabularies that are not multiples of 128.
SHAPES = [(1000, 48, 6, 2), (300, 64, 4, 3), (777, 120, 12, 2),
          (130, 40, 5, 1)]


def make_hf_bloom(vocab, hidden, heads, layers, seed=0):
  torch.manual_seed(seed)
  config = transformers.BloomConfig(vocab_size=vocab, hidden_size=hidden,
                                    n_head=heads, n_layer=layers)
  model = transformers.BloomForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  return model


def hf_logprobs(model, tokens):
  with torch.no_grad():
    logits = model(torch.tensor([tokens])).logits[0].double()
  lp = torch.log_softmax(logits, -1)[:-1]
  return lp.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def hf_greedy(model, ids, new, **kw):
  """transformers' greedy `generate` from [B, P] ids: the new tokens of
  each row, cut before eos, and the smallest top-1 minus top-2 logit gap
  over every choice on that path (through the eos that ended a row). A gap
  far above float32 noise (~1e-5 between two implementations) means another
  correct implementation picks the same tokens on any CPU."""
  with torch.no_grad():
    res = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False,
                         pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True, **kw)
  eos = model.config.eos_token_id
  top2 = torch.stack(res.scores, 1).topk(2, -1).values.numpy()  # [B, N, 2]
  rows, gap = [], np.inf
  for r, row in enumerate(res.sequences[:, ids.shape[1]:].tolist()):
    n = row.index(eos) + 1 if eos in row else len(row)
    gap = min(gap, float((top2[r, :n, 0] - top2[r, :n, 1]).min()))
    rows.append(row[:n - 1] if eos in row else row)
  return rows, gap


def write_jsonl(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


@pytest.mark.parametrize('shape', SHAPES, ids=[str(s) for s in SHAPES])
def test_score_matches_transformers(tmp_path, shape):
  vocab = shape[0]
  model = make_hf_bloom(*shape)
  hf_dir = tmp_path / 'hf'
  model.save_pretrained(hf_dir)
  ckpt = tmp_path / 'glm'
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(hf_dir),
                   '--out', str(ckpt)]) == 0
  rng = np.random.RandomState(1)
  seqs = [rng.randint(0, vocab, n).tolist() for n in (1, 2, 17, 33, 9)]
  write_jsonl(tmp_path / 'in.jsonl', [{'tokens': s} for s in seqs])
  assert cli.main(['score', '--checkpoint', str(ckpt), '--input',
                   str(tmp_path / 'in.jsonl'), '--output',
                   str(tmp_path / 'out.jsonl'), '--batch_size', '2']) == 0
  rows = read_jsonl(tmp_path / 'out.jsonl')
  assert [r['tokens'] for r in rows] == seqs
  # The reference is transformers in float64 (its float32 kernels differ
  # between CPUs, as glm's do): glm's float32 log-probs are within 1e-5 of
  # their own scale of it (measured ~2e-5 on log-probs up to ~20).
  model64 = copy.deepcopy(model).double()
  for seq, row in zip(seqs, rows):
    assert len(row['logprobs']) == len(seq) and row['logprobs'][0] is None
    if len(seq) > 1:
      ref = hf_logprobs(model64, seq)
      got = np.asarray(row['logprobs'][1:], np.float64)
      assert_close_at_scale(got, ref, 1e-5, scale=max(1.0, scale_of(ref)))
      if len(seq) > 8:  # peaked distributions, not near-uniform ones
        assert np.ptp(ref) > 1.0


def _state_dict(hf_dir):
  m = transformers.BloomForCausalLM.from_pretrained(hf_dir)
  return {k: v.detach().numpy() for k, v in m.state_dict().items()}


@pytest.mark.parametrize('variant', ['safetensors', 'bin', 'no_prefix'])
def test_round_trip_is_exact(tmp_path, variant):
  model = make_hf_bloom(777, 120, 12, 2, seed=3)
  src = tmp_path / 'src'
  if variant == 'safetensors':
    model.save_pretrained(src)
  elif variant == 'bin':
    model.save_pretrained(src, safe_serialization=False)
    assert any(f.endswith('.bin') for f in os.listdir(src))
  else:  # a bare BloomModel: names without the `transformer.` prefix
    model.transformer.save_pretrained(src)
  ckpt, back = tmp_path / 'glm', tmp_path / 'back'
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(src),
                   '--out', str(ckpt)]) == 0
  assert cli.main(['convert', 'glm-to-hf', '--checkpoint', str(ckpt),
                   '--out', str(back)]) == 0
  original = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  restored = _state_dict(back)
  assert set(original) == set(restored)
  for k in original:
    assert np.array_equal(original[k], restored[k]), k


def test_checkpoint_is_self_describing(tmp_path):
  model = make_hf_bloom(300, 64, 4, 3)
  model.save_pretrained(tmp_path / 'hf')
  ckpt = tmp_path / 'glm'
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(tmp_path / 'hf'),
                   '--out', str(ckpt)]) == 0
  cfg, params = checkpoint.load(str(ckpt))
  assert (cfg.vocab_size, cfg.hidden, cfg.num_heads, cfg.num_layers) == (
      300, 64, 4, 3)
  assert cfg.padded_vocab_size == 384
  emb = np.asarray(params['embed']['embedding'])
  assert emb.shape == (384, 64) and not emb[300:].any()


def _run_cli(*args, cwd=None):
  return subprocess.run([sys.executable, '-m', 'glm', *args],
                        capture_output=True, text=True, cwd=cwd)


def _error_line(out):
  lines = [l for l in out.stderr.splitlines() if l.startswith('glm ')]
  assert out.returncode == 2 and len(lines) == 1, out.stderr
  return lines[0]


def test_convert_rejects_non_bloom_and_missing_config(tmp_path):
  (tmp_path / 'empty').mkdir()
  err = _error_line(_run_cli('convert', 'hf-to-glm', '--hf_dir',
                             str(tmp_path / 'empty'), '--out',
                             str(tmp_path / 'o1')))
  assert 'no config.json' in err
  gpt = tmp_path / 'gpt2'
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt)
  err = _error_line(_run_cli('convert', 'hf-to-glm', '--hf_dir', str(gpt),
                             '--out', str(tmp_path / 'o2')))
  assert "model_type='gpt2'" in err
  assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()


def test_score_bad_inputs_leave_no_output(tmp_path):
  model = make_hf_bloom(130, 40, 5, 1)
  model.save_pretrained(tmp_path / 'hf')
  ckpt = tmp_path / 'glm'
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(tmp_path / 'hf'),
                   '--out', str(ckpt)]) == 0
  cases = {
      'vocab': ([{'tokens': [1, 2, 130]}], 'token id 130 is outside the vocab'),
      'long': ([{'tokens': [1] * 2049}], 'longer than the model allows'),
      'text': ([{'text': 'hello'}], 'has no tokenizer'),
      'shape': ([{'tokens': 'abc'}], 'list of integer ids'),
  }
  for name, (rows, expect) in cases.items():
    inp, out = tmp_path / f'{name}.jsonl', tmp_path / f'{name}.out.jsonl'
    write_jsonl(inp, [{'tokens': [1, 2, 3]}] + rows)
    err = _error_line(_run_cli('score', '--checkpoint', str(ckpt), '--input',
                               str(inp), '--output', str(out)))
    assert expect in err and ':2:' in err, err
    assert not out.exists()
  leftovers = [f for f in os.listdir(tmp_path) if f.startswith('.')]
  assert not leftovers
