"""Shared fixtures: every test gets its own cache, data dir and default vault."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servers import NEEDS_CREATE_ONLY, cloud_vault, gcs_server, moto_server, rclone_server  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def machine(folder: Path) -> Iterator[Path]:
    """Work from ``folder`` as the working folder of one machine.

    A fresh machine has the same layout at another place: a checkpoints folder is known
    in the vault by its path relative to the working folder."""
    folder.mkdir(parents=True, exist_ok=True)
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(old)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LIFERAFT_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xcache"))
    monkeypatch.delenv("LIFERAFT_VAULT", raising=False)


@pytest.fixture(params=["local", "memory", "moto", "rclone", "gcs"])
def vault_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh vault URL on each backend the vault suite runs against.

    moto, rclone and gcs are real-protocol servers on 127.0.0.1 (tests/servers.py),
    started once per session the first time a test asks for them.
    """
    if request.param == "local":
        return str(tmp_path / "vault")
    if request.param == "memory":
        return f"memory://liferaft-tests/{uuid.uuid4().hex}"
    if request.param == "rclone" and request.node.originalname in NEEDS_CREATE_ONLY:
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="rclone serve s3 ignores If-None-Match: no create-only (README: Cloud vaults)")
        )
    return cloud_vault(request, monkeypatch, request.param)


@pytest.fixture
def local_vault(tmp_path: Path) -> str:
    return str(tmp_path / "vault")


def make_tree(root: Path, files: dict[str, bytes | str | None]) -> Path:
    """Create files (bytes/str), empty dirs (None) and links ('->target') under root."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(exist_ok=True)
        elif isinstance(content, str) and content.startswith("->"):
            os.symlink(content[2:], path)
        else:
            path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def tree_state(root: Path) -> dict[str, tuple]:
    """Everything a round trip must keep: type, bytes, mode, mtime, link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", p.read_bytes(), st.st_mode & 0o7777, st.st_mtime_ns)
    return out


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``liferaft`` command in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "liferaft", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user mistake: a non-zero exit, no traceback, one line on stderr holding every needle."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def popen_where_file_modes_hold(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    """Start a child process for which file modes hold, to meet a real EACCES.

    The tests may run as root, which reads and writes whatever a mode says (through
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH): the child then drops both from its
    bounding set before exec, and so has neither after. It keeps its user, so it still
    reaches the interpreter and the files the test made.
    """
    if os.geteuid() != 0:
        return subprocess.Popen(args, text=True, **kw)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    try:
        return subprocess.Popen(args, text=True, preexec_fn=drop, **kw)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot drop root's file access capabilities here: {err}")
