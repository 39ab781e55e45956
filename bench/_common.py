"""Helpers for the benchmarks: run a command as a child, time it, read its peak RSS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Timing:
    name: str
    seconds: float
    peak_rss_mib: float
    returncode: int


def run(name: str, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, quiet: bool = True) -> Timing:
    """Run ``argv`` as one child process; wall time and its own peak RSS (wait4)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = subprocess.DEVNULL if quiet else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if code != 0:
        print(f"{name} failed ({code}): {err[-2000:]}", file=sys.stderr)
    return Timing(name, seconds, usage.ru_maxrss / 1024, code)


def liferaft_argv(*args: str) -> list[str]:
    """The installed ``liferaft`` command, as a user runs it (else ``python -m liferaft``)."""
    script = Path(sys.executable).parent / "liferaft"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "liferaft", *args]


def compile_bytecode(env: dict[str, str] | None = None) -> None:
    """Write the bytecode cache of every module a CLI snapshot and restore import, as
    `pip install` does for a user. With PYTHONDONTWRITEBYTECODE set and an editable
    install (a development machine), every timed `liferaft` process would otherwise
    compile liferaft's sources again: ~70 ms a start here, a cost no user pays."""
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    full_env.update(env or {})
    code = (
        "import compileall, os, liferaft; "
        "compileall.compile_dir(os.path.dirname(liferaft.__file__), quiet=1); "
        "import liferaft.cli, liferaft.api, liferaft.vault.snapshot, liferaft.vault.restore, "
        "liferaft.vault.maintenance, liferaft.backends.local"
    )
    subprocess.run([sys.executable, "-c", code], env=full_env, check=True)


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        path.unlink()


def sync() -> None:
    os.sync()


def _files(path: Path) -> list[Path]:
    return [Path(d) / f for d, _, names in os.walk(path) for f in names]


def warm(path: Path) -> None:
    """Read every file under ``path`` once, so that it is in the page cache."""
    for f in _files(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass


def evict(path: Path) -> None:
    """Drop every file under ``path`` from the page cache (written back first), as on a
    machine that has not read them yet. Needs no root: POSIX_FADV_DONTNEED on clean pages."""
    os.sync()
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows)
