"""A full disk: one clear line, a non-zero exit, and the previous committed state intact.

The vault (or the restore target) lives on a small tmpfs mounted for the test. Where
mounting is not allowed (not root, no CAP_SYS_ADMIN), the same checks run against a
backend that raises ENOSPC after a byte budget: the fallback the issue allows.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import liferaft
from conftest import cli, make_tree, tree_state
from liferaft.backends import LocalBackend
from liferaft.backends.base import NoSpace
from liferaft.errors import VaultFull
from liferaft.vault.repository import Repository
from liferaft.vault.snapshot import take_snapshot


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "8m"):
        pytest.skip("cannot mount a tmpfs here; test_simulated_enospc covers the same path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_vault_keeps_previous_snapshot(small_fs: Path, tmp_path: Path) -> None:
    vault_dir = small_fs / "vault"
    work = make_tree(tmp_path / "work", {"small.bin": os.urandom(1 << 20)})
    vault = liferaft.Vault(vault_dir)
    first = vault.snapshot([work], run="r", step=1)
    state = tree_state(work)
    (work / "big.bin").write_bytes(os.urandom(12 << 20))  # more than the disk holds

    r = cli("--vault", str(vault_dir), "snapshot", str(work), "--run", "r", "--step", "2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is full" in lines[0] and "committed snapshots are intact" in lines[0]

    vault = liferaft.Vault(vault_dir)
    assert [s.id for s in vault.snapshots()] == [first.id]
    assert vault.verify(read_data=True).ok
    vault.restore(run="r", to=tmp_path / "back")
    assert tree_state(tmp_path / "back" / "work") == state
    # after freeing space (prune removes the half-written garbage), snapshots work again
    (work / "big.bin").unlink()
    liferaft.vault.maintenance.prune(vault.repository(), temp_age=0)
    assert vault.snapshot([work], run="r", step=3).step == 3


def test_full_restore_target_leaves_nothing_half_written(small_fs: Path, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"a.bin": os.urandom(5 << 20), "b.bin": os.urandom(5 << 20)})
    vault = liferaft.Vault(tmp_path / "vault")
    vault.snapshot([work], run="r")
    r = cli("--vault", vault.url, "restore", "--run", "r", "--to", str(small_fs / "out"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    leftovers = [p for p in (small_fs / "out").rglob("*") if p.is_file()]
    assert leftovers == []  # neither partial files under final names nor temp files


class _FullAfter(LocalBackend):
    """A local folder that runs out of space after ``budget`` bytes (simulated ENOSPC)."""

    def __init__(self, root: Path, budget: int) -> None:
        super().__init__(root)
        self.budget = budget

    def put(self, name, data, *, overwrite=False):
        if not name.startswith("locks/"):
            self.budget -= len(data)
            if self.budget < 0:
                raise NoSpace(os.strerror(errno.ENOSPC))
        return super().put(name, data, overwrite=overwrite)


def test_simulated_enospc(tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"a.bin": os.urandom(1 << 20)})
    backend = _FullAfter(tmp_path / "vault", budget=3 << 20)
    repo = Repository.open(backend, create=True)
    first = take_snapshot(repo, [work], run="r")
    packs = sorted((tmp_path / "vault" / "packs").rglob("*"))
    (work / "b.bin").write_bytes(os.urandom(4 << 20))
    with pytest.raises(VaultFull, match="is full"):
        take_snapshot(repo, [work], run="r")
    assert sorted((tmp_path / "vault" / "packs").rglob("*")) == packs  # the failed one's packs are gone again
    vault = liferaft.Vault(tmp_path / "vault")
    assert [s.id for s in vault.snapshots()] == [first.id]
    assert vault.verify(read_data=True).ok
