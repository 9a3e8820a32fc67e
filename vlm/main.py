"""The `vlm` command line.

  vlm train --config=configs/dual_encoder.py:tiny --workdir=W [--config.key=value ...]
  vlm eval --workdir=W [--step=N]
  vlm tokenizer train --input=captions.txt --vocab_size=N --output=PREFIX
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "eval", "tokenizer train")

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dual_encoder.py:tiny", lock_config=True)
flags.DEFINE_string("workdir", None, "Where config.json, metrics, checkpoints and samples go.")
flags.DEFINE_integer("step", None, "eval: which checkpoint step (default: latest).")
flags.DEFINE_integer("exit_after_step", None, "train: checkpoint and exit after this step (a preemption drill).")
flags.DEFINE_string("input", None, "tokenizer train: text file, one caption per line.")
flags.DEFINE_integer("vocab_size", None, "tokenizer train: vocabulary size.")
flags.DEFINE_string("output", None, "tokenizer train: output prefix (writes PREFIX.model).")
FLAGS = flags.FLAGS


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _require(*names: str) -> None:
    missing = [n for n in names if getattr(FLAGS, n) is None]
    if missing:
        _fail(f"missing --{missing[0]}; usage: {__doc__.strip().splitlines()[0]}")


def main(argv: list[str]) -> None:
    from vlm.config import ConfigError

    command = " ".join(argv[1:3]) if argv[1:2] == ["tokenizer"] else " ".join(argv[1:2])
    if command not in COMMANDS:
        _fail(f"unknown command {' '.join(argv[1:]) or '(none)'!r}; use one of: {', '.join(COMMANDS)}")
    try:
        if command == "train":
            _require("config", "workdir")
            from vlm import train

            train.train(FLAGS.config, FLAGS.workdir, exit_after_step=FLAGS.exit_after_step)
        elif command == "eval":
            _require("workdir")
            from vlm import train

            metrics = train.evaluate(FLAGS.workdir, step=FLAGS.step)
            print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        else:
            _require("input", "vocab_size", "output")
            from input_pipeline import tokenizer

            path = tokenizer.main_train(FLAGS.input, FLAGS.vocab_size, FLAGS.output)
            print(f"wrote {path}", flush=True)
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))


def run() -> None:
    """Console-script entry point. Config-file errors (unknown variant, misspelt key) are one line."""
    try:
        app.run(main)
    except flags.Error as e:  # raised while parsing --config / --config.x=y
        _fail(str(e).splitlines()[0] if str(e) else repr(e))


if __name__ == "__main__":
    run()
