"""Progress shows bytes, rate, files and time left on long work, nothing on short work."""

from __future__ import annotations

import io
import os
from pathlib import Path

from rich.console import Console

import liferaft
from conftest import make_tree
from liferaft.progress import RichProgress


def _console(buf: io.StringIO) -> Console:
    return Console(file=buf, force_terminal=True, width=120, color_system=None)


def test_snapshot_and_restore_report_progress(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {f"f{i}": os.urandom(1 << 20) for i in range(6)})
    buf = io.StringIO()
    progress = RichProgress(min_bytes=1 << 20, console=_console(buf))
    vault = liferaft.Vault(tmp_path / "vault")
    vault.snapshot([src], run="r", progress=progress)
    out = buf.getvalue()
    assert "snapshot" in out and "6/6 files" in out and "MB" in out
    buf.truncate(0)
    vault.restore(run="r", to=tmp_path / "back", progress=progress)
    assert "restore" in buf.getvalue() and "6/6 files" in buf.getvalue()


def test_small_work_shows_no_bar(tmp_path: Path) -> None:
    buf = io.StringIO()
    liferaft.Vault(tmp_path / "vault").snapshot(
        [make_tree(tmp_path / "d", {"f": "x"})], run="r", progress=RichProgress(console=_console(buf))
    )
    assert buf.getvalue() == ""
