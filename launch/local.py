"""Runs a multi-process JAX job on this machine: N processes with M CPU devices each.

    python launch/local.py --processes=2 --devices_per_process=4 -- vlm train --config=... --workdir=W

Each process gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES,
JAX_PROCESS_ID, M virtual CPU devices and gloo collectives, exactly what a pod host
gets from its launcher. Output of process i goes to LOG_DIR/process_i.log; process 0's
is also echoed here. When any process fails (or Ctrl-C), all others are stopped
within seconds, the failing process's log tail is shown, and the exit code is its
exit code: no orphan left waiting at a barrier.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

GRACE_S = 5.0  # SIGTERM → SIGKILL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, index: int, count: int, devices: int, port: int) -> dict:
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(
        XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(count),
        JAX_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",
    )
    return env


def _echo(path: str, stop: threading.Event) -> None:
    """Tails process 0's log to our stdout."""
    with open(path, "rb") as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif stop.is_set():
                return
            else:
                time.sleep(0.1)


def _tail(path: str, lines: int = 25) -> str:
    with open(path, "rb") as f:
        return b"".join(f.readlines()[-lines:]).decode(errors="replace")


def _stop_all(procs: list[subprocess.Popen]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + GRACE_S
    for p in alive:
        try:
            p.wait(max(deadline - time.time(), 0.01))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run(command: list[str], *, processes: int, devices_per_process: int, log_dir: str) -> int:
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for i in range(processes):
        log_path = os.path.join(log_dir, f"process_{i}.log")
        log = open(log_path, "wb")
        env = process_env(os.environ, index=i, count=processes, devices=devices_per_process, port=port)
        # Own process group per child, so stopping it also stops whatever it started.
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log_path)
        print(f"[launch] process {i}/{processes} pid {procs[-1].pid}, {devices_per_process} CPU devices, "
              f"log {log_path}", flush=True)
    stop_echo = threading.Event()
    echo = threading.Thread(target=_echo, args=(logs[0], stop_echo), daemon=True)
    echo.start()

    def interrupt(signum, _frame):
        print(f"\n[launch] signal {signum}: stopping all {processes} processes", file=sys.stderr, flush=True)
        _stop_all(procs)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    failed = None
    while True:
        codes = [p.poll() for p in procs]
        failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None or all(c == 0 for c in codes):
            break
        time.sleep(0.2)
    if failed is not None:
        _stop_all(procs)
    stop_echo.set()
    echo.join(timeout=2)
    if failed is None:
        return 0
    code = procs[failed].returncode
    cause = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    print(f"\n[launch] process {failed} failed ({cause}); stopped the others. Last lines of {logs[failed]}:",
          file=sys.stderr)
    print(_tail(logs[failed]), file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("error: no command; usage: python launch/local.py --processes=N --devices_per_process=M -- vlm train ...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--log_dir", default=None, help="default: a new temporary directory")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if args.processes < 1 or args.devices_per_process < 1:
        print("error: --processes and --devices_per_process must be ≥ 1", file=sys.stderr)
        return 2
    if not command:
        print("error: nothing after --; give the command to run, e.g. -- vlm train --config=...", file=sys.stderr)
        return 2
    if shutil.which(command[0]) is None and not os.path.exists(command[0]):
        print(f"error: command not found: {command[0]}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="vlm_launch_")
    return run(command, processes=args.processes, devices_per_process=args.devices_per_process, log_dir=log_dir)


if __name__ == "__main__":
    sys.exit(main())
