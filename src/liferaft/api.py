"""The public Python API of the vault."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .backends import BackendError, ObjectNotFound, open_backend
from .config import VaultChoice, default_run_name, resolve_vault
from .errors import LiferaftError, SnapshotNotFound, VaultCorrupt, VaultNotFound
from .progress import Progress, auto_progress
from .vault.format import check_run_name
from .vault.repository import Repository, SnapshotInfo, _wrap_backend_errors

if TYPE_CHECKING:
    from .vault.format import Entry
    from .vault.maintenance import PruneReport, VerifyReport
    from .vault.restore import RestoreResult

__all__ = ["Entry", "PruneReport", "RestoreResult", "SnapshotInfo", "Vault", "VerifyReport"]

# Loaded on first use: a command that only snapshots (or restores) imports neither
# maintenance nor the other half, which keeps `liferaft snapshot` quick to start.
_LAZY = {
    "Entry": "format",
    "PruneReport": "maintenance",
    "VerifyReport": "maintenance",
    "RestoreResult": "restore",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".vault.{_LAZY[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CHECKPOINT_TAG = ("liferaft.kind", "checkpoint")


def is_checkpoint(snap: SnapshotInfo) -> bool:
    """Whether a snapshot is a Checkpointer's ``step-N`` (its retention is the Checkpointer's)."""
    return snap.tags.get(CHECKPOINT_TAG[0]) == CHECKPOINT_TAG[1]


_F = TypeVar("_F", bound=Callable[..., Any])


def _store_errors(what: str) -> Callable[[_F], _F]:
    """A store failure the layers below did not turn into one line (a lock that cannot be
    written on a read-only vault) becomes the LiferaftError the rest of the API raises."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def inner(self: Vault, *args: Any, **kw: Any) -> Any:
            try:
                return fn(self, *args, **kw)
            except BackendError as err:
                if isinstance(err, LiferaftError):
                    raise
                raise _wrap_backend_errors(what, self.url)(err) from err

        return cast(_F, inner)

    return wrap


class Vault:
    """A vault of snapshots, at a folder path or a URL.

    >>> import liferaft
    >>> vault = liferaft.Vault("/content/drive/MyDrive/liferaft")    # doctest: +SKIP
    >>> snap = vault.snapshot(["checkpoints"], run="mnist", step=1200)  # doctest: +SKIP
    >>> vault.restore(run="mnist")                                   # doctest: +SKIP

    With no URL, the vault comes from ``LIFERAFT_VAULT``, a ``liferaft.toml`` in this
    folder or a parent, or the default folder in the user's data directory.
    """

    def __init__(self, url: str | os.PathLike[str] | None = None) -> None:
        self.choice: VaultChoice = resolve_vault(url)
        self.url = self.choice.url
        self.backend = open_backend(self.url, self.choice.options)
        self._repo: Repository | None = None

    def __repr__(self) -> str:
        return f"Vault({self.url!r})"

    # ------------------------------------------------------------ plumbing

    def repository(self, *, create: bool = False) -> Repository:
        if self._repo is None:
            self._repo = Repository.open(self.backend, create=create)
        return self._repo

    def lost_with_the_machine(self) -> str | None:
        """A warning when this is the embedded default vault on a platform whose disk goes
        with its session (Colab, Kaggle, a SkyPilot job's VM), else None: there a run
        "kept" in it is lost by exactly the reset it was meant to survive."""
        if not self.choice.is_default:
            return None
        from .platform import detect

        platform = detect()
        if platform.name == "local" or platform.persistent_home:
            return None
        return (
            f"the vault is the default folder {self.url}, on {platform.label}'s own disk, which is lost with the machine; "
            "choose one that outlives it (a mounted Google Drive folder such as /content/drive/MyDrive/liferaft, "
            "or a gs:// or s3:// bucket) with --vault, vault=, LIFERAFT_VAULT or liferaft.toml"
        )

    def _readable(self, *, missing_ok: bool = False) -> Repository | None:
        """The repository, or None for a default vault nobody has written yet.

        ``missing_ok`` treats any vault not created yet as empty (a first run restores).
        """
        try:
            return self.repository()
        except VaultNotFound:
            if self.choice.is_default or missing_ok:
                return None
            raise

    # ------------------------------------------------------------ API

    @_store_errors("writing a snapshot")
    def snapshot(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        run: str | None = None,
        step: int | None = None,
        tags: dict[str, str] | None = None,
        metrics: dict[str, Any] | None = None,
        progress: Progress | None = None,
        include_secrets: bool = False,
        skip_unchanged: bool = False,
        use_cache: bool = True,
    ) -> SnapshotInfo:
        """Snapshot files and folders and commit them atomically.

        With ``skip_unchanged``, nothing is committed when the tree equals the run's
        newest snapshot: that snapshot is returned with ``unchanged=True``. With
        ``use_cache=False`` every file is read and no stat cache is kept (for folders
        committed once, like a checkpoint's ``step-N/``).

        >>> vault.snapshot(["checkpoints", "runs"], run="mnist", step=500,
        ...                metrics={"val_loss": 0.31})          # doctest: +SKIP
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        run = check_run_name(run if run is not None else default_run_name())  # before a vault is made
        repo = self.repository(create=True)
        from .vault.snapshot import take_snapshot

        progress = progress if progress is not None else auto_progress()
        with progress:  # on any exit, Ctrl-C included: no live bar left on screen, nor "done"
            return take_snapshot(
                repo,
                list(paths),
                run=run,
                step=step,
                tags=tags,
                metrics=metrics,
                progress=progress,
                include_secrets=include_secrets,
                skip_unchanged=skip_unchanged,
                use_cache=use_cache,
            )

    @_store_errors("listing snapshots")
    def snapshots(self, run: str | None = None, *, missing_ok: bool = False, damaged: list[str] | None = None) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first (of one run when ``run`` is given).

        ``missing_ok`` treats a vault nobody has written yet as empty. Manifests that
        cannot be read are left out; ``damaged``, a list, gets a line for each
        (``snapshot 3f2a91c04b7e: ...``).

        >>> damaged = []
        >>> [s.step for s in vault.snapshots(run="mnist", damaged=damaged)]  # doctest: +SKIP
        """
        if run is not None:
            check_run_name(run)
        repo = self._readable(missing_ok=missing_ok)
        if repo is None:
            return []
        snaps = repo.snapshots(damaged=damaged)
        return [s for s in snaps if run is None or s.run == run]

    @_store_errors("restoring")
    def restore(
        self,
        snapshot: str | None = None,
        *,
        run: str | None = None,
        to: str | os.PathLike[str] | None = None,
        targets: Mapping[str, str | os.PathLike[str]] | None = None,
        only: Collection[str] | None = None,
        progress: Progress | None = None,
        use_cache: bool = True,
        replace_newer: bool = True,
        missing_ok: bool = True,
    ) -> RestoreResult | None:
        """Restore a snapshot (by id) or the newest one of ``run`` that verifies.

        Each saved path goes back where it was, or to ``to/NAME``, or to
        ``targets[NAME]`` (NAME is the saved path's last component, see
        ``SnapshotInfo.roots``); ``only`` restores just the named ones. Back where it
        was is refused (``RestoreRefused``) for a snapshot taken on another machine
        whose folder does not exist on this one: pass ``to``. Returns None when there is nothing to restore (a first
        run). A snapshot that fails verification is reported and the one before it is used.
        Checkpoints committed by a ``Checkpointer`` (tag ``liferaft.kind=checkpoint``) are
        its own business: restore and forget by run skip them (restore one by id, or
        through the Checkpointer). ``replace_newer=False`` refuses (``RestoreRefused``,
        nothing written) when a file in the way differs from the snapshot's version and
        was modified after it, as ``liferaft restore`` does without ``--force``.
        A vault not created yet counts as empty (a first run); ``missing_ok=False``
        raises ``VaultNotFound`` instead, as ``liferaft restore`` does, since there a
        missing vault is a mistyped ``--vault`` (the default vault still counts as empty).

        >>> vault.restore(run="mnist", to="/content/work")    # doctest: +SKIP
        """
        from .vault.restore import restore_snapshot

        if snapshot is None:
            run = check_run_name(run or default_run_name())
        progress = progress if progress is not None else auto_progress()
        repo = self._readable(missing_ok=snapshot is None and missing_ok)
        if repo is None:
            if snapshot is not None:
                raise SnapshotNotFound(f"no snapshot {snapshot!r}: the vault at {self.url} is empty")
            return None

        def restore(snap: SnapshotInfo) -> RestoreResult:
            return restore_snapshot(
                repo, snap, to=to, targets=targets, only=only, progress=progress, update_cache=use_cache, replace_newer=replace_newer
            )

        if snapshot is not None:
            return restore(repo.find(snapshot))
        assert run is not None
        candidates = [s for s in repo.snapshots() if s.run == run and not is_checkpoint(s)]
        fallbacks: list[str] = []
        for snap in reversed(candidates):
            try:
                result = restore(snap)
            except VaultCorrupt as err:
                msg = f"snapshot {snap.short_id} ({snap.label}) failed verification: {err}"
                warnings.warn(msg + "; using the one before", stacklevel=2)
                fallbacks.append(msg)
                continue
            result.fallbacks = fallbacks
            return result
        if fallbacks:
            raise VaultCorrupt(
                f"no snapshot of run {run!r} verifies ({len(fallbacks)} tried): {fallbacks[0]}",
                "run `liferaft verify --read-data` to see the damage",
            )
        return None

    def tree(self, snapshot: str | SnapshotInfo) -> list[Entry]:
        """The files, folders and links a snapshot holds (verified as read).

        >>> [e.path for e in vault.tree(vault.snapshots()[-1]) if e.type == "f"]  # doctest: +SKIP
        """
        repo = self.repository()
        snap = snapshot if isinstance(snapshot, SnapshotInfo) else repo.find(snapshot)
        return repo.read_tree(snap)

    @_store_errors("verifying")
    def verify(self, *, read_data: bool = False) -> VerifyReport:
        """Check the vault; ``read_data`` also reads and hashes every stored byte."""
        from .vault import maintenance

        repo = self._readable()
        if repo is None:
            return maintenance.VerifyReport()
        return maintenance.verify(repo, read_data=read_data)

    @_store_errors("forgetting snapshots")
    def forget(self, *, run: str, keep_last: int, prune: bool = False) -> tuple[list[SnapshotInfo], PruneReport | None]:
        """Forget all but the newest ``keep_last`` snapshots of ``run``.

        The newest snapshot that verifies is always kept. With ``prune``, the data
        no snapshot needs any more is deleted.
        """
        from .vault import maintenance

        check_run_name(run)
        repo = self._readable()
        if repo is None:  # the default vault, not written yet: nothing to forget
            maintenance.select_forget([], run, keep_last)  # a bad keep_last is still refused
            return [], maintenance.PruneReport() if prune else None
        snaps = [s for s in repo.snapshots() if not is_checkpoint(s)]  # a Checkpointer keeps its own
        doomed = maintenance.select_forget(snaps, run, keep_last, healthy=lambda s: maintenance.quick_check(repo, s))
        repo.forget([s.id for s in doomed])
        report = self.prune() if prune else None  # its failures named as pruning
        return doomed, report

    @_store_errors("forgetting snapshots")
    def forget_ids(self, ids: Sequence[str], *, damaged: list[str] | None = None) -> list[SnapshotInfo]:
        """Forget snapshots by id (or unique prefix), damaged ones included.

        Every id is looked up before anything is deleted; a snapshot named twice is
        forgotten (and returned) once. A damaged manifest (one ``snapshots()`` leaves
        out) has no ``SnapshotInfo`` to return: ``damaged``, a list, gets its id.
        """
        repo = self._readable()
        if repo is None:
            if ids:
                raise SnapshotNotFound(f"no snapshot with id {ids[0]!r}: the vault at {self.url} is empty")
            return []
        found: dict[str, SnapshotInfo] = {}
        broken: set[str] = set()
        for ref in ids:
            try:
                snap = repo.find(ref)
            except SnapshotNotFound:
                # A manifest too damaged to list, by its file name; never by a prefix too
                # short for find(), which could name a healthy one.
                prefix = ref.strip().lower()
                names = [o.name for o in repo._list("snapshots/") if o.name.split("/")[-1].startswith(prefix)] if len(prefix) >= 4 else []
                if len(names) != 1:
                    raise
                broken.add(names[0])
                continue
            found.setdefault(snap.id, snap)
        for name in sorted(broken):
            try:
                repo.backend.delete(name)
            except ObjectNotFound:
                continue  # forgotten meanwhile
            if damaged is not None:
                damaged.append(name.split("/")[-1].removesuffix(".json"))
        repo.forget(list(found))
        return list(found.values())

    @_store_errors("pruning")
    def prune(self, *, wait: float = 30.0) -> PruneReport:
        """Delete stored data that no snapshot needs (never what a running writer uses)."""
        from .vault import maintenance

        repo = self._readable()
        if repo is None:  # the default vault, not written yet: nothing to prune
            return maintenance.PruneReport()
        return maintenance.prune(repo, wait=wait)

    def flush(self, *, unmount: bool = False) -> bool:
        """Push written data toward the store; True when it is known to be durable there.

        Folders and buckets are durable when a call returns. On a Google Drive mount
        uploads are lazy: ``flush(unmount=True)`` on Colab runs
        ``drive.flush_and_unmount()``, the only way to know every byte reached Drive.

        >>> vault.flush(unmount=True)   # at the end of a Colab session  # doctest: +SKIP
        """
        flush = getattr(self.backend, "flush", None)
        if flush is None:
            return True
        return bool(flush(unmount=unmount))

    @_store_errors("reading it")
    def stats(self) -> dict[str, Any]:
        repo = self._readable()
        if repo is None:
            return {"url": self.url, "snapshots": 0, "packs": 0, "bytes": 0}
        packs = repo._list("packs/")
        return {
            "url": self.url,
            "id": repo.id,
            "snapshots": len(repo.snapshots()),
            "packs": len(packs),
            "bytes": sum(p.size for p in packs),
        }
