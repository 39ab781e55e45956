"""The local stat cache: an unchanged file (path, size, mtime, inode, ctime) is not read again.

It lives on local disk, keyed by vault and root folder; losing it costs one re-read,
never correctness, because every entry's blobs are checked against the index before use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import blake3

CacheEntry = list[Any]  # [size, mtime_ns, ino, ctime_ns, [blob ids] or SECRET]
SECRET = "secret"  # in place of the blob ids: a file left out for the credentials it holds


def cache_dir() -> Path:
    env = os.environ.get("LIFERAFT_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("liferaft", appauthor=False))


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class StatCache:
    def __init__(self, vault_id: str, root: Path, folder: Path | None = None) -> None:
        key = blake3.blake3(f"{vault_id}\0{root}".encode("utf-8", "surrogateescape")).hexdigest()[:32]  # a name may not be UTF-8
        self.path = (folder or cache_dir()) / "statcache" / f"{key}.json"
        self.entries: dict[str, CacheEntry] = {}

    def load(self) -> StatCache:
        try:
            data = json.loads(self.path.read_bytes())
            if isinstance(data, dict):
                self.entries = data
        except (OSError, ValueError, UnicodeDecodeError):
            self.entries = {}
        return self

    def lookup(self, rel: str, st: os.stat_result) -> list[str] | None:
        e = self.entries.get(rel)
        if not isinstance(e, list) or len(e) != 5:
            return None
        if tuple(e[:4]) != stat_key(st):
            return None
        return e[4] if isinstance(e[4], list) else None

    def known_secret(self, rel: str, st: os.stat_result) -> bool:
        """Whether this version of the file was left out before for holding credentials."""
        e = self.entries.get(rel)
        return isinstance(e, list) and len(e) == 5 and e[4] == SECRET and tuple(e[:4]) == stat_key(st)

    def save(self, entries: dict[str, CacheEntry]) -> None:
        self.entries = entries
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache: losing it costs a re-read, never data
