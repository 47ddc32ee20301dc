"""One exception type for user mistakes, so the CLI can print one line instead of a traceback."""


class ConfigError(ValueError):
    """A bad value from the user: the message names the value and the valid choices."""
