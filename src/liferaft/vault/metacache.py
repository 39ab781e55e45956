"""Local copies of a remote vault's manifests and index fragments.

Both are immutable and named by the BLAKE3 hash of their bytes, so a copy is either
exactly right or detectably wrong: every copy read back is checked against its name, and
a bad one is fetched again. Only objects the vault lists right now are looked up here,
and only while the listing gives the size and time the copy was taken at (kept in the
copy's first line): a snapshot forgotten or a fragment merged elsewhere is never used
from the cache (``retain`` drops their copies), and an object damaged in the vault since
(rewritten: a new time) is read again, so that it is reported as it would be without
the cache. Without it every command on S3 or GCS reads every manifest and fragment again
(200 of each: 0.3-1.9 s on the loopback test servers, a round trip each over a WAN).

Losing the cache costs downloads, never correctness; failing to write it is ignored.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import blake3

from ..backends import ObjectInfo
from .statcache import cache_dir

KINDS = ("snapshots", "index")
_ID = re.compile(r"[0-9a-f]{64}")


class MetaCache:
    """One vault's cached metadata, under ``cache_dir()/meta/KEY/{snapshots,index}/``."""

    def __init__(self, vault_id: str, url: str, folder: Path | None = None) -> None:
        # Keyed by id and URL: a vault copied elsewhere keeps its id, and two vaults
        # sharing one folder would only make each other's copies go stale.
        key = blake3.blake3(f"{vault_id}\0{url}".encode()).hexdigest()[:32]
        self.root = (folder or cache_dir()) / "meta" / key

    def _path(self, kind: str, object_id: str) -> Path | None:
        """Where a copy goes; None for a name that is no content id (a stray object in the
        vault, which is read from the vault and reported as it always was)."""
        if kind not in KINDS or not _ID.fullmatch(object_id):
            return None
        return self.root / kind / object_id

    def get(self, kind: str, listed: ObjectInfo) -> bytes | None:
        """The copy of a listed object, if taken from the same version of it (size and
        time); unchecked: the caller checks it against the object's name."""
        path = self._path(kind, _object_id(listed))
        head = _header(listed)
        if path is None or head is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if not data.startswith(head) or len(data) - len(head) != listed.size:
            return None
        return data[len(head) :]

    def put(self, kind: str, listed: ObjectInfo, data: bytes) -> None:
        """Keep ``data``, read from the listed object (its size and time go with it)."""
        object_id = _object_id(listed)
        path = self._path(kind, object_id)
        head = _header(listed)
        if path is None or head is None:
            return
        tmp = path.with_name(f".{object_id}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            for folder in (self.root.parent, self.root, path.parent):
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_bytes(head + data)
            os.replace(tmp, path)  # no fsync: a torn copy fails its hash check and is fetched again
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass

    def retain(self, kind: str, live: set[str]) -> None:
        """Drop the copies of objects the vault no longer lists, and temp files an
        interrupted copy left an hour ago or more."""
        folder = self.root / kind
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            name = entry.name
            if _ID.fullmatch(name):
                stale = name not in live
            else:
                try:
                    stale = name.endswith(".tmp") and time.time() - entry.stat().st_mtime > 3600
                except OSError:
                    continue
            if stale:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def _object_id(listed: ObjectInfo) -> str:
    name = listed.name.rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".json") else name


def _header(listed: ObjectInfo) -> bytes | None:
    """What a copy starts with: the listed size and time (ns), which must match to use
    it; None when the listing gives no usable time. (Not the copy's own mtime: NTFS and
    FAT keep coarser times than a store lists.)"""
    try:
        stamp = int(listed.mtime * 1e9)
    except (TypeError, ValueError, OverflowError):
        return None
    if not 0 <= stamp < 1 << 62 or not 0 <= listed.size < 1 << 62:
        return None
    return b"liferaft-copy %d %d\n" % (listed.size, stamp)
