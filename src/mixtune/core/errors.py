"""User-facing errors. Each message says where, what was given, what was expected, and the fix."""


class MixtuneError(Exception):
    """Base of every error a user can cause; the CLI prints these without a traceback."""


class ConfigError(MixtuneError):
    """A recipe or option is malformed: wrong key, type, value or combination."""


class DataError(MixtuneError):
    """A data file or record cannot be used: names the file and line or row."""


class CheckpointError(MixtuneError):
    """A model directory cannot be loaded or written safely."""


class UnknownNameError(ConfigError):
    """A name looked up in a registry does not exist; the message lists close matches."""
