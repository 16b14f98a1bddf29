"""Writing files whole: a failure leaves the old file or none, never half."""

from __future__ import annotations

import os
import tempfile


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
