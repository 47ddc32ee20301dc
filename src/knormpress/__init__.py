"""knormpress: fixed-size KV-cache compression and exact evaluation of what it costs."""

from knormpress.errors import ConfigError

__all__ = ["ConfigError"]
