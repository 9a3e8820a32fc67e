"""Errors the command line prints as one line (a leaf module: it imports nothing of vlm)."""


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the key and the fix."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message is one line naming the step and the last checkpoint."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line: Orbax and TensorStore messages run to pages."""
    text = error.args[0] if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str) else str(error)
    text = text.split("See full TensorStore details")[0]  # a page of JSON follows
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
