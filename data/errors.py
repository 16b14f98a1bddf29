"""The error the data package raises for bad input from the user.

`DataError` reports a wrong argument, `DataConfig` (gin) value, corpus or
tokenizer file, `glm data` flag or example, with the fix, in one line; the
command line prints it without a traceback (see `glm.errors`). It derives
from `ValueError`, so code that catches `ValueError` still catches it.

This module imports nothing from `glm.data`, so every data module can
import it.
"""

from glm.errors import UserError


class DataError(UserError):
  """Bad input to glm.data (arguments, config, files), with the fix."""
