"""User-facing errors: bad input that the command line reports in one clear line, without a traceback."""


class ReIDRegError(ValueError):
    """Base class of every error caused by the user's input (config, files, options)."""


class ConfigError(ReIDRegError):
    """A config value is invalid or inconsistent; the message names the option and what was expected."""
