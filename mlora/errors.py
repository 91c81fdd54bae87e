"""User-facing errors: one line that names the key, file or row at fault.

The CLI prints ``MloraError`` messages without a traceback; anything else is a bug and keeps
its traceback.
"""


class MloraError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class ConfigError(MloraError):
    """An invalid configuration key or value."""


class DataError(MloraError):
    """An unreadable data file, or a row missing a field."""
