"""Signals during training: the first Ctrl-C or SIGTERM asks the loop to stop after the step in
progress and write a checkpoint (``GracefulStop``); the loop then raises ``TrainingInterrupted``.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional


class TrainingInterrupted(Exception):
    """Training stopped on a signal (Ctrl-C, SIGTERM) after a checkpoint at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum


class GracefulStop:
    """SIGINT and SIGTERM handlers for a training loop: the first signal asks the loop to stop
    after the step in progress (``Trainer.run`` then writes a checkpoint); a second Ctrl-C
    stops at once (KeyboardInterrupt; the last checkpoint stays as it was). A SIGTERM after
    the request changes nothing: torchrun answers a Ctrl-C by sending SIGTERM to its workers,
    and schedulers repeat SIGTERM; neither should cut the checkpoint short. Main thread only."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():   # else signal.signal fails
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        # os.write: print() could find sys.stderr's buffer in use by the progress bar.
        os.write(2, f"\nnca-fast train: {signal.Signals(signum).name}: stopping after this step "
                    "and saving a checkpoint (press Ctrl-C again to stop at once, without "
                    "one)\n".encode())
