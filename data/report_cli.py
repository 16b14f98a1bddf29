"""`glm data card` and `glm data fertility`: the corpus reports.

  glm data card --data_dir .cache/data
      builds (or reuses) the corpus `D/corpus` and the tokenizer
      `D/spm_4096.model`, writes `D/corpus/data_card.{json,md}` and prints the
      per-language table (documents, bytes, tokens, share after sampling).
  glm data fertility --data_dir .cache/data [--languages en,de,ja]
      writes `D/fertility.{json,md}`: tokens per word / character of the
      multilingual tokenizer against a monolingual one per language, flagging
      languages where it is > 10% worse (BLOOM's check). ~2 s on 2 cores once
      the corpus and tokenizer exist.

Both take --vocab_size (default 4096) and --tokenizer (an existing `.model`
used instead of `D/spm_<vocab>.model`). `main(argv)` receives the arguments
after `glm data`.
"""

from collections.abc import Sequence
import argparse
import os

from glm.data import corpus
from glm.data import data_card
from glm.data.errors import DataError
from glm.data import fertility
from glm.data import tokenizer as tokenizer_lib


DEFAULT_DATA_DIR = '.cache/data'
DEFAULT_VOCAB_SIZE = 4096


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one-line DataErrors."""

  def error(self, message: str):
    raise DataError(f'glm data: {message}; see `glm data --help`.')


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='glm data', description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', metavar='{card,fertility}')
  for name, help_text in (('card', 'write and print the data card'),
                          ('fertility', 'write and print the fertility '
                                        'report')):
    command = commands.add_parser(name, help=help_text)
    command.add_argument('--data_dir', default=DEFAULT_DATA_DIR,
                         help='holds corpus/ and the tokenizer (built when '
                              'missing)')
    command.add_argument('--vocab_size', type=int, default=DEFAULT_VOCAB_SIZE)
    command.add_argument('--tokenizer', default=None,
                         help='an existing .model instead of '
                              'D/spm_<vocab_size>.model')
    if name == 'fertility':
      command.add_argument('--languages', default=None,
                           help='comma-separated, e.g. en,de,ja (default: '
                                'all)')
      command.add_argument('--out_dir', default=None,
                           help='where fertility.{json,md} go (default: D)')
  return parser


def _corpus_and_tokenizer(args: argparse.Namespace) -> tuple[str, str]:
  """Ensures D/corpus and the tokenizer; returns their paths."""
  if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
    raise DataError(f'--tokenizer={args.tokenizer} is not a file; pass a '
                    'SentencePiece .model or leave it out to build '
                    f'{args.data_dir}/spm_{args.vocab_size}.model.')
  if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
    raise DataError(f'--data_dir={args.data_dir} is not a directory; pass a '
                    f'directory (default {DEFAULT_DATA_DIR}).')
  corpus_dir = os.path.join(args.data_dir, 'corpus')
  corpus.ensure_corpus(corpus_dir)
  model = args.tokenizer or tokenizer_lib.ensure_tokenizer(
      corpus_dir, os.path.join(args.data_dir, f'spm_{args.vocab_size}'),
      vocab_size=args.vocab_size)
  return corpus_dir, model


def main(argv: Sequence[str]) -> int:
  """Runs `glm data <command>`; argv excludes the leading 'data'."""
  parser = _parser()
  args = parser.parse_args(list(argv))
  if args.command is None:
    raise DataError('glm data: no command given; use `glm data card` or '
                    '`glm data fertility`.')
  corpus_dir, model = _corpus_and_tokenizer(args)
  if args.command == 'card':
    table = data_card.write_data_card(corpus_dir,
                                      tokenizer_lib.Tokenizer(model))
    print(table)
    print(f'glm.data: wrote {os.path.join(corpus_dir, data_card.CARD_MD)} '
          'and .json', flush=True)
  else:
    languages = None
    if args.languages:
      languages = [l.strip() for l in args.languages.split(',') if l.strip()]
    out_dir = args.out_dir or args.data_dir
    print(fertility.fertility_report(corpus_dir, model, out_dir,
                                     languages=languages))
    print(f'glm.data: wrote {os.path.join(out_dir, fertility.REPORT_MD)} '
          'and .json', flush=True)
  return 0
