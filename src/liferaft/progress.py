"""Progress for long work: files, bytes, rate and time left, in a terminal or Jupyter."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """Silent progress: the interface the vault reports to."""

    def start(self, what: str, files: int, nbytes: int) -> None:
        """A phase begins with known totals."""

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        """Some work is done."""

    def finish(self) -> None:
        """The phase is over."""


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
        if self._bar is not None:
            self._files += files
            self._bar.update(self._task, advance=nbytes, files=f"{self._files}/{self._files_total}")

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def default_progress(quiet: bool = False) -> Progress:
    if quiet:
        return Progress()
    return RichProgress()
