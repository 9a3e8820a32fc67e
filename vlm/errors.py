"""Errors the command line prints as one line (a leaf module: it imports nothing of vlm)."""


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the key and the fix."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message is one line naming the step and the last checkpoint."""
