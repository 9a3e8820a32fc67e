"""Shared by the launcher tests: in-process launcher runs, fake cluster programs, tricky arguments."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Arguments that need quoting: a space, both quote characters, `$`, parentheses, a glob, unicode.
TRICKY = [
    "--config.data.name=my data",
    "--config.task.loss=it's",
    '--config.data.tokenizer=/a "b"/spm.model',
    "--config.model.video.tubelet=(2,16,16)",
    "--config.data.data_dir=$HOME/data*",
    "--config.optim.name=adämw",
]
TRAIN = ["vlm", "train", "--config=configs/dual_encoder.py:B/16", "--workdir=gs://bucket/runs/de"]


def launch(module, *argv: str) -> tuple[int, str, str]:
    """Runs a launcher's main in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def commands(script: str) -> list[str]:
    """The command lines of a dry-run script (no comments, no `set`)."""
    return [l for l in script.splitlines() if l and not l.startswith("#") and l != "set -eu"]


def bash_syntax_ok(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def fake_program(bin_dir: Path, name: str, body: str) -> None:
    """A Python program `name` on bin_dir; `body` sees argv, env and RECORD (a JSON-lines file)."""
    path = bin_dir / name
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\nargv = sys.argv[1:]\nenv = dict(os.environ)\n"
        "def record(**kw):\n"
        "    with open(env['RECORD'], 'a') as f:\n"
        "        f.write(json.dumps(kw) + '\\n')\n" + body
    )
    path.chmod(0o755)


def records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def assert_one_line_error(module, argv, expected: str) -> None:
    rc, out, err = launch(module, *argv)
    assert rc == 2 and out == ""
    prog = module.PROG
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert expected in err, err
