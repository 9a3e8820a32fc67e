"""What the training data is made of: the config's sources and defaults (a leaf module of input_pipeline).

`data.name` alone, or `data.sources`: a mixture of datasets with weights and step ranges (an
image-then-video curriculum). Also the data directory and the defaults of `data` keys that
configs written before them lack. Imported by `datasets`, `pipeline` and `tokenizer`; imports
none of them.
"""

from __future__ import annotations

import dataclasses
import os

# Keys of `data` a config may lack (configs saved before they existed); their defaults.
DEFAULTS = dict(
    train_split="train",
    eval_split="",
    sources=(),
    sampling="segments",
    sample_fps=0.0,
    short_clips="repeat",
    train_crop="random",
    train_flip=False,
    decode_threads=1,
)


def setting(data_config, key: str):
    """data_config[key], or its default for a config written before the key existed."""
    return data_config[key] if key in data_config else DEFAULTS[key]


def default_data_dir() -> str:
    """$VLM_DATA_DIR, else ~/.cache/vlm/data."""
    return os.environ.get("VLM_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vlm", "data")


SOURCE_KEYS = ("name", "weight", "split", "data_dir", "start_step", "end_step")


def config_error(message: str) -> Exception:
    """A one-line config error: vlm's ConfigError when vlm is there (the CLI prints it as one line)."""
    try:
        from vlm.errors import ConfigError
    except ImportError:  # input_pipeline used on its own
        return ValueError(message)
    return ConfigError(message)


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset of the training mixture."""

    name: str
    split: str
    data_dir: str
    weight: float = 1.0
    start_step: int = 0
    end_step: int | None = None  # exclusive; None = to the end of training

    @property
    def stream_key(self) -> tuple[str, str, str]:
        """Entries with the same key share one stream (a dataset listed in two stages continues)."""
        return self.name, self.split, self.data_dir


def train_sources(data_config) -> list[Source]:
    """The training mixture: `data.sources`, or `data.name` alone. Raises a one-line config error."""
    entries = setting(data_config, "sources") or ()
    if not entries:
        return [Source(data_config.name, setting(data_config, "train_split"), data_config.data_dir)]
    sources = []
    for i, entry in enumerate(entries):
        where = f"config.data.sources[{i}]"
        if not isinstance(entry, dict) and not hasattr(entry, "keys"):
            raise config_error(f"{where}={entry!r} must be a dict like {{'name': 'my_videos', 'weight': 0.5}}")
        entry = dict(entry)
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown or "name" not in entry:
            problem = f"has unknown key(s) {', '.join(unknown)}" if unknown else "lacks 'name'"
            raise config_error(f"{where} {problem}; its keys: {', '.join(SOURCE_KEYS)}")
        try:
            weight = float(entry.get("weight", 1.0))
            start, end = int(entry.get("start_step", 0) or 0), entry.get("end_step")
            end = int(end) if end not in (None, 0) else None
        except (TypeError, ValueError):
            raise config_error(f"{where}: weight must be a number and start_step/end_step integers, got {entry}") from None
        if not weight > 0 or start < 0 or (end is not None and end <= start):
            raise config_error(f"{where}: need weight > 0 and 0 <= start_step < end_step, got {entry}")
        sources.append(Source(str(entry["name"]), str(entry.get("split") or setting(data_config, "train_split")),
                              str(entry.get("data_dir") or data_config.data_dir), weight, start, end))
    return sources


