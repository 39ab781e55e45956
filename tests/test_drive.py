"""Google Drive vaults: the Colab mount's rules, and rclone remotes off Colab.

No Drive here: a plain folder stands in for the mount (named in LIFERAFT_DRIVE_MOUNTS,
the way /content/drive is on Colab), and an rclone ``alias`` remote pointing at a plain
folder stands in for a Drive remote. What is checked is what liferaft does to them:
on the mount it never overwrites a file, never renames over a name, never makes a hard
link, and writes each object under a fresh name; flush() calls Colab's own
``drive.flush_and_unmount`` (the only fake here is that Colab module, which cannot run
off Colab).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import liferaft
from conftest import make_tree, tree_state
from liferaft.backends import LocalBackend, ObjectExists, ObjectNotFound, open_backend
from liferaft.backends import drive as drive_mod
from liferaft.backends.drive import GEN_SEP, DriveMountBackend
from liferaft.errors import LiferaftError


@pytest.fixture
def mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plain folder standing in for the Drive mount (/content/drive on Colab)."""
    root = tmp_path / "drive"
    (root / "MyDrive").mkdir(parents=True)
    monkeypatch.setenv("LIFERAFT_DRIVE_MOUNTS", str(root))
    return root


class DriveWatch:
    """Records every file under the mount and fails if one is ever changed in place,
    replaced by a rename, or created by a hard link; also spies (without replacing them)
    on os.rename/os.replace/os.link while the test runs."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.seen: dict[str, tuple[int, str]] = {}
        self.renames = 0
        real_rename, real_replace = os.rename, os.replace

        real_link = os.link

        def on_mount(path: Any) -> bool:
            return Path(os.fspath(path)).absolute().is_relative_to(root)

        def rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            if on_mount(dst):
                assert not os.path.lexists(dst), f"rename over an existing name: {dst}"
                self.renames += 1
            real_rename(src, dst, *a, **kw)

        def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            if on_mount(dst):
                assert not os.path.lexists(dst), f"replace over an existing name: {dst}"
                self.renames += 1
            real_replace(src, dst, *a, **kw)

        def link(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            assert not on_mount(dst), f"a hard link on the Drive mount: {dst}"
            real_link(src, dst, *a, **kw)

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)
        self.check()

    def check(self) -> None:
        now: dict[str, tuple[int, str]] = {}
        for p in self.root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                assert st.st_nlink == 1, f"{p} has {st.st_nlink} links"
                now[p.relative_to(self.root).as_posix()] = (st.st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for name, (ino, digest) in now.items():
            if name in self.seen:
                assert self.seen[name] == (ino, digest), f"{name} was overwritten or renamed over"
        self.seen.update(now)
        for gone in set(self.seen) - set(now):
            del self.seen[gone]  # deleting is allowed; a later file of that name is new


@pytest.fixture(params=["renameat2", "check-then-rename"])
def watch(request: pytest.FixtureRequest, mount: Path, monkeypatch: pytest.MonkeyPatch) -> DriveWatch:
    if request.param == "check-then-rename":
        # A FUSE mount without RENAME_NOREPLACE: the portable path.
        monkeypatch.setattr(drive_mod, "_renameat2", False)
    return DriveWatch(mount, monkeypatch)


# ---------------------------------------------------------------- routing


def test_paths_under_a_drive_mount_get_the_drive_rules(mount: Path, tmp_path: Path) -> None:
    assert isinstance(open_backend(mount / "MyDrive" / "vault"), DriveMountBackend)
    assert isinstance(open_backend(f"file://{mount}/MyDrive/vault"), DriveMountBackend)
    assert isinstance(open_backend("/content/drive/MyDrive/liferaft"), DriveMountBackend)
    plain = open_backend(tmp_path / "elsewhere")
    assert type(plain) is LocalBackend
    assert open_backend(mount / "MyDrive" / "vault").capabilities.create_only is False


def test_an_unmounted_drive_is_one_clear_error_and_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.path.ismount("/content/drive"):
        pytest.skip("Drive is really mounted here")
    src = make_tree(tmp_path / "src", {"f": "1"})
    target = f"/content/drive/MyDrive/liferaft-test-{os.getpid()}"
    with pytest.raises(LiferaftError, match="Google Drive is not mounted at /content/drive") as info:
        liferaft.Vault(target).snapshot([src], run="r")
    assert "drive.mount('/content/drive')" in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(target)
    # A configured stand-in that is missing is refused the same way.
    monkeypatch.setenv("LIFERAFT_DRIVE_MOUNTS", str(tmp_path / "not-there"))
    with pytest.raises(LiferaftError, match="not mounted"):
        liferaft.Vault(tmp_path / "not-there" / "vault").snapshot([src], run="r")
    assert not (tmp_path / "not-there").exists()


# ---------------------------------------------------------------- the rules


def test_objects_are_written_once_under_fresh_names(watch: DriveWatch, mount: Path) -> None:
    backend = open_backend(mount / "MyDrive" / "vault")
    backend.put("packs/ab/one", b"1" * 1000)
    watch.check()
    with pytest.raises(ObjectExists):
        backend.put("packs/ab/one", b"2" * 1000)
    assert backend.get("packs/ab/one") == b"1" * 1000
    watch.check()
    for i in range(4):  # what the vault does to its lock files
        backend.put("locks/session-x.json", b"refresh %d" % i, overwrite=True)
        watch.check()
        assert backend.get("locks/session-x.json") == b"refresh %d" % i
        assert backend.stat("locks/session-x.json").size == len(b"refresh %d" % i)
    on_disk = sorted(p.name for p in (mount / "MyDrive" / "vault" / "locks").iterdir())
    assert len(on_disk) == 1 and on_disk[0].startswith("session-x.json" + GEN_SEP), on_disk
    assert [o.name for o in backend.list("locks/")] == ["locks/session-x.json"]
    with pytest.raises(ObjectExists):
        backend.put("locks/session-x.json", b"new", overwrite=False)
    # Overwriting a name first written create-only (the prune lock does this).
    backend.put("locks/prune.json", b"taken", overwrite=False)
    backend.put("locks/prune.json", b"doomed: [...]", overwrite=True)
    watch.check()
    assert backend.get("locks/prune.json") == b"doomed: [...]"
    assert backend.get("locks/prune.json", 8, 3) == b"[.."
    backend.delete("locks/prune.json")
    backend.delete("locks/session-x.json")
    with pytest.raises(ObjectNotFound):
        backend.delete("locks/session-x.json")
    assert list(backend.list("locks/")) == []
    assert not [p for p in (mount / "MyDrive" / "vault").rglob(".tmp-*")], "temp files left behind"
    assert watch.renames >= 1 or drive_mod._renameat2


def test_an_overwrite_cut_short_reads_as_if_it_never_happened(mount: Path) -> None:
    """A crash between writing a new generation and deleting the old file leaves both:
    readers keep the old bytes (get, stat and list agree) until the next overwrite."""
    backend = open_backend(mount / "MyDrive" / "vault")
    backend.put("locks/prune.json", b"old", overwrite=False)
    folder = mount / "MyDrive" / "vault" / "locks"
    (folder / f"prune.json{GEN_SEP}{1:020d}deadbeef").write_bytes(b"new, never finished")
    assert backend.get("locks/prune.json") == b"old"
    assert [(o.name, o.size) for o in backend.list("locks/")] == [("locks/prune.json", 3)]
    backend.put("locks/prune.json", b"newer", overwrite=True)
    assert backend.get("locks/prune.json") == b"newer"
    assert len(list(folder.iterdir())) == 1


def test_a_whole_vault_life_on_the_mount_never_overwrites(watch: DriveWatch, mount: Path, tmp_path: Path) -> None:
    url = str(mount / "MyDrive" / "liferaft")
    work = make_tree(tmp_path / "work" / "ckpt", {"model.pt": os.urandom(2 << 20), "log.txt": "step 1\n" * 1000})
    vault = liferaft.Vault(url)
    assert isinstance(vault.backend, DriveMountBackend)
    states = []
    for step in range(3):
        (work / "model.pt").write_bytes(os.urandom(2 << 20))
        (work / "log.txt").write_text(f"step {step}\n" * 1000)
        vault.snapshot([work], run="r", step=step)
        states.append(tree_state(work))
        watch.check()
    vault.restore(run="r", to=tmp_path / "back")
    assert tree_state(tmp_path / "back" / "ckpt") == states[-1]
    assert vault.verify(read_data=True).ok
    vault.forget(run="r", keep_last=1, prune=True)
    watch.check()
    fresh = liferaft.Vault(url)
    assert [s.step for s in fresh.snapshots()] == [2]
    assert fresh.verify(read_data=True).ok
    files = [p for p in Path(url).rglob("*") if p.is_file()]
    assert len(files) <= 6, f"few large files on Drive, not {len(files)}: {files}"  # config, packs, index, manifest


def test_flush_calls_colab_flush_and_unmount_only_when_asked(mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = open_backend(mount / "MyDrive" / "vault")
    assert isinstance(backend, DriveMountBackend)
    assert backend.flush(unmount=True) is False  # off Colab: nothing proves the upload
    calls: list[str] = []
    colab = types.ModuleType("google.colab")  # Colab's own module, which cannot run here
    colab_drive = types.ModuleType("google.colab.drive")
    colab_drive.flush_and_unmount = lambda: calls.append("flush_and_unmount")  # type: ignore[attr-defined]
    colab.drive = colab_drive  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", colab_drive)
    assert backend.flush() is False and calls == []  # not asked: Drive stays mounted
    assert backend.flush(unmount=True) is True
    assert calls == ["flush_and_unmount"]


# ---------------------------------------------------------------- off Colab: an rclone remote


@pytest.fixture
def rclone_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An rclone config whose remote ``gdrive-standin`` is a plain folder standing in for
    a Google Drive remote (``rclone config create gdrive drive`` in real life)."""
    root = tmp_path / "remote-root"
    (root / "liferaft").mkdir(parents=True)
    config = tmp_path / "rclone.conf"
    config.write_text(f"[gdrive-standin]\ntype = alias\nremote = {root}\n")
    monkeypatch.setenv("RCLONE_CONFIG", str(config))
    return root


def test_rclone_remote_round_trip(rclone_remote: Path, tmp_path: Path) -> None:
    url = "rclone://gdrive-standin/liferaft/vault"
    work = make_tree(tmp_path / "work" / "ckpt", {"model.pt": os.urandom(3 << 20), "notes": "n"})
    vault = liferaft.Vault(url)
    assert vault.backend.capabilities.create_only is False  # rclone ignores If-None-Match
    snap = vault.snapshot([work], run="r", step=1)
    assert (rclone_remote / "liferaft" / "vault" / "snapshots" / f"{snap.id}.json").is_file()  # it reached the remote
    vault.restore(run="r", to=tmp_path / "back")
    assert tree_state(tmp_path / "back" / "ckpt") == tree_state(work)
    assert vault.verify(read_data=True).ok
    server = vault.backend.rclone  # type: ignore[attr-defined]
    pid = server.proc.pid
    vault.backend.close()
    assert server.proc.poll() is not None, f"rclone (pid {pid}) still running after close()"


def test_rclone_remote_problems_are_one_clear_line(rclone_remote: Path, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"f": "1"})
    env = dict(os.environ)
    cases = {
        "no folder": ("rclone://gdrive-standin/no-such-folder/vault", "rclone mkdir gdrive-standin:no-such-folder"),
        "no remote": ("rclone://no-such-remote/liferaft/vault", "rclone config"),
        "no path": ("rclone://gdrive-standin", "rclone://REMOTE/FOLDER/vault"),
    }
    for _name, (url, needle) in cases.items():
        r = subprocess.run(
            [sys.executable, "-m", "liferaft", "--vault", url, "snapshot", str(src)], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr


def test_abandoning_runs_final_snapshot_stops_the_vaults_rclone_server(rclone_remote: Path, tmp_path: Path) -> None:
    """An rclone:// vault runs its own ``rclone serve s3``. A third Ctrl-C abandons run's
    final snapshot and ends the process without exit hooks: that server must stop too,
    not outlive liferaft as an orphan holding the remote's credentials."""
    import signal

    import psutil

    from test_run_support import CHECKPOINT_6MIB_THEN_WAIT, STARTED, no_traceback, wait_for

    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "stderr.log"
    # 6 MiB of checkpoint through rclone held to 1 MiB/s (RCLONE_BWLIMIT, an rclone flag
    # set by environment): the final snapshot's upload lasts ~6 s
    script = CHECKPOINT_6MIB_THEN_WAIT
    remote_vault = rclone_remote / "liferaft" / "vault"
    url = "rclone://gdrive-standin/liferaft/vault"
    argv = [sys.executable, "-m", "liferaft", "--vault", url, "run", "--keep", "ckpt", "--every", "1h", "--", sys.executable, "-c", script]
    with open(log, "w") as err_file:
        proc = subprocess.Popen(
            argv,
            cwd=work,
            env={**os.environ, "RCLONE_BWLIMIT": "1M"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,
        )
    STARTED.append(proc)
    servers: list[psutil.Process] = []
    try:
        wait_for(lambda: (work / "ready").exists(), timeout=60, what="the command's checkpoint")
        servers = [p for p in psutil.Process(proc.pid).children() if p.name().startswith("rclone")]
        assert len(servers) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children()]
        proc.send_signal(signal.SIGINT)  # 1: passed on; the command stops, the final snapshot starts
        wait_for(lambda: any((remote_vault / "locks").glob("session-*")), timeout=15, what="the final snapshot's session lock")
        proc.send_signal(signal.SIGINT)  # 2: only says what is going on
        wait_for(lambda: "Ctrl-C again to abandon it" in log.read_text(), timeout=5, what="the line about the final snapshot")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGINT)  # 3: abandon it
        rc = proc.wait(timeout=20)
        err = log.read_text()
        no_traceback(err)
        assert rc == 128 + signal.SIGINT, err
        assert "abandoned the final snapshot after" in err, err
        wait_for(
            lambda: not servers[0].is_running() or servers[0].status() == psutil.STATUS_ZOMBIE, timeout=10, what="rclone serve s3 to stop"
        )
        assert not list((remote_vault / "snapshots").glob("*.json")), "an abandoned snapshot was committed"
    finally:
        for p in servers:
            if p.is_running():
                p.kill()
