"""SIGTERM as a preemption notice: the training loop checkpoints the step in flight and exits 0."""

from __future__ import annotations

import jax
import numpy as np


class PreemptionFlag:
    """Set by SIGTERM (how TPU/GKE/SLURM announce preemption): the loop checkpoints and exits.

    Every process gets the signal, but acting on it must be collective (the checkpoint is a
    collective write), so the flag is agreed across processes each step it is consulted.
    """

    def __init__(self):
        self._local = False
        self._previous = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        self._local = True

    def is_set(self) -> bool:
        if jax.process_count() == 1:
            return self._local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.asarray(self._local)).any())
