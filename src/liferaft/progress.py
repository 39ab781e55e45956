"""Progress for long work: files, bytes, rate and time left, in a terminal or Jupyter."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import Any


class Progress:
    """Silent progress: the interface the vault reports to.

    As a context manager it is finished on the way out, an exception (Ctrl-C included)
    or not, so that a live display never stays on screen with the cursor hidden.

    >>> with RichProgress() as progress:                     # doctest: +SKIP
    ...     vault.snapshot(["checkpoints"], progress=progress)
    """

    def start(self, what: str, files: int, nbytes: int) -> None:
        """A phase begins with known totals."""

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        """Some work is done."""

    def finish(self) -> None:
        """The phase is over (calling it again does nothing)."""

    def abort(self) -> None:
        """The work ended early (an error, Ctrl-C): end the display without calling it done."""
        self.finish()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()
        self.finish()


class SyncedProgress(Progress):
    """A progress that several worker threads report to: one at a time."""

    def __init__(self, inner: Progress) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def start(self, what: str, files: int, nbytes: int) -> None:
        with self._lock:
            self.inner.start(what, files, nbytes)

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.inner.advance(files, nbytes)

    def finish(self) -> None:
        with self._lock:
            self.inner.finish()

    def abort(self) -> None:
        with self._lock:
            self.inner.abort()


class RichProgress(Progress):
    """A rich progress bar: bytes, rate, files and time left.

    rich renders it live in a terminal and as a widget in Jupyter alike; small work
    (under ``min_bytes`` and ``min_files``) shows no bar at all.
    """

    def __init__(self, stream: Any = None, min_bytes: int = 32 << 20, min_files: int = 2000, console: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.min_bytes = min_bytes
        self.min_files = min_files
        self.console = console
        self._bar: Any = None
        self._task: Any = None
        self._files = 0
        self._files_total = 0

    def start(self, what: str, files: int, nbytes: int) -> None:
        self.finish()
        if nbytes < self.min_bytes and files < self.min_files:
            return  # small work: no bar flashing by
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[files]} files"),
            TimeRemainingColumn(),
            console=self.console or Console(file=self.stream),
            transient=True,
        )
        self._files, self._files_total = 0, files
        self._bar.start()
        self._task = self._bar.add_task(what, total=max(nbytes, 1), files=f"0/{files}")

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        bar = self._bar  # once: a reader thread may still report after finish()
        if bar is not None:
            self._files += files
            bar.update(self._task, advance=nbytes, files=f"{self._files}/{self._files_total}")

    def finish(self) -> None:
        """Stop the bar: it is erased, the cursor shown again, the next output on a line of its own."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.stop()


class TextProgress(Progress):
    """A line every few seconds: for Jupyter without ipywidgets, and logs."""

    def __init__(self, stream: Any = None, every: float = 5.0, min_bytes: int = 32 << 20, min_files: int = 2000) -> None:
        self.stream = stream or sys.stdout
        self.every = every
        self.min_bytes = min_bytes
        self.min_files = min_files
        self._active = False

    def start(self, what: str, files: int, nbytes: int) -> None:
        self._active = nbytes >= self.min_bytes or files >= self.min_files
        self.what, self.files_total, self.bytes_total = what, files, nbytes
        self.files = self.nbytes = 0
        self.t0 = self.last = time.monotonic()
        if self._active:
            self._line()

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.nbytes += nbytes
        if self._active and time.monotonic() - self.last >= self.every:
            self._line()

    def finish(self) -> None:
        if self._active:
            self._line(done=True)
        self._active = False

    def abort(self) -> None:
        if self._active:
            self._line(stopped=True)
        self._active = False

    def _line(self, done: bool = False, stopped: bool = False) -> None:
        self.last = now = time.monotonic()
        elapsed = max(now - self.t0, 1e-9)
        rate = self.nbytes / elapsed
        mib = 1 << 20
        text = f"{self.what}: {self.nbytes / mib:.0f}/{self.bytes_total / mib:.0f} MiB, {self.files}/{self.files_total} files, {rate / mib:.0f} MiB/s"
        if done:
            text += f", done in {elapsed:.1f}s"
        elif stopped:
            text += f", stopped after {elapsed:.1f}s"
        elif rate > 0 and self.bytes_total > self.nbytes:
            text += f", ~{(self.bytes_total - self.nbytes) / rate:.0f}s left"
        print(text, file=self.stream, flush=True)


def in_jupyter() -> bool:
    """Running in a Jupyter kernel (Colab and Kaggle included)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ in ("ZMQInteractiveShell", "Shell")  # Shell: Colab


def auto_progress() -> Progress:
    """What an API call shows when not told: a bar in a notebook's main thread, else nothing.

    Scripts and background threads (the syncer, the Checkpointer) stay silent.
    """
    if threading.current_thread() is not threading.main_thread() or not in_jupyter():
        return Progress()
    try:
        import ipywidgets  # noqa: F401  - rich draws live output in Jupyter through it
    except ImportError:
        return TextProgress()
    return RichProgress()


def default_progress(quiet: bool = False) -> Progress:
    if quiet:
        return Progress()
    return RichProgress()
