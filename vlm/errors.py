"""Errors the command line prints as one line (a leaf module: it imports nothing of vlm)."""


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the key and the fix."""
