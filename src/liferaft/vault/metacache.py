"""Local copies of a remote vault's manifests and index fragments.

Both are immutable and named by the BLAKE3 hash of their bytes, so a copy is either
exactly right or detectably wrong: every copy read back is checked against its name, and
a bad one is fetched again. Only objects the vault lists right now are looked up here,
and only while the listing gives the size and time the copy was taken at: a snapshot
forgotten or a fragment merged elsewhere is never used from the cache (``retain`` drops
their copies), and an object damaged in the vault since (rewritten: a new time) is read
again, so that it is reported as it would be without the cache. Without it every CLI start on S3 or GCS fetches
every manifest and fragment again (200 of each: 1-2.5 s on a loopback server, a round
trip each over a WAN).

Losing the cache costs downloads, never correctness; failing to write it is ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from ..backends import ObjectInfo
from .statcache import cache_dir

KINDS = ("snapshots", "index")


class MetaCache:
    """One vault's cached metadata, under ``cache_dir()/meta/KEY/{snapshots,index}/``."""

    def __init__(self, vault_id: str, url: str, folder: Path | None = None) -> None:
        # Keyed by id and URL: a vault copied elsewhere keeps its id, and two vaults
        # sharing one folder would only make each other's copies go stale.
        key = blake3.blake3(f"{vault_id}\0{url}".encode()).hexdigest()[:32]
        self.root = (folder or cache_dir()) / "meta" / key

    def _path(self, kind: str, object_id: str) -> Path:
        assert kind in KINDS and object_id.isalnum(), (kind, object_id)
        return self.root / kind / object_id

    def get(self, kind: str, listed: ObjectInfo) -> bytes | None:
        """The copy of a listed object, if taken from the same version of it (size and
        time); unchecked: the caller checks it against the object's name."""
        path = self._path(kind, _object_id(listed))
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size != listed.size or st.st_mtime_ns != _stamp(listed):
                    return None
                return f.read()
        except OSError:
            return None

    def put(self, kind: str, listed: ObjectInfo, data: bytes) -> None:
        """Keep ``data``, read from the listed object (its time becomes the copy's)."""
        object_id = _object_id(listed)
        path = self._path(kind, object_id)
        tmp = path.with_name(f".{object_id}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_bytes(data)
            os.utime(tmp, ns=(_stamp(listed), _stamp(listed)))
            os.replace(tmp, path)  # no fsync: a torn copy fails its hash check and is fetched again
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass

    def retain(self, kind: str, live: set[str]) -> None:
        """Drop the copies of objects the vault no longer lists (and stray temp files)."""
        try:
            names = os.listdir(self.root / kind)
        except OSError:
            return
        for name in names:
            if name not in live:
                try:
                    os.unlink(self.root / kind / name)
                except OSError:
                    pass


def _object_id(listed: ObjectInfo) -> str:
    name = listed.name.rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".json") else name


def _stamp(listed: ObjectInfo) -> int:
    return int(listed.mtime * 1e9)
