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
    """A rich progress bar; rich renders it live in terminals and in Jupyter alike."""

    def __init__(self, stream: Any = None, min_bytes: int = 32 << 20, min_files: int = 2000) -> None:
        self.stream = stream or sys.stderr
        self.min_bytes = min_bytes
        self.min_files = min_files
        self._bar: Any = None
        self._task: Any = None

    def start(self, what: str, files: int, nbytes: int) -> None:
        self.finish()
        if nbytes < self.min_bytes and files < self.min_files:
            return  # small work: no bar flashing by
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        console = Console(file=self.stream)
        self._bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("files"),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._files_total = files
        self._files = 0
        self._bar.start()
        self._task = self._bar.add_task(what, total=max(nbytes, 1), completed=0)
        self._bar.tasks[0].fields["files"] = 0

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def default_progress(quiet: bool = False) -> Progress:
    if quiet:
        return Progress()
    return RichProgress()
