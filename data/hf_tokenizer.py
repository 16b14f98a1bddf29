"""Hugging Face tokenizers in glm, and glm's tokenizer for Hugging Face.

`HFTokenizer` reads a `tokenizer.json` (the `tokenizers` library's format,
what a BLOOM folder ships) with the `tokenizer_config.json` /
`special_tokens_map.json` beside it, and offers `glm.data.tokenizer.
Tokenizer`'s interface (encode, decode, eos_id, pad_id, special_ids,
id_to_piece), so every text path of glm runs on it. Texts are encoded
without added special tokens, as glm's own tokenizer does.

`spm_to_tokenizers` turns glm's SentencePiece model (BPE, byte fallback,
identity normalisation, no dummy prefix, the GLM / UL2 specials as user
symbols) into a `tokenizers.Tokenizer` that splits text into the same ids:
spaces become '▁' and nothing else is normalised; the user symbols match
anywhere as atomic added tokens; the BPE merges are every split of a vocab
piece into two vocab pieces, ranked by the piece's SentencePiece score (the
order SentencePiece's BPE merges in); characters outside the vocabulary
fall back to their UTF-8 byte pieces. `<pad>`, `</s>` and `<unk>` are
special tokens that `split_special_tokens` keeps from matching in raw text
(SentencePiece never reads them from text either).

`write_for_transformers(tok, out_dir)` writes what
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads: a copy of an
HF tokenizer's files, or the conversion of glm's SentencePiece model.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Sequence

from glm.data.errors import DataError

FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def _token_text(value: Any) -> str | None:
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A `tokenizer.json` with glm's tokenizer interface."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.model_path = path
    self._tk = tokenizers.Tokenizer.from_file(path)
    folder = os.path.dirname(path)
    names = {}
    for name in reversed(FILES[1:]):       # the config wins over the map
      try:
        with open(os.path.join(folder, name), encoding='utf-8') as f:
          names.update({k: _token_text(v) for k, v in json.load(f).items()
                        if k.endswith('_token')})
      except (OSError, ValueError):
        pass
    ids = {k: self._tk.token_to_id(v) for k, v in names.items() if v}
    if ids.get('eos_token') is None:
      raise DataError(f'{path}: no eos token in its tokenizer_config.json or '
                      'special_tokens_map.json; glm ends documents with it.')
    self.eos_id = ids['eos_token']
    self.pad_id = ids.get('pad_token', self.eos_id)
    self.unk_id = ids.get('unk_token')
    self.bos_id = ids.get('bos_token')
    from glm.data import tokenizer as spm_lib  # pylint: disable=g-import-not-at-top
    self.special_ids = {'<pad>': self.pad_id, '</s>': self.eos_id}
    for name in spm_lib.user_defined_symbols():  # GLM / UL2, if it has them
      i = self._tk.token_to_id(name)
      if i is not None:
        self.special_ids[name] = i

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tk.encode_batch(list(texts),
                                                  add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, stopping at the first eos and skipping pads."""
    kept = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i != self.pad_id:
        kept.append(i)
    return self._tk.decode(kept, skip_special_tokens=False)

  def id_to_piece(self, token_id: int) -> str:
    return self._tk.id_to_token(int(token_id)) or ''

  def files(self) -> list[str]:
    """The files that make this tokenizer (copied with a checkpoint)."""
    folder = os.path.dirname(self.model_path)
    return [os.path.join(folder, n) for n in FILES
            if os.path.isfile(os.path.join(folder, n))]


def open_tokenizer(path: str):
  """glm's SentencePiece `Tokenizer` for a `.model`, `HFTokenizer` for a
  `tokenizer.json`."""
  if path.endswith('.json'):
    return HFTokenizer(path)
  from glm.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  return Tokenizer(path)


def spm_to_tokenizers(model_path: str):
  """glm's SentencePiece model as an equivalent `tokenizers.Tokenizer`."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
  proto = pb.ModelProto()
  with open(model_path, 'rb') as f:
    proto.ParseFromString(f.read())
  if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
    raise DataError(f'{model_path} is not a BPE SentencePiece model.')
  kinds = pb.ModelProto.SentencePiece
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  normal = {p.piece: p.score for p in proto.pieces if p.type == kinds.NORMAL}
  merges = []
  for piece, score in normal.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in normal and right in normal:
        merges.append((-score, vocab[left], vocab[right], left, right))
  merges.sort()
  unk = next(p.piece for p in proto.pieces if p.type == kinds.UNKNOWN)
  tk = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
      byte_fallback=True, fuse_unk=False))
  tk.normalizer = normalizers.Replace(' ', '\u2581')
  tk.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '),
                                  decoders.ByteFallback(), decoders.Fuse()])
  tk.add_tokens([tokenizers.AddedToken(p.piece, normalized=False,
                                       special=False)
                 for p in proto.pieces if p.type == kinds.USER_DEFINED])
  tk.add_special_tokens([tokenizers.AddedToken(p.piece, normalized=False,
                                               special=True)
                         for p in proto.pieces
                         if p.type in (kinds.CONTROL, kinds.UNKNOWN)])
  return tk


def write_for_transformers(tok, out_dir: str) -> dict[str, int | None]:
  """Writes `tok` (a glm `Tokenizer` or an `HFTokenizer`) into `out_dir` for
  `transformers.AutoTokenizer`; returns its bos / eos / pad ids for the
  model's config.json."""
  if isinstance(tok, HFTokenizer):
    for path in tok.files():
      shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    return {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id,
            'pad_token_id': tok.pad_id}
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError('writing a Hugging Face tokenizer needs transformers: '
                    "pip install -e '.[dev]'.") from None
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=spm_to_tokenizers(tok.model_path),
      eos_token='</s>', pad_token='<pad>', unk_token='<unk>',
      split_special_tokens=True, clean_up_tokenization_spaces=False)
  fast.save_pretrained(out_dir)
  # glm has no bos: generation from an empty prompt starts from eos.
  return {'bos_token_id': tok.eos_id, 'eos_token_id': tok.eos_id,
          'pad_token_id': tok.pad_id}
