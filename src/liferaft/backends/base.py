"""The one small interface between the vault and a store of bytes.

A backend knows names and bytes, nothing of snapshots. Names are relative, ``/``
separated (``packs/ab/abcd...``). Every implementation must make ``put(...,
exist_ok=False)`` create-only *atomically* where ``capabilities.create_only`` is
true: that is the vault's commit point.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import LiferaftError


class BackendError(Exception):
    """A store operation failed; ``transient`` says whether a retry may help."""

    transient = False


class StoreError(BackendError, LiferaftError):
    """A store operation failed for good: one line for the user, caught as a BackendError below."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        LiferaftError.__init__(self, what, fix)


class ObjectExists(BackendError):
    """``put`` with ``overwrite=False`` found the name taken."""


class ObjectNotFound(BackendError):
    """``get`` or ``delete`` of a name that is not there."""


class NoSpace(BackendError):
    """The store is full."""


@dataclass(frozen=True)
class Capabilities:
    """What a store can promise.

    create_only: ``put(overwrite=False)`` is atomic and exclusive (O_EXCL/link,
        If-None-Match, ifGenerationMatch=0). Without it two writers racing on one
        name may both believe they won; the vault then relies on unique names.
    atomic_overwrite: ``put(overwrite=True)`` replaces in one step, never torn.
    range_reads: ``get(offset, length)`` reads only those bytes.
    """

    create_only: bool = True
    atomic_overwrite: bool = True
    range_reads: bool = True


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float


def _done() -> None:
    pass


class Backend(abc.ABC):
    """A flat namespace of immutable-ish byte objects."""

    capabilities: Capabilities = Capabilities()
    url: str = ""
    #: Small reads worth doing at once (manifests, index fragments): many for a store
    #: with round trips, one where a read costs microseconds and threads cost more.
    read_concurrency: int = 8
    #: Reads cost a round trip (an object store, a network mount): the vault keeps local
    #: copies of its immutable metadata (manifests, index fragments) in the cache folder.
    remote: bool = False

    @abc.abstractmethod
    def put(self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data`` under ``name``; with ``overwrite=False`` raise ObjectExists if taken."""

    def put_staged(self, name: str, data: bytes | bytearray | memoryview) -> Callable[[], None]:
        """Create-only ``put`` in two steps: write ``data`` now, so the caller may reuse its
        buffer on return, and make it durable and visible when the returned function is
        called (which raises what ``put`` would). By default the whole put happens now."""
        self.put(name, data, overwrite=False)
        return _done

    @abc.abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes from ``offset`` (all of it when ``length`` is None)."""

    def read_into(self, name: str, offset: int, view: memoryview) -> int:
        """Fill ``view`` with bytes from ``offset``; return how many were there."""
        data = self.get(name, offset, len(view))
        view[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object whose name starts with ``prefix`` (a folder, ending in ``/``)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; ObjectNotFound if it is not there."""

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Size and modification time of ``name``; ObjectNotFound if absent."""

    def is_empty(self) -> bool:
        """True when the location holds nothing at all (a fresh vault may go there)."""
        return next(iter(self.list("")), None) is None

    def exists_location(self) -> bool:
        """Whether the location itself exists (a folder, a bucket)."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
