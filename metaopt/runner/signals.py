"""Graceful stop on SIGINT/SIGTERM: finish the current step, checkpoint, exit.

The handlers only set a flag; the training loop checks it after each outer step,
writes a checkpoint and returns. A second SIGINT aborts at once (the last periodic
checkpoint stays valid, since checkpoints appear only by atomic rename).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["StopRequest"]


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into ``requested`` / ``signum``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step and saving "
              "a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
