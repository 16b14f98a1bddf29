"""troff manual pages -> plain text, good enough for language-model prose.

Not a typesetter: it reads man(7) pages (and the common subset of mdoc(7))
line by line. Comments, macro definitions (`.de`), conditionals (`.if`/`.ie`/
`.el` with their `\\{ ... \\}` bodies), equations and pictures are dropped;
headings (`.SH`) and list tags (`.TP`, `.IP`) become lines of their own;
filled text becomes one line per paragraph; `.nf`/`.EX` blocks keep their
lines; tbl(1) tables keep their cells. Inline escapes are resolved by
`expand_escapes`: fonts and motions vanish, glyphs (`\\(em`, `\\[u00E9]`,
`\\(:u`) become Unicode, `\\-` becomes '-'.

Usage:
  text = troff.troff_to_text(gzip.open(path).read().decode())
"""

from collections.abc import Sequence
import re
import unicodedata


# Two-letter glyph names (\(xx and \[xx]) -> text. Accented letters are
# composed in `_glyph` from an accent prefix and a base letter.
_GLYPHS = {
    'em': '\u2014', 'en': '\u2013', 'hy': '-', 'mi': '-', 'bu': '\u2022',
    'co': '\u00a9', 'rg': '\u00ae', 'tm': '\u2122', 'aq': "'", 'dq': '"',
    'lq': '\u201c', 'rq': '\u201d', 'oq': '\u2018', 'cq': '\u2019',
    'Fo': '\u00ab', 'Fc': '\u00bb', 'fo': '\u2039', 'fc': '\u203a',
    'bq': '\u201a', 'Bq': '\u201e', 'ga': '`', 'aa': '\u00b4', 'ha': '^',
    'ti': '~', 'pl': '+', 'mu': '\u00d7', 'di': '\u00f7', '+-': '\u00b1',
    'eq': '=', '<=': '\u2264', '>=': '\u2265', '!=': '\u2260', '->': '\u2192',
    '<-': '\u2190', '<>': '\u2194', 'de': '\u00b0', 'sc': '\u00a7',
    'ps': '\u00b6', 'ct': '\u00a2', 'Po': '\u00a3', 'Ye': '\u00a5',
    'Eu': '\u20ac', 'eu': '\u20ac', 'ba': '|', 'br': '|', 'or': '|',
    'rs': '\\', 'sl': '/', 'at': '@', 'sh': '#', 'Do': '$', 'ul': '_',
    'ru': '_', 'dg': '\u2020', 'dd': '\u2021', 'ss': '\u00df', 'lh': '\u261c',
    'rh': '\u261e', 'OK': '\u2713', 'ff': 'ff', 'fi': 'fi', 'fl': 'fl',
    'r!': '\u00a1', 'r?': '\u00bf', 'ae': '\u00e6', 'AE': '\u00c6',
    'oe': '\u0153', 'OE': '\u0152', '/o': '\u00f8', '/O': '\u00d8',
    'ao': '\u00e5', 'AO': '\u00c5', 'Sd': '\u00f0', 'TP': '\u00de',
    'Tp': '\u00fe', '12': '\u00bd', '14': '\u00bc', '34': '\u00be',
    '/l': '\u0142', '/L': '\u0141', 'lB': '[', 'rB': ']', 'lC': '{',
    'rC': '}', 'la': '\u27e8', 'ra': '\u27e9',
    'if': '\u221e', 'md': '\u00b7', 'pc': '\u00b7',
    # Long (bracket-only) names that pages use in place of the short ones.
    'dash': '-', 'quotedbl': '"', 'quoteright': "'", 'quoteleft': '`',
}
# \(:a -> a + COMBINING DIAERESIS -> NFC 'ä', and so on.
_ACCENTS = {':': '\u0308', "'": '\u0301', '`': '\u0300', '^': '\u0302',
            '~': '\u0303', ',': '\u0327', 'v': '\u030c', 'o': '\u030a'}
# \(*a .. \(*w: groff's names for the Greek letters.
_GREEK = dict(zip('abgdezyhiklmncoprstufxqw',
                  'αβγδεζηθικλμνξοπρστυφχψω'))
# Predefined strings (\*(xx) used by man, Pod::Man and DocBook pages.
_STRINGS = {
    'lq': '\u201c', 'rq': '\u201d', 'R': '\u00ae', 'Tm': '\u2122',
    'L"': '\u201c', 'R"': '\u201d', 'C`': '"', "C'": '"', 'C+': 'C++',
    '--': '\u2014', 'PI': '\u03c0', 'Aq': "'", 'S': '', 'HF': '', 'Q': '"',
    'U': '"',
}
# Escapes that print nothing (hyphenation points, spacing, italic corrections)
# or a space.
_ZERO_WIDTH = set('&|^%:,/){}!\n?')
_SPACES = set(' 0~')
# Escapes whose single argument is a name: \fB, \f(CW, \f[CR].
_NAMED_ARG = set('fnFgkmMYV')
# Escapes whose argument is a delimited string: \h'1n', \w'..', \D'l 1 2'.
_DELIMITED_ARG = set('hvwlLoxbDXNRZSABC')
# Marks "join with what follows" (\c); removed when the text is assembled.
_JOIN = '\x00'

# Requests and macros that only lay out text; their lines produce nothing.
_LAYOUT = frozenset("""
    ad bd bp c2 cc ce ch cs cu ev fam fc fi ft hc hla hlm hpf hw hy in it lc
    lf ll ls lt mc mk mso na ne nf nh nm nn nr ns os pc pl pn po ps rm rn rr
    rs rt so ss ta tc ti tl tm tr uf ul vs wh PD RS RE UC DT EE EX HP AT Os
    Dd Dt Bl El Ed Ek Bk Pp Lp LP PP P sp br Sm Ef Bf Bd ME UE YS
    IX Sp Vb Ve INDENT UNINDENT bP FT LINKSTYLE als rstReportMargin CW CE T&
    ZN NS NE Rs Re cp
    """.split())  # The last two rows: macros Pod::Man, DocBook, rst2man define.
_PARAGRAPH = frozenset(
    'PP LP P HP Pp Lp sp TP IP SH SS Sh Ss SY YS Bl El It Sp bP'.split())
_BREAK = frozenset('br RS RE in ti INDENT UNINDENT'.split())
_ALTERNATING = frozenset('BR BI IB IR RB RI'.split())
_HEADINGS = frozenset('SH SS Sh Ss'.split())
_NO_FILL = frozenset('nf EX Vb'.split())
_FILL = frozenset('fi EE Ve'.split())
# mdoc inline macro names dropped from the text of an mdoc line.
_MDOC_CALLABLE = frozenset("""
    Ac Ad An Ao Ap Aq Ar At Bc Bo Bq Brc Bro Brq Bsx Bx Cd Cm Dc Do Dq Dv Ec
    Em En Eo Er Es Ev Fa Fc Fd Fl Fn Fo Fr Ft Fx Ic In Lb Li Lk Ms Mt Nm No Ns
    Nx Oc Oo Op Ot Ox Pa Pc Pf Po Pq Qc Ql Qo Qq Sc So Sq St Sx Sy Ta Tn Ux Va
    Vt Xc Xo Xr
    """.split())
_MDOC_PUNCT = frozenset('. , ; : ? ! ) ]'.split())


def _char(code: int) -> str:
  """chr(code), or '' for a surrogate or out-of-range code (UTF-8 safe)."""
  if 0 <= code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
    return chr(code)
  return ''


def _glyph(name: str) -> str:
  """Text of a named glyph (\\(xx or \\[name]); '' when unknown."""
  if name in _GLYPHS:
    return _GLYPHS[name]
  if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
    return unicodedata.normalize('NFC', name[1] + _ACCENTS[name[0]])
  if len(name) == 2 and name[0] == '*' and name[1].lower() in _GREEK:
    letter = _GREEK[name[1].lower()]
    return letter.upper() if name[1].isupper() else letter
  match = re.fullmatch(r'u([0-9A-Fa-f]{4,6})((?:_[0-9A-Fa-f]{4,6})*)', name)
  if match:
    code_points = [match.group(1)] + match.group(2).split('_')[1:]
    return unicodedata.normalize(
        'NFC', ''.join(_char(int(c, 16)) for c in code_points))
  match = re.fullmatch(r'char(\d+)', name)
  if match:
    return _char(int(match.group(1)))
  return ''


def _read_name(text: str, i: int) -> tuple[str, int]:
  """Reads an escape's name argument at text[i]: `x`, `(xx` or `[name]`."""
  if i >= len(text):
    return '', i
  if text[i] == '(':
    return text[i + 1:i + 3], i + 3
  if text[i] == '[':
    end = text.find(']', i)
    end = len(text) if end < 0 else end
    return text[i + 1:end], end + 1
  return text[i], i + 1


def _skip_size(text: str, i: int) -> int:
  """Skips the argument of \\s: `\\s-1`, `\\s12`, `\\s(12`, `\\s[+2]`, ..."""
  if i < len(text) and text[i] in '([\'':
    if text[i] == "'":
      end = text.find("'", i + 1)
      return len(text) if end < 0 else end + 1
    return _read_name(text, i)[1]
  if i < len(text) and text[i] in '+-':
    i += 1
  if i < len(text) and text[i] in '([':
    return _read_name(text, i)[1]
  digits = 0
  while i < len(text) and text[i].isdigit() and digits < 2:
    i, digits = i + 1, digits + 1
  return i


def expand_escapes(text: str, strings: dict[str, str] | None = None) -> str:
  """Replaces troff escapes in one line by the text they print.

  Font changes, sizes, motions and other zero-width escapes disappear, glyphs
  (\\(em, \\[u00E9], \\(:a, ...) become Unicode, `\\-` becomes '-', defined
  strings (\\*(lq, \\*[name]) are substituted and `\\"` starts a comment.

  Args:
    text: one input line (without its newline).
    strings: extra string definitions (from `.ds`) on top of the built-ins.

  Returns:
    The plain text; `\\c` leaves an internal join marker that
    `troff_to_text` resolves.
  """
  strings = {**_STRINGS, **(strings or {})}
  out = []
  i = 0
  while i < len(text):
    char = text[i]
    if char != '\\':
      out.append(char)
      i += 1
      continue
    if i + 1 >= len(text):
      break
    esc, i = text[i + 1], i + 2
    if esc in '"#':
      break
    elif esc in 'eE\\':
      out.append('\\')
    elif esc == '-':
      out.append('-')
    elif esc in ("'", '`', '.'):
      out.append({"'": "'", '`': '`', '.': '.'}[esc])
    elif esc == 't':
      out.append('\t')
    elif esc == 'c':
      out.append(_JOIN)
    elif esc in _ZERO_WIDTH:
      pass
    elif esc in _SPACES:
      out.append(' ')
    elif esc == '(':
      out.append(_glyph(text[i:i + 2]))
      i += 2
    elif esc == '[':
      name, i = _read_name(text, i - 1)
      out.append(_glyph(name.split()[0] if name.split() else ''))
    elif esc == '*':
      name, i = _read_name(text, i)
      out.append(strings.get(name, ''))
    elif esc == 's':
      i = _skip_size(text, i)
    elif esc == 'z' and i < len(text):
      out.append(text[i])
      i += 1
    elif esc in _NAMED_ARG:
      i = _read_name(text, i)[1]
    elif esc in _DELIMITED_ARG and i < len(text):
      delim = text[i]
      end = text.find(delim, i + 1)
      end = len(text) if end < 0 else end
      if esc == 'N':
        number = text[i + 1:end]
        out.append(_char(int(number)) if number.isdigit() else '')
      i = end + 1
    else:
      out.append(esc)
  return ''.join(out)


def _split_args(line: str) -> list[str]:
  """Splits macro arguments on unescaped blanks, honouring "double quotes"."""
  args, current, quoted, had_quote = [], [], False, False
  i = 0
  while i < len(line):
    char = line[i]
    if char == '\\' and i + 1 < len(line):
      if line[i + 1] == '"' and not quoted:
        break
      current.append(line[i:i + 2])
      i += 2
      continue
    if quoted and char == '"':
      if line[i + 1:i + 2] == '"':
        current.append('"')
        i += 2
        continue
      quoted = False
    elif not current and not quoted and char == '"':
      quoted = had_quote = True
    elif not quoted and char in ' \t':
      if current or had_quote:
        args.append(''.join(current))
      current, had_quote = [], False
    else:
      current.append(char)
    i += 1
  if current or had_quote:
    args.append(''.join(current))
  return args


def _mdoc_inline(args: Sequence[str], page_name: str) -> str:
  """Plain text of mdoc macro arguments (`Fl v Ar file` -> `-v file`)."""
  out = ''
  glue = True  # No blank before the next word.
  closers: list[str] = []
  i = 0
  while i < len(args):
    arg, rest = args[i], args[i + 1:]
    i += 1
    stick = False  # The word after this one is glued to it.
    if arg == 'Ns':
      glue = True
      continue
    if arg in ('Fl', 'Op', 'Oo', 'Pq'):
      word, stick = {'Fl': '-', 'Op': '[', 'Oo': '[', 'Pq': '('}[arg], True
      if arg in ('Op', 'Pq'):
        closers.append(']' if arg == 'Op' else ')')
    elif arg == 'Oc':
      word, glue = ']', True
    elif arg == 'Xr' and len(rest) >= 2:
      word, i = f'{rest[0]}({rest[1]})', i + 2
    elif arg == 'Nm' and (not rest or rest[0] in _MDOC_CALLABLE
                          or rest[0] in _MDOC_PUNCT):
      word = page_name
    elif arg in _MDOC_CALLABLE:
      continue
    else:
      word = arg
      glue = glue or arg in _MDOC_PUNCT
    out += word if glue or not out else ' ' + word
    glue = stick
  return out + ''.join(reversed(closers))


class _TextSink:
  """Collects output lines, filling consecutive text into paragraphs."""

  def __init__(self):
    self.lines: list[str] = []
    self._pending: list[str] = []
    self.fill = True

  def text(self, text: str) -> None:
    if self.fill:
      if text.strip():
        self._pending.append(text.strip())
    else:
      self.lines.append(text.rstrip())

  def line(self, text: str) -> None:
    """Emits `text` as a line of its own (a heading or a list tag)."""
    self.flush()
    if text.strip():
      self.lines.append(text.strip())

  def flush(self) -> None:
    if self._pending:
      self.lines.append(' '.join(self._pending))
      self._pending = []

  def paragraph(self) -> None:
    self.flush()
    if self.lines and self.lines[-1]:
      self.lines.append('')

  def result(self) -> str:
    self.flush()
    text = '\n'.join(self.lines)
    text = re.sub(_JOIN + r'[ \n]*', '', text)
    text = re.sub(r'[ \t]+\n', '\n', text)
    return re.sub(r'\n{3,}', '\n\n', text).strip()


def _join_continuations(source: str) -> list[str]:
  """Splits into lines, joining those ending in an escaped newline."""
  lines: list[str] = []
  carry = ''
  for line in source.split('\n'):
    trailing = len(line) - len(line.rstrip('\\'))
    if trailing % 2 == 1:
      carry += line[:-1]
      continue
    lines.append(carry + line)
    carry = ''
  if carry:
    lines.append(carry)
  return lines


def _skip_block(lines: list[str], i: int, terminator: str) -> int:
  """Index just past the line that starts with `terminator` (e.g. '..')."""
  while i < len(lines) and not lines[i].startswith(terminator):
    i += 1
  return i + 1


def _skip_conditional(lines: list[str], i: int) -> int:
  """Index past an `.if`/`.ie`/`.el` line and its `\\{ ... \\}` body."""
  depth = lines[i].count('\\{') - lines[i].count('\\}')
  i += 1
  while depth > 0 and i < len(lines):
    depth += lines[i].count('\\{') - lines[i].count('\\}')
    i += 1
  return i


def _read_table(lines: list[str], i: int) -> tuple[list[list[str]], int]:
  """Reads a tbl(1) table starting after `.TS`.

  Args:
    lines: the page's lines.
    i: index of the line after `.TS`.

  Returns:
    (rows of raw cell text, index just past `.TE`). Options, format lines,
    rules and `T{`/`T}` block markers are dropped.
  """
  separator = '\t'
  if i < len(lines) and lines[i].rstrip().endswith(';'):  # Options line.
    match = re.search(r'tab\s*\((.)\)', lines[i])
    separator = match.group(1) if match else separator
    i += 1
  while i < len(lines) and not lines[i].rstrip().endswith('.'):  # Format.
    i += 1
  i += 1
  rows = []
  while i < len(lines) and not lines[i].startswith('.TE'):
    line = lines[i].replace('T{', '').replace('T}', '')
    i += 1
    if line.startswith(('.', "'")) or line.strip() in ('_', '=', ''):
      continue
    cells = [cell.strip() for cell in line.split(separator)]
    rows.append([cell for cell in cells if cell])
  return rows, i + 1


def _request(line: str) -> tuple[str, str]:
  """(name, rest) of a control line; `.el\\{` names `el`, comments ''."""
  body = line[1:].lstrip(' \t')
  name = re.match(r'[^\s\\]*', body).group(0)
  return name, body[len(name):]


class _Converter:
  """State of one `troff_to_text` pass over a page's lines."""

  def __init__(self, lines: list[str]):
    self.lines = lines
    self.sink = _TextSink()
    self.strings: dict[str, str] = {}
    self.is_mdoc = any(l.startswith(('.Dd', '.Sh ')) for l in lines[:100])
    self.page_name = ''  # mdoc `.Nm` without arguments repeats it.
    self.pending_tag = False  # After .TP (or an empty .SH): own next line.

  def run(self) -> str:
    i = 0
    while i < len(self.lines):
      line = self.lines[i]
      if line.startswith(('.', "'")):
        i = self._control(i)
      else:
        self._emit(expand_escapes(line, self.strings))
        i += 1
    return self.sink.result()

  def _emit(self, text: str, own_line: bool = False) -> None:
    if own_line or self.pending_tag:
      self.sink.line(text)
      self.pending_tag = False
    else:
      self.sink.text(text)

  def _control(self, i: int) -> int:
    """Handles the control line `lines[i]`; returns the next line's index."""
    name, rest = _request(self.lines[i])
    if not name or name.startswith('.'):  # Comments, `.`, `..`, `.\\}`.
      return i + 1
    if name in ('de', 'de1', 'am', 'am1', 'ig'):
      end_name = _split_args(rest)[:1] if name == 'ig' else []
      return _skip_block(self.lines, i + 1,
                         '.' + (end_name[0] if end_name else '.'))
    if name in ('EQ', 'PS'):
      return _skip_block(self.lines, i + 1, '.EN' if name == 'EQ' else '.PE')
    if name in ('if', 'ie', 'el', 'while'):
      return _skip_conditional(self.lines, i)
    if name == 'TS':
      rows, i = _read_table(self.lines, i + 1)
      self.sink.paragraph()
      for row in rows:
        self.sink.line('  '.join(expand_escapes(c, self.strings) for c in row))
      self.sink.paragraph()
      return i
    if name in ('ds', 'ds1'):
      parts = rest.strip().split(None, 1)
      if parts:
        value = parts[1].lstrip('"') if len(parts) > 1 else ''
        self.strings[parts[0]] = expand_escapes(value, self.strings)
      return i + 1
    self._macro(name, _split_args(rest))
    return i + 1

  def _macro(self, name: str, args: list[str]) -> None:
    """Handles a one-line request or macro call."""
    if name in _NO_FILL or (name == 'Bd' and '-literal' in args):
      self.sink.flush()
      self.sink.fill = False
    elif name in _FILL or name == 'Ed':
      self.sink.flush()
      self.sink.fill = True
    if name in _PARAGRAPH:
      self.sink.paragraph()
    if name in _BREAK:
      self.sink.flush()
    if name in ('TP', 'TQ') or (name in _HEADINGS and not args):
      self.sink.flush()
      self.pending_tag = True
      return
    if name == 'Nm' and args and not self.page_name:
      self.page_name = args[0]
    if name in _LAYOUT:
      return
    if name == 'IP':  # Only the tag is text: `.IP "\\(bu" 4`.
      self._emit(expand_escapes(args[0] if args else '', self.strings), True)
      return
    text = expand_escapes(self._macro_text(name, args), self.strings)
    if name in _HEADINGS or name == 'TH':
      self._emit(text, own_line=True)
      self.sink.paragraph()
    else:
      self._emit(text, own_line=name == 'It')

  def _macro_text(self, name: str, args: list[str]) -> str:
    """The (unexpanded) text a text-carrying macro prints."""
    if name in _ALTERNATING:  # `.BR ls (1)` -> 'ls(1)'.
      return ''.join(args)
    if self.is_mdoc and re.fullmatch(r'[A-Z][a-z]{1,2}', name):
      own = [name] if name in _MDOC_CALLABLE else []
      text = _mdoc_inline(own + args, self.page_name)
      return '- ' + text if name == 'Nd' else text
    if name == 'OP':
      return '[' + ' '.join(args) + ']'
    return ' '.join(args)


def troff_to_text(source: str) -> str:
  """Converts a man(7)/mdoc(7) troff page into readable plain text.

  Good enough for language-model prose, not a typesetter: comments, macro
  definitions, conditionals, equations and pictures are dropped; headings and
  list tags become lines of their own; filled text becomes one line per
  paragraph; `.nf`/`.EX` blocks keep their lines; tables keep their cells.

  Args:
    source: the decoded troff source.

  Returns:
    Plain text with paragraphs separated by blank lines.
  """
  return _Converter(_join_continuations(source)).run()
