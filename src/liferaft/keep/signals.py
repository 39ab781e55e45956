"""Signals that mean "this machine is going away": catch them, pass them on, map exit codes."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: Preemption (SIGTERM), Ctrl-C (SIGINT), a closed terminal (SIGHUP), and SIGUSR1, which
#: Slurm sends before a job's time limit when asked (`--signal=USR1@120`).
STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1") if hasattr(signal, name))


def signal_name(signum: int) -> str:
    """``15`` → ``'SIGTERM'``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(returncode: int) -> int:
    """A child's ``returncode`` as a shell exit status: ``-15`` (killed by SIGTERM) → 143.

    >>> exit_status(-15), exit_status(3)
    (143, 3)
    """
    return 128 - returncode if returncode < 0 else returncode


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to a process group (or to its leader, before the group exists).

    False when neither exists any more.
    """
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class SignalHandlers:
    """Install handlers for some signals and put the previous ones back on ``restore()``.

    Only the main thread may install handlers; elsewhere this does nothing and
    ``installed`` is False.
    """

    def __init__(self, signums: tuple[int, ...], handler: Callable[[int, FrameType | None], Any]) -> None:
        self.previous: dict[int, Any] = {}
        self.installed = threading.current_thread() is threading.main_thread()
        if not self.installed:
            return
        for s in signums:
            try:
                self.previous[s] = signal.signal(s, handler)
            except (ValueError, OSError):
                pass

    def restore(self) -> None:
        for s, prev in self.previous.items():
            try:
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass
        self.previous.clear()

    def chain(self, signum: int, frame: FrameType | None) -> None:
        """Do what the previous handler would have done with this signal."""
        prev = self.previous.get(signum, signal.SIG_DFL)
        if prev is None:
            prev = signal.SIG_DFL
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_IGN:
            return
        else:  # SIG_DFL: end the process the way the signal would have
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
