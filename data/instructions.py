"""Prompted instruction examples built from the corpus itself.

GLM-130B mixes 5% multi-task instruction data into pre-training, and BLOOMZ
fine-tunes on prompted tasks. Offline, we build a handful of prompted tasks
from the corpus documents:

  language_id   "Passage: ...\nQuestion: In which language is this passage
                written?\nAnswer:" -> " German"
  next_line     four lines of Python, two candidate next lines (A)/(B)
                -> " (A)"
  fill_blank    a passage with one word replaced by "____" -> " word"

Each example uses the prefix-LM layout shared with UL2: seq = prompt ++
answer ++ [eos]; tokens = seq[:-1], targets = seq[1:], the loss on the answer
and eos only, prefix_len = len(prompt). Objective 'instruction'.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from glm.data.errors import DataError
from glm.data import objectives


TASKS = ('language_id', 'next_line', 'fill_blank')

LANGUAGE_NAMES = {
    'en': 'English', 'cs': 'Czech', 'da': 'Danish', 'de': 'German',
    'es': 'Spanish', 'fi': 'Finnish', 'fr': 'French', 'hr': 'Croatian',
    'hu': 'Hungarian', 'id': 'Indonesian', 'it': 'Italian', 'ja': 'Japanese',
    'ko': 'Korean', 'nl': 'Dutch', 'pl': 'Polish', 'pt': 'Portuguese',
    'pt-BR': 'Brazilian Portuguese', 'ro': 'Romanian', 'ru': 'Russian',
    'sl': 'Slovenian', 'sr': 'Serbian', 'sv': 'Swedish', 'tr': 'Turkish',
    'uk': 'Ukrainian', 'zh-CN': 'Simplified Chinese',
    'zh-TW': 'Traditional Chinese', 'code': 'Python',
}

_WORD = re.compile(r'[^\W\d_]{4,}')


@dataclasses.dataclass(frozen=True)
class Document:
  lang: str
  text: str


def prefix_lm_example(prompt: Sequence[int], answer: Sequence[int],
                      eos: int, objective: str = 'instruction') -> dict:
  """prompt ++ answer ++ [eos] in the decoder-only prefix-LM layout."""
  seq = np.asarray(list(prompt) + list(answer) + [eos], np.int32)
  n = len(seq) - 1
  loss = np.zeros(n, np.int32)
  loss[len(prompt) - 1:] = 1  # positions whose target is answer or eos
  return {
      'tokens': seq[:-1], 'targets': seq[1:], 'loss_mask': loss,
      'position_ids': np.arange(n, dtype=np.int32),
      'block_position_ids': np.zeros(n, np.int32),
      'prefix_len': len(prompt), 'objective': objective, 'denoiser': None,
  }


def _passage(rng: np.random.Generator, text: str, max_chars: int) -> str:
  """A passage of whole lines, at most max_chars, from a random line."""
  lines = [l.strip() for l in text.splitlines() if len(l.strip()) > 20]
  if not lines:
    return text.strip()[:max_chars]
  start = int(rng.integers(len(lines)))
  out = lines[start][:max_chars]
  for line in lines[start + 1:]:
    if len(out) + 1 + len(line) > max_chars:
      break
    out += ' ' + line
  return out


def language_id(rng, docs: Sequence[Document], max_chars: int):
  natural = [d for d in docs if d.lang != 'code' and d.lang in LANGUAGE_NAMES]
  doc = natural[int(rng.integers(len(natural)))]
  passage = _passage(rng, doc.text, max_chars)
  prompt = (f'Passage: {passage}\nQuestion: In which language is this '
            'passage written?\nAnswer:')
  return prompt, ' ' + LANGUAGE_NAMES[doc.lang]


def next_line(rng, docs: Sequence[Document], max_chars: int):
  code = [d for d in docs if d.lang == 'code']
  for _ in range(20):
    doc = code[int(rng.integers(len(code)))]
    lines = [l for l in doc.text.splitlines() if l.strip()]
    if len(lines) < 8:
      continue
    i = int(rng.integers(len(lines) - 5))
    context, right = lines[i:i + 4], lines[i + 4]
    others = [l for l in lines if l != right and l.strip()]
    if not others:
      continue
    wrong = others[int(rng.integers(len(others)))]
    context = '\n'.join(context)[:max_chars]
    first_right = bool(rng.integers(2))
    a, b = (right, wrong) if first_right else (wrong, right)
    prompt = (f'Code:\n{context}\nWhich line comes next?\n(A) {a.strip()}\n'
              f'(B) {b.strip()}\nAnswer:')
    return prompt, ' (A)' if first_right else ' (B)'
  return language_id(rng, docs, max_chars)


def fill_blank(rng, docs: Sequence[Document], max_chars: int):
  natural = [d for d in docs if d.lang != 'code']
  for _ in range(20):
    doc = natural[int(rng.integers(len(natural)))]
    passage = _passage(rng, doc.text, max_chars)
    words = list(_WORD.finditer(passage))
    if not words:
      continue
    m = words[int(rng.integers(len(words)))]
    blanked = passage[:m.start()] + '____' + passage[m.end():]
    return f'Fill in the blank: {blanked}\nAnswer:', ' ' + m.group(0)
  return language_id(rng, docs, max_chars)


_BUILDERS = {'language_id': language_id, 'next_line': next_line,
             'fill_blank': fill_blank}


def instruction_example(rng: np.random.Generator, docs: Sequence[Document],
                        tokenizer, special: objectives.SpecialIds, *,
                        max_len: int, task: str | None = None) -> dict:
  """One prompted example of at most max_len tokens (task random if None)."""
  if not docs:
    raise DataError('instruction examples need documents; the corpus split '
                    'is empty.')
  has_code = any(d.lang == 'code' for d in docs)
  if task is None:
    choices = TASKS if has_code else ('language_id', 'fill_blank')
    task = choices[int(rng.integers(len(choices)))]
  if task not in _BUILDERS:
    raise DataError(f'instruction task {task!r} is not one of {TASKS}.')
  if task == 'next_line' and not has_code:
    task = 'language_id'
  max_chars = 4 * max_len
  while True:
    prompt, answer = _BUILDERS[task](rng, docs, max_chars)
    p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
    if len(p) + len(a) <= max_len:
      ex = prefix_lm_example(p, a, special.eos)
      ex['source_tokens'] = np.asarray(p + a, np.int32)
      ex['instruction_task'] = task
      return ex
    if max_chars < 16:
      if task != 'language_id':  # the shortest prompts; try them instead
        task, max_chars = 'language_id', 4 * max_len
        continue
      raise DataError(f'max_len={max_len} is too short for a prompted '
                      f'{task} example; use a longer sequence.')
    max_chars //= 2
