"""The one base class of errors meant for users.

A `UserError` says what input was wrong (a flag, a gin binding, a file, a
config value, a batch field) and how to fix it, in one line. The command line
prints exactly these as `glm <cmd>: error: ...` with exit status 2; any other
exception is a bug in glm and keeps its traceback. Every package raises its
own subclass (`ConfigError`, `MeshError`, `TrainError`, `DataError`, ...), so
callers can catch one family or all of them.

`UserError` derives from `ValueError`, so code that caught `ValueError`
before still does.
"""


class UserError(ValueError):
  """Bad input from the user, with the fix in the message."""
