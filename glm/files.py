"""Writing files whole (a failure leaves the old file or none, never half)
and reading JSON-lines files back."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file, [] if there is none."""
  if not os.path.isfile(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(l) for l in f if l.strip()]


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it: a
  failure leaves no partial output. The file gets the permissions `open`
  would give it (mkstemp's are 0600)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', dir=d)
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
