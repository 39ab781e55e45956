"""A vault on any fsspec file system (``memory://`` for tests; object stores later)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from .base import Backend, BackendError, Capabilities, ObjectExists, ObjectInfo, ObjectNotFound

# fsspec's memory store lives in one process, so one lock makes create-only exclusive.
_MEMORY_LOCK = threading.Lock()


class FsspecBackend(Backend):
    """Objects are files of an fsspec file system under ``root``."""

    def __init__(self, url: str, fs: Any = None, **storage_options: Any) -> None:
        import fsspec

        if fs is None:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
        else:
            root = fs._strip_protocol(url)
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._memory = protocol == "memory"
        # Only the in-process memory store can promise exclusive create through fsspec.
        self.capabilities = Capabilities(create_only=self._memory, atomic_overwrite=True, range_reads=True)
        self.read_concurrency = 1 if self._memory else 8
        self.remote = not self._memory

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise BackendError(f"refusing object name {name!r}")
        return f"{self.root}/{name}" if name else self.root

    def put(self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
        path = self._path(name)
        blob = bytes(data)
        if self._memory:
            with _MEMORY_LOCK:
                if not overwrite and self.fs.exists(path):
                    raise ObjectExists(name)
                self.fs.pipe_file(path, blob)
            return
        if not overwrite and self.fs.exists(path):
            raise ObjectExists(name)
        self.fs.pipe_file(path, blob)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            end = None if length is None else offset + length
            return bytes(self.fs.cat_file(path, start=offset or None, end=end))
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    def stat(self, name: str) -> ObjectInfo:
        try:
            info = self.fs.info(self._path(name))
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        if info.get("type") == "directory":
            raise ObjectNotFound(name)
        return ObjectInfo(name, int(info.get("size") or 0), _mtime(info))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return
        cut = len(self.root) + 1
        for path, info in sorted(found.items()):
            path = path.lstrip("/") if not self.root.startswith("/") else path
            rel = path[cut:] if path.startswith(self.root + "/") else path.split(self.root + "/", 1)[-1]
            yield ObjectInfo(rel, int(info.get("size") or 0), _mtime(info))

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    def exists_location(self) -> bool:
        return bool(self.fs.exists(self.root)) or self._memory

    def is_empty(self) -> bool:
        try:
            return not self.fs.find(self.root)
        except FileNotFoundError:
            return True


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "created", "LastModified", "updated"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return 0.0
