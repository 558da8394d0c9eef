"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug)."""


class AmzftError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class DataError(AmzftError):
    """A data file is missing, unreadable or holds nothing usable."""


class ConfigError(AmzftError):
    """A configuration value is out of range or inconsistent."""


class ModelError(AmzftError):
    """A model or tokenizer cannot be found or loaded."""
