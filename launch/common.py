"""What the cluster launchers (tpu.py, gke.py, slurm.py) share: the command line
`LAUNCHER [flags] -- TRAINING COMMAND`, shell quoting, a small YAML writer,
checks of the training command, and running the steps a dry run prints.

Standard library only: a dry run needs no gcloud, kubectl, sbatch or PyYAML.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys

# Flags `vlm` reads to find its coordinator. Every launcher provides the coordinator itself
# (or lets the platform do it), so one value for all processes in the training command is a bug.
COORDINATOR_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(Exception):
    """A bad flag or training command; the launcher prints it as one line and exits 2."""


class StepFailed(Exception):
    """A command the launcher ran failed; the launcher says which and exits 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`tpu.py: error: ...`), not usage + error."""

    def error(self, message: str):
        raise LaunchError(f"{message} (see --help)")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, training command): the training command is everything after the first `--`."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main_wrapper(prog: str, run, argv: list[str] | None) -> int:
    """Runs `run(launcher_argv, train_argv)`; a LaunchError becomes one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(*split_argv(argv)) or 0
    except LaunchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except StepFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1


def warn(prog: str, message: str) -> None:
    print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)


# --- the training command ---------------------------------------------------------------------------------

def flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name=v` or `--name v` in argv (the last one wins, as in absl), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            value = arg[len(name) + 1:]
        elif arg == name and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def check_train_command(train: list[str], example: str) -> None:
    """Errors that every launcher shares: no command, coordinator flags, `vlm train` without --workdir."""
    if not train:
        raise LaunchError(f"no training command after `--`; e.g. {example}")
    for flag in COORDINATOR_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in train):
            raise LaunchError(
                f"remove {flag} from the training command: the launcher gives every process its own "
                "coordinator settings"
            )
    if _is_vlm_train(train) and flag_value(train, "--workdir") is None:
        raise LaunchError("the training command has no --workdir (e.g. --workdir=gs://BUCKET/runs/NAME)")


def shared_storage_warnings(train: list[str], num_slices: int = 1) -> list[str]:
    """Warnings for a multi-host run on Google Cloud: a host-local workdir, multislice without a DCN mesh."""
    warnings = []
    workdir = flag_value(train, "--workdir")
    if workdir is not None and not workdir.startswith("gs://"):
        warnings.append(
            f"--workdir={workdir} is not a gs:// path: every host must see the same workdir "
            "(checkpoints are written by all hosts together); use gs://BUCKET/... unless it is a shared mount"
        )
    if num_slices > 1 and not any(a.startswith("--config.mesh.dcn.") for a in train):
        warnings.append(
            f"{num_slices} slices but the training command sets no --config.mesh.dcn.*; "
            f"add e.g. --config.mesh.dcn.data={num_slices} (data parallelism between slices)"
        )
    return warnings


def _is_vlm_train(train: list[str]) -> bool:
    words = [a for a in train if not a.startswith("-")]
    return len(words) >= 2 and words[0].rsplit("/", 1)[-1] == "vlm" and words[1] == "train"


def parse_env(pairs: list[str] | None) -> list[tuple[str, str]]:
    """`--env KEY=VALUE` flags as (KEY, VALUE) pairs, in order."""
    env = []
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not ENV_NAME.fullmatch(name):
            raise LaunchError(f"--env={pair!r} must be NAME=VALUE with NAME a shell variable name")
        env.append((name, value))
    return env


# --- shell ---------------------------------------------------------------------------------------------------

_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_FLAG = re.compile(r"(--?[A-Za-z0-9_][A-Za-z0-9_.-]*=)(.*)", re.S)


def quote(word: str, single: bool = False) -> str:
    """One shell word: bare if safe, else "double quotes" if they need no escapes (and not `single`),
    else 'single quotes'."""
    if word and _SAFE.fullmatch(word):
        return word
    if word and not single and not any(c in word for c in '$`"\\!\n'):
        return f'"{word}"'
    return shlex.quote(word)


def quote_arg(arg: str, single: bool = False) -> str:
    """Like `quote`, but `--flag=value` keeps the flag bare: --config.data.name="my data"."""
    m = _FLAG.fullmatch(arg)
    if m and not (m.group(2) and _SAFE.fullmatch(m.group(2))):
        return m.group(1) + quote(m.group(2), single)
    return quote(arg, single)


def join(argv: list[str], single: bool = False) -> str:
    """A command line that a POSIX shell splits back into exactly `argv` (`single`: no double quotes)."""
    return " ".join(quote_arg(a, single) for a in argv)


def home_path(path: str) -> str:
    """A remote path as a shell word; a leading `~/` stays unquoted so that the remote shell expands it."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        rest = path[2:]
        return "~/" + quote(rest) if rest else "~/"
    return quote(path)


def run_steps(steps: list[tuple[str, str]], prog: str) -> None:
    """Runs (comment, bash command) steps in order, stopping at the first that fails."""
    for i, (comment, command) in enumerate(steps, 1):
        print(f"{prog}: {i}. {comment}", file=sys.stderr, flush=True)
        returncode = subprocess.run(["bash", "-euc", command]).returncode
        if returncode:
            raise StepFailed(f"step {i} ({comment}) failed with exit status {returncode}")


def run_program(argv: list[str], input: str | None = None) -> None:
    """Runs a cluster tool (kubectl, sbatch); a missing tool or a failure is a one-line error."""
    try:
        returncode = subprocess.run(argv, input=input, text=True).returncode
    except FileNotFoundError:
        raise StepFailed(f"{argv[0]} not found; install it, or use --dry_run and run the output elsewhere") from None
    if returncode:
        raise StepFailed(f"`{join(argv)}` failed with exit status {returncode}")


def script(header: list[str], steps: list[tuple[str, str]]) -> str:
    """Steps as the bash script a dry run prints (the same commands `run_steps` runs)."""
    lines = ["#!/usr/bin/env bash", *(f"# {h}" for h in header), "set -eu"]
    for i, (comment, command) in enumerate(steps, 1):
        lines += [f"# {i}. {comment}", command]
    return "\n".join(lines) + "\n"


# --- YAML ----------------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    value = str(value)
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def to_yaml(obj, indent: int = 0) -> str:
    """Block-style YAML for dicts (in insertion order), lists, strings, ints and bools: deterministic."""
    pad = " " * indent
    lines = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            key = _yaml_scalar(key)
            if isinstance(value, (dict, list)) and value:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(value, indent + 2).rstrip("\n"))
            elif isinstance(value, (dict, list)):
                lines.append(f"{pad}{key}: {'{}' if isinstance(value, dict) else '[]'}")
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(value)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, (dict, list)) and item:
                body = to_yaml(item, indent + 2).rstrip("\n")
                lines.append(f"{pad}- {body[indent + 2:]}")
            elif isinstance(item, (dict, list)):
                lines.append(f"{pad}- {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    else:
        lines.append(pad + _yaml_scalar(obj))
    return "\n".join(lines) + "\n"
