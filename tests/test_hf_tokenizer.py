"""Hugging Face tokenizers: glm's SentencePiece tokenizer written for
`transformers.AutoTokenizer` tokenizes exactly as glm does; a BLOOM
folder's tokenizer.json travels through `glm convert` both ways and is what
score, generate and fine-tuning read text with; tokenizers that do not fit
are refused in one line. Every tokenizer is built here from the local
corpus (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import transformers

from glm import cli
from glm.data import corpus
from glm.data import hf_tokenizer
from glm.data import pipeline
from glm.data.errors import DataError
from glm.model import checkpoint
from test_hf_bloom import make_hf_bloom, read_jsonl, write_jsonl
from train_cli import train_argv


EDGE_TEXTS = ('Hello [gMASK]<sop> world [MASK] x <extra_id_3>',
              '  two  spaces\n\n\ttab 12345 \u00fcn\u00ef \u4e2d\u6587 '
              '\U0001F600', 'a </s> b <pad> <unk> c', '', '\u2581 x')


def _docs(data_dir, split, n=None):
  corpus_dir = os.path.join(data_dir, 'corpus')
  corpus.ensure_corpus(corpus_dir)
  docs = [d['text'] for d in corpus.iter_documents(corpus_dir, split)]
  return docs[:n] if n else docs


def make_bloom_dir(folder, data_dir, *, model_vocab=384, tok_vocab=320):
  """A random HF BLOOM with a byte-level BPE tokenizer (BLOOM's kind)
  trained on the local corpus, saved as transformers saves them."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tk = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(_docs(data_dir, 'train', 200), trainers.BpeTrainer(
      vocab_size=tok_vocab, special_tokens=['<unk>', '<s>', '</s>', '<pad>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, bos_token='<s>', eos_token='</s>',
      pad_token='<pad>', unk_token='<unk>')
  fast.save_pretrained(folder)
  make_hf_bloom(model_vocab, 32, 4, 2, seed=1).save_pretrained(folder)
  return fast


def _convert(*args):
  assert cli.main(['convert', *args]) == 0


def test_glm_tokenizer_for_transformers_tokenizes_alike(tmp_path, data_dir):
  spm = pipeline.open_split(data_dir, 'valid', vocab_size=2048).tok
  make_hf_bloom(2048, 32, 4, 1).save_pretrained(tmp_path / 'hf')
  _convert('hf-to-glm', '--hf_dir', str(tmp_path / 'hf'), '--out',
           str(tmp_path / 'raw'))
  cfg, params = checkpoint.load(str(tmp_path / 'raw'))
  ckpt = str(tmp_path / 'glm')
  checkpoint.save(ckpt, cfg, params, tokenizer_path=spm.model_path)
  _convert('glm-to-hf', '--checkpoint', ckpt, '--out', str(tmp_path / 'out'))
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  for text in _docs(data_dir, 'valid') + list(EDGE_TEXTS):
    ids = hf(text, add_special_tokens=False)['input_ids']
    assert ids == spm.encode(text), text[:80]
    assert hf.decode(ids) == spm.decode(ids)
    assert '\u2581' in text or spm.decode(ids) == text   # '▁' reads ' '

  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert (config['eos_token_id'], config['pad_token_id']) == (spm.eos_id,
                                                              spm.pad_id)
  assert (hf.eos_token_id, hf.pad_token_id) == (spm.eos_id, spm.pad_id)
  assert transformers.BloomForCausalLM.from_pretrained(tmp_path / 'out')


def test_bloom_tokenizer_travels_and_is_used(tmp_path, data_dir, capsys):
  fast = make_bloom_dir(tmp_path / 'hf', data_dir)
  ckpt = str(tmp_path / 'glm')
  _convert('hf-to-glm', '--hf_dir', str(tmp_path / 'hf'), '--out', ckpt)
  assert checkpoint.read_manifest(ckpt)['tokenizer'] == 'tokenizer.json'
  texts = _docs(data_dir, 'valid', 3) + ['The river [MASK] runs.']
  write_jsonl(tmp_path / 'in.jsonl', [{'text': t[:200]} for t in texts])
  assert cli.main(['score', '--checkpoint', ckpt, '--input',
                   str(tmp_path / 'in.jsonl'), '--output',
                   str(tmp_path / 'out.jsonl')]) == 0
  rows = read_jsonl(tmp_path / 'out.jsonl')
  assert [r['tokens'] for r in rows] == [
      fast(t[:200], add_special_tokens=False)['input_ids'] for t in texts]
  capsys.readouterr()
  assert cli.main(['generate', '--checkpoint', ckpt, '--prompt',
                   'The river', '--max_new_tokens', '4']) == 0
  assert capsys.readouterr().out.startswith('The river')
  # No [MASK] in BLOOM's vocabulary: infilling is refused, auto continues.
  assert cli.main(['generate', '--checkpoint', ckpt, '--prompt', 'a',
                   '--mode', 'infill']) == 2
  assert '--mode=infill needs' in capsys.readouterr().err
  _convert('glm-to-hf', '--checkpoint', ckpt, '--out', str(tmp_path / 'back'))
  back = transformers.AutoTokenizer.from_pretrained(tmp_path / 'back')
  config = json.loads((tmp_path / 'back' / 'config.json').read_text())
  assert (config['bos_token_id'], config['eos_token_id'],
          config['pad_token_id']) == (1, 2, 3)
  for t in texts + list(EDGE_TEXTS):
    assert back(t)['input_ids'] == fast(t)['input_ids']
  # The objectives that need GLM's special tokens refuse this tokenizer.
  tok = hf_tokenizer.HFTokenizer(os.path.join(ckpt, 'tokenizer.json'))
  split = pipeline.open_split(data_dir, 'valid', tokenizer=tok)
  with pytest.raises(DataError, match='needs the GLM / UL2 special tokens'):
    pipeline.Pipeline(split, pipeline.DataConfig.for_task(
        'glm_blank_infilling'), seq_len=64)


def test_tokenizer_too_large_for_the_model_is_refused(tmp_path, data_dir,
                                                      capsys):
  make_bloom_dir(tmp_path / 'hf', data_dir, model_vocab=300, tok_vocab=320)
  capsys.readouterr()
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(tmp_path / 'hf'),
                   '--out', str(tmp_path / 'glm')]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and 'has 320 ids but the model only 300' in err[0]
  assert 'the tokenizer the model was trained with' in err[0]
  assert not (tmp_path / 'glm').exists()


def test_finetuning_a_converted_bloom_reads_its_own_tokenizer(tmp_path,
                                                              data_dir):
  fast = make_bloom_dir(tmp_path / 'hf', data_dir)
  ckpt = str(tmp_path / 'glm')
  _convert('hf-to-glm', '--hf_dir', str(tmp_path / 'hf'), '--out', ckpt)
  out = subprocess.run(train_argv(
      'finetune.gin', tmp_path / 'ft', data_dir,
      f"--gin.INIT_CHECKPOINT='{ckpt}'", '--gin.TRAIN_STEPS=2',
      '--gin.CHECKPOINT_EVERY=2', '--gin.SEQ_LEN=128', '--gin.BATCH_SIZE=2'),
      capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  model = tmp_path / 'ft' / 'model'
  assert checkpoint.read_manifest(str(model))['tokenizer'] == 'tokenizer.json'
  streams = os.path.join(data_dir, 'streams')
  train = [f for f in os.listdir(streams) if f.startswith('tokenizer.train')]
  stream = np.load(os.path.join(streams, train[0]))
  want = []
  for doc in _docs(data_dir, 'train'):
    want += fast(doc, add_special_tokens=False)['input_ids'] + [2]
  np.testing.assert_array_equal(stream, want)
  # Converted without its tokenizer: refused before any work.
  os.remove(tmp_path / 'hf' / 'tokenizer.json')
  _convert('hf-to-glm', '--hf_dir', str(tmp_path / 'hf'), '--out',
           str(tmp_path / 'bare'))
  out = subprocess.run(train_argv(
      'finetune.gin', tmp_path / 'ft2', data_dir,
      f"--gin.INIT_CHECKPOINT='{tmp_path / 'bare'}'", '--gin.TRAIN_STEPS=2'),
      capture_output=True, text=True)
  lines = [l for l in out.stderr.splitlines() if 'error' in l]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert 'converted without its tokenizer' in lines[0]
