"""`glm generate` as a user runs it: a converted Hugging Face BLOOM decoded
from token ids (the tokens of transformers' `generate`), a trained glm
checkpoint with its tokenizer (text in, text out, --prompt), pass-through
fields, and one-line errors that leave no output."""

import json

import numpy as np
import torch

from glm import cli
from test_hf_bloom import hf_greedy, make_hf_bloom, read_jsonl, write_jsonl
from train_cli import glm, train  # tests/train_cli.py


def _hf_greedy(model, prompts, new):
  out = []
  for prompt in prompts:
    row, gap = hf_greedy(model, torch.tensor([prompt]), new)
    assert gap > 2e-4, gap   # decisive choices: equal tokens on any CPU
    out += row
  return out


def test_generate_from_a_converted_bloom(tmp_path):
  model = make_hf_bloom(300, 64, 4, 2, seed=5)
  model.save_pretrained(tmp_path / 'hf')
  ckpt = str(tmp_path / 'glm')
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(tmp_path / 'hf'),
                   '--out', ckpt]) == 0
  rng = np.random.RandomState(2)
  prompts = [rng.randint(3, 300, n).tolist() for n in (5, 1, 12, 3, 8)]
  write_jsonl(tmp_path / 'in.jsonl',
              [{'tokens': p, 'id': i} for i, p in enumerate(prompts)])
  assert cli.main(['generate', '--checkpoint', ckpt, '--input',
                   str(tmp_path / 'in.jsonl'), '--output',
                   str(tmp_path / 'out.jsonl'), '--max_new_tokens', '10',
                   '--batch_size', '2']) == 0
  rows = read_jsonl(tmp_path / 'out.jsonl')
  assert [r['id'] for r in rows] == list(range(5))       # order, pass-through
  assert [r['tokens'] for r in rows] == prompts
  assert 'new_text' not in rows[0]                        # no tokenizer
  assert [r['new_tokens'] for r in rows] == _hf_greedy(model, prompts, 10)
  # Beam search and sampling run through the same command.
  for extra in (['--num_beams', '3'],
                ['--temperature', '0.9', '--top_k', '40', '--seed', '1']):
    assert cli.main(['generate', '--checkpoint', ckpt, '--input',
                     str(tmp_path / 'in.jsonl'), '--output',
                     str(tmp_path / 'more.jsonl'), '--max_new_tokens', '6',
                     *extra]) == 0
    more = read_jsonl(tmp_path / 'more.jsonl')
    assert all(len(r['new_tokens']) <= 6 for r in more)


def _error_line(capsys, *args):
  """Runs `glm generate ARGS` in process; its one stderr line."""
  capsys.readouterr()
  assert cli.main(['generate', *args]) == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  return lines[0]


def test_trained_checkpoint_text_in_text_out_and_errors(tmp_path, data_dir,
                                                         capsys):
  w = tmp_path / 'w'
  out = train(w, data_dir, '--gin.TRAIN_STEPS=2')
  assert out.returncode == 0, out.stderr[-2000:]
  ckpt = str(w / 'model')
  (tmp_path / 'in.jsonl').write_text(
      json.dumps({'text': 'The river', 'k': 1}) + '\n'
      + json.dumps({'tokens': [200, 201, 202]}) + '\n')
  res = glm('generate', '--checkpoint', ckpt, '--input',
            str(tmp_path / 'in.jsonl'), '--output',
            str(tmp_path / 'out.jsonl'), '--max_new_tokens', '4')
  assert res.returncode == 0, res.stderr[-2000:]
  rows = read_jsonl(tmp_path / 'out.jsonl')
  assert rows[0]['k'] == 1 and rows[0]['text'] == 'The river'
  assert all(isinstance(r['new_text'], str) and len(r['new_tokens']) <= 4
             for r in rows)
  capsys.readouterr()
  assert cli.main(['generate', '--checkpoint', ckpt, '--prompt', 'The river',
                   '--max_new_tokens', '4']) == 0
  assert capsys.readouterr().out.startswith('The river')
  _check_infill_lines(tmp_path, ckpt)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'tokens': [5, 10 ** 6]}) + '\n')
  for args, needle in (
      (['--input', str(bad), '--output', str(tmp_path / 'x.jsonl')],
       'token id 1000000 is outside the vocab'),
      (['--input', str(tmp_path / 'nope.jsonl'), '--output',
        str(tmp_path / 'x.jsonl')], 'does not exist'),
      (['--prompt', 'a', '--num_beams', '2', '--temperature', '0.7'],
       '--num_beams=2 searches deterministically'),
      (['--prompt', 'a', '--top_p', '1.5'], 'top_p=1.5'),
      (['--prompt', 'a', '--mode', 'fill'], "--mode='fill'"),
      (['--prompt', 'a', '--mode', 'infill', '--num_beams', '2'],
       'drop --num_beams'),
      (['--input', str(bad)], '--input needs --output'),
      ([], 'give either --prompt'),
  ):
    line = _error_line(capsys, '--checkpoint', ckpt, *args)
    assert line.startswith('glm generate: error:') and needle in line, line
  assert not (tmp_path / 'x.jsonl').exists()


def _check_infill_lines(tmp_path, ckpt):
  """--mode auto infills the lines holding a blank (each span spliced in
  its blank's place) and continues the others; --mode infill appends a
  [gMASK] to a line without one."""
  from glm.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from glm.model import checkpoint  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(checkpoint.tokenizer_path(ckpt))
  blanks = {tok.special_ids[n] for n in ('[MASK]', '[sMASK]', '[gMASK]')}
  lines = [{'text': 'The [MASK] river [sMASK] ends.'}, {'text': 'The river'}]
  write_jsonl(tmp_path / 'blank.jsonl', lines)
  for mode in ('auto', 'infill'):
    res = glm('generate', '--checkpoint', ckpt, '--input',
              str(tmp_path / 'blank.jsonl'), '--output',
              str(tmp_path / 'filled.jsonl'), '--max_new_tokens', '3',
              '--mode', mode)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_jsonl(tmp_path / 'filled.jsonl')
    prompts = [tok.encode(l['text']) for l in lines]
    if mode == 'auto':
      assert 'infilled' not in rows[1] and len(rows[1]['new_tokens']) <= 3
      prompts = prompts[:1]
    else:
      prompts[1] = prompts[1] + [tok.special_ids['[gMASK]']]
    for prompt, row in zip(prompts, rows):
      want = [t for t in prompt if t in blanks]
      assert [tok.special_ids[s['mask']] for s in row['spans']] == want
      rebuilt, prev = [], 0   # the prompt with each span in its blank
      filled = row['infilled_tokens']
      for span in row['spans']:
        assert filled[span['start']:span['start'] + len(span['tokens'])] == (
            span['tokens']) and len(span['tokens']) <= 3
      for t in prompt:
        rebuilt += row['spans'][prev]['tokens'] if t in blanks else [t]
        prev += t in blanks
      assert filled == rebuilt
      assert row['infilled'] == tok.decode(filled)


def test_prompt_needs_a_tokenizer(tmp_path, capsys):
  model = make_hf_bloom(130, 40, 5, 1)
  model.save_pretrained(tmp_path / 'hf')
  ckpt = str(tmp_path / 'glm')
  assert cli.main(['convert', 'hf-to-glm', '--hf_dir', str(tmp_path / 'hf'),
                   '--out', ckpt]) == 0
  line = _error_line(capsys, '--checkpoint', ckpt, '--prompt', 'hi')
  assert 'needs a tokenizer' in line
  write_jsonl(tmp_path / 'in.jsonl', [{'tokens': [5, 6]}])
  line = _error_line(capsys, '--checkpoint', ckpt, '--input',
                     str(tmp_path / 'in.jsonl'), '--output',
                     str(tmp_path / 'out.jsonl'), '--mode', 'infill')
  assert '--mode=infill needs' in line and 'has none' in line
