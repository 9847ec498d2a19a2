"""Stop requests: SIGTERM (what a cluster scheduler sends before it kills a job) and SIGINT
(Ctrl-C) ask a training run to stop after its current step; a second one exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """While entered (``with StopRequest() as stop:``), SIGTERM and SIGINT set
    :attr:`signum` instead of ending the process; the loop checks :attr:`requested` between
    steps. A second signal restores the default action and re-raises it: the process ends at
    once. The previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) nothing is installed and no stop is ever requested.

    ``describe()`` names what the first signal will do (printed once, when ``announce``)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self.describe = lambda: "finishing the current step, then writing a checkpoint"
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (e.g. because another rank got one)."""
        if self.signum is None:
            self.signum = int(signum)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: exit at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name} received: {self.describe()} "
                "(send it again to exit at once)",
                file=sys.stderr,
            )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
