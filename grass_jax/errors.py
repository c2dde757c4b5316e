"""The errors a user can cause: each message names the problem and the fix, in one line.

``scripts/train.py`` and ``scripts/evaluate.py`` print them as ``error: <message>`` and exit with code 2
(``--debug`` shows the traceback); every other exception is a bug of ours and keeps its traceback.

Example::

  >>> issubclass(ConfigError, ValueError) and ConfigError in USER_ERRORS
  True
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A bad configuration key or value; the message names the key."""


class DataError(ValueError):
  """Missing, empty or malformed data (the message names the file and record)."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as the config says (the message names the fix)."""


class GGUFError(ValueError):
  """A GGUF file that cannot be loaded (the message names the tensor or key and the fix)."""


class MeshError(ValueError):
  """A mesh that does not fit the devices or the batch; the message names the config key."""


# What the scripts turn into one line and exit code 2 (an output directory that holds a run, a missing file).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, GGUFError, MeshError,
                                            FileExistsError, FileNotFoundError)

__all__ = ["USER_ERRORS", "CheckpointError", "ConfigError", "DataError", "GGUFError", "MeshError"]
