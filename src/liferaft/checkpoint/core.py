"""The Checkpointer: async save, verified restore, retention, all mirrored into the vault."""

from __future__ import annotations

import difflib
import functools
import operator
import os
import pickle
import shutil
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import default_run_name
from ..errors import LiferaftError, VaultCorrupt, VaultFull, VaultUnreachable
from ..platform import register_exit_hook
from ..vault.format import check_run_name
from . import folder as fs
from .retention import Policy, select_keep
from .state import PICKLE, TENSORS, CheckpointDamaged, StagingPool, decode, read_bytes, read_tensors, stage

if TYPE_CHECKING:
    from ..api import Vault
    from ..vault.repository import SnapshotInfo

KIND_TAG = "liferaft.kind"
FOLDER_TAG = "liferaft.folder"
MANIFEST_TAG = "liferaft.manifest"


class CheckpointWarning(UserWarning):
    """A checkpoint was damaged (liferaft used another one) or could not be cleaned up."""


class CheckpointSaveFailed(LiferaftError):
    """A save that ran in the background failed; the checkpoints before it are intact."""


@dataclass
class Restored:
    """What :meth:`Checkpointer.restore` returns.

    ``state`` is the object given to ``save`` (tensors on the CPU), or None for a folder
    a framework wrote (see :meth:`Checkpointer.save_folder`); ``path`` is its folder on
    local disk; ``source`` says where it came from (``"local"`` or ``"vault"``).
    """

    step: int
    state: Any
    metrics: dict[str, float]
    path: Path
    source: str
    snapshot_id: str | None = None
    fallbacks: list[str] = field(default_factory=list)


@dataclass
class CheckpointInfo:
    """One checkpoint as listed by :meth:`Checkpointer.checkpoints`."""

    step: int
    metrics: dict[str, float]
    path: Path | None  # its folder on this machine, if there is one
    snapshots: list[SnapshotInfo]  # its snapshots in the vault, oldest first
    committed: bool  # the local folder is in the vault (always True when there is no local folder)


@dataclass
class _Local:
    folder: Path
    manifest: fs.Manifest | None
    error: CheckpointDamaged | None = None


def _check_step(step: Any) -> int:
    if isinstance(step, bool):
        raise LiferaftError(f"step must be an integer, got {step!r}", "pass the global step, e.g. ck.save(1200, state)")
    try:
        value = operator.index(step)
    except TypeError:
        raise LiferaftError(f"step must be an integer, got {step!r}", "pass the global step, e.g. ck.save(1200, state)") from None
    if value < 0:
        raise LiferaftError(f"step must not be negative, got {value}", "pass the global step, e.g. ck.save(1200, state)")
    return value


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, (bool, str)):
            raise LiferaftError(f"metric {k!r} is {v!r}, not a number", "pass numbers, e.g. metrics={'val_loss': 0.31}")
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise LiferaftError(f"metric {k!r} is {v!r}, not a number", "pass numbers, e.g. metrics={'val_loss': 0.31}") from None
    return out


def _await(fut: Future[None], timeout: float | None) -> bool:
    """Wait for a background job; False on timeout. Its own failure is left to ``_raise_error``."""
    try:
        fut.result(timeout=timeout)
    except BaseException as err:
        if fut.done() and err is fut.exception():
            return True  # recorded by the job wrapper, raised by _raise_error
        if isinstance(err, FutureTimeout) and not fut.done():
            return False
        raise  # e.g. KeyboardInterrupt while waiting: never swallowed
    return True


def folder_identity(directory: Path) -> str:
    """How a checkpoints folder is known in the vault (its ``liferaft.folder`` tag).

    The path relative to the working folder (``checkpoints``, ``runs/lr0.1/checkpoints``),
    else relative to the home folder (``~/ckpt``), else absolute: the same on a fresh
    machine with the same layout, and different for two folders of one run (a sweep
    writing ``runs/*/checkpoints`` under one run name must not take another's weights).
    """
    for base, lead in ((Path(os.getcwd()), ""), (Path.home(), "~/")):
        try:
            rel = directory.relative_to(base).as_posix()
        except ValueError:
            continue
        return lead + rel if rel != "." else directory.name or "/"
    return directory.as_posix()


def _same_tail(a: str, b: str) -> bool:
    """True when one folder path ends with the other, by whole names (``ck`` and ``/content/ck``)."""
    pa = [p for p in a.removeprefix("~/").split("/") if p]
    pb = [p for p in b.removeprefix("~/").split("/") if p]
    n = min(len(pa), len(pb))
    return n > 0 and pa[-n:] == pb[-n:]


def _finish_at_exit(ref: weakref.ReferenceType[Checkpointer]) -> None:
    """The script ends (or dies of an exception) while saves are in flight: finish them,
    while uploads can still start. Without this the newest checkpoint, written locally
    but not committed, was lost with the machine."""
    ck = ref()
    if ck is None or ck._closed:
        return
    pending = sum(not f.done() for f in ck._inflight)
    if pending:
        print(f"liferaft: finishing {pending} checkpoint save{'s' if pending > 1 else ''} before exit", file=sys.stderr, flush=True)
    try:
        ck.close()
    except LiferaftError as err:  # nobody is left to catch it: say it
        print(f"liferaft: {err}", file=sys.stderr, flush=True)


def _stacklevel() -> int:
    """The stacklevel of the first frame outside liferaft, so a warning names the user's line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    if frame is None or frame.f_code.co_filename.endswith(("threading.py", "thread.py")):
        return 1  # a background save: no line of the user's to name
    return level


class Checkpointer:
    """Checkpoints saved in the background, restored verified, kept by rules, mirrored to the vault.

    ``save(step, state)`` copies ``state`` into host memory and returns; a background
    thread writes ``DIRECTORY/step-N/`` (temp folder, then rename, with a manifest of
    hashes), commits it to the vault as a snapshot of ``run`` tagged with the step and
    metrics, then applies retention. ``restore()`` returns the newest checkpoint that
    verifies, from local disk or else from the vault, falling back (with a warning naming
    the damaged one) to older ones.

    Parameters
    ----------
    directory
        The local checkpoints folder.
    run
        The run name in the vault (default: ``LIFERAFT_RUN``, which ``liferaft run`` sets,
        then ``liferaft.toml``, then the working folder's name).
    vault
        A :class:`liferaft.Vault`, a vault URL or path, None for the usual choice
        (``LIFERAFT_VAULT``, ``liferaft.toml``, the default folder), or False for local
        checkpoints only.
    keep_last, keep_best, monitor, mode, keep_every
        Retention: the newest ``keep_last`` (None: all), the ``keep_best`` best by
        ``metrics[monitor]`` (``mode`` "min" or "max"), and every step that is a multiple
        of ``keep_every``. Never deleted whatever the rules: the newest verified
        checkpoint, the one this process resumed from, one not yet in the vault. Applied
        after each save, to the folder and the vault alike.
    max_pending
        Saves allowed in flight; a further ``save`` waits (back-pressure, bounded memory).
    prefix
        Checkpoint folders are named ``prefix + step`` (``"checkpoint-"`` for Hugging Face).
    prune
        After retention forgets snapshots, delete their data from the vault
        (``Vault.prune(wait=0)``: skipped while another writer is active; ``liferaft prune``
        finishes the job). False leaves it to ``liferaft prune``.
    allow_pickle
        Objects other than arrays, tensors and plain values are pickled into
        ``other.pkl``. Restore unpickles them only from your own folder and vault. False
        refuses them: ``save`` raises (naming them) before anything is written, and
        ``restore`` will not load a checkpoint that holds them.

    Examples
    --------
    >>> import liferaft
    >>> ck = liferaft.Checkpointer("checkpoints", run="mnist", keep_last=3, keep_best=1,
    ...                            monitor="val_loss", mode="min")      # doctest: +SKIP
    >>> r = ck.restore()                       # None on a first run    # doctest: +SKIP
    >>> start = r.step + 1 if r else 0                                  # doctest: +SKIP
    >>> ck.save(100, {"model": model.state_dict()}, metrics={"val_loss": 0.31})  # doctest: +SKIP
    >>> ck.wait()                              # raises if a background save failed  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = "checkpoints",
        *,
        run: str | None = None,
        vault: Vault | str | os.PathLike[str] | Literal[False] | None = None,
        keep_last: int | None = 3,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        max_pending: int = 1,
        prefix: str = "step-",
        prune: bool = True,
        allow_pickle: bool = True,
    ) -> None:
        self.directory = Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))
        self.run = check_run_name(run or default_run_name())
        self.policy = Policy(
            keep_last=keep_last,
            keep_best=(1 if monitor else 0) if keep_best is None else keep_best,
            monitor=monitor,
            mode=mode,
            keep_every=keep_every,
        )
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise LiferaftError(f"max_pending={max_pending!r} must be 1 or more", "pass max_pending=1 (the default)")
        if not prefix or "/" in prefix or prefix.startswith("."):
            raise LiferaftError(f"prefix={prefix!r} cannot name a folder", 'pass prefix="step-"')
        self.max_pending = max_pending
        self.prune = prune
        self.allow_pickle = allow_pickle
        self._naming = fs.Naming(self.directory, prefix)
        self._folder_tag = folder_identity(self.directory)
        self.vault: Vault | None
        if vault is False:
            self.vault = None
        else:
            from ..api import Vault

            self.vault = vault if isinstance(vault, Vault) else Vault(vault)
            lost = self.vault.lost_with_the_machine()
            if lost:
                warnings.warn(f"liferaft: {lost}", CheckpointWarning, stacklevel=2)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="liferaft-checkpoint")
        self._inflight: list[Future[None]] = []
        self._lock = threading.Lock()
        self._vault_lock = threading.RLock()
        self._error: tuple[int, BaseException] | None = None
        self._pools: list[StagingPool] = []
        self._pool_count = 0
        self._resumed: tuple[int, str | None] | None = None
        self._newest_good: int | None = None
        self._damaged_local: set[int] = set()
        self._damaged_snaps: set[str] = set()
        self._caught_up = self.vault is None
        self._local_only: set[int] = set()  # saved here while the vault could not be reached
        self._monitor_seen = False
        self._other_folders: list[str] = []  # checkpoint folders of this run in the vault that are not this one
        self._metrics_seen: set[str] = set()
        self._warned: set[str] = set()
        self._closed = False
        self._naming.clean_work()
        register_exit_hook(functools.partial(_finish_at_exit, weakref.ref(self)))
        weakref.finalize(self, self._executor.shutdown, wait=False)

    def __repr__(self) -> str:
        where = self.vault.url if self.vault is not None else "no vault"
        return f"Checkpointer({str(self.directory)!r}, run={self.run!r}, vault={where!r})"

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def prefix(self) -> str:
        return self._naming.prefix

    @property
    def resumed_step(self) -> int | None:
        """The step this process restored, or None."""
        return self._resumed[0] if self._resumed else None

    # ------------------------------------------------------------ save

    def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None) -> None:
        """Save ``state`` as checkpoint ``step``: copy it to host memory now, write and commit it in the background.

        ``state`` is a dict (or list, tuple) of torch tensors, numpy arrays, plain values
        and, as a pickled fallback, other objects (refused with ``allow_pickle=False``).
        Returns once the copy is taken: the caller may go on changing the tensors. Waits
        first while ``max_pending`` saves are in flight, and raises if an earlier
        background save failed.

        >>> ck.save(step, {"model": model.state_dict(), "opt": opt.state_dict()},
        ...         metrics={"val_loss": 0.31})                            # doctest: +SKIP
        """
        self._check_open()
        step = _check_step(step)
        clean = _check_metrics(metrics)
        self._check_monitor(clean)
        self._throttle(self.max_pending - 1)
        pool = self._take_pool()
        try:
            staged = stage(state, pool, allow_pickle=self.allow_pickle)
        except BaseException:
            self._give_pool(pool)
            raise
        self._submit(step, self._job_save, step, staged, clean, pool)

    def save_folder(self, step: int, folder: str | os.PathLike[str] | None = None, *, metrics: Mapping[str, Any] | None = None) -> None:
        """Commit a folder a framework wrote (e.g. a Hugging Face ``checkpoint-N``) as checkpoint ``step``.

        The folder must be complete and not change afterwards. It is moved to
        ``DIRECTORY/PREFIX+step`` unless it is there already; hashing and committing
        happen in the background.

        >>> ck.save_folder(500, "out/checkpoint-500", metrics={"eval_loss": 0.4})  # doctest: +SKIP
        """
        self._check_open()
        step = _check_step(step)
        clean = _check_metrics(metrics)
        self._check_monitor(clean)
        target = self._naming.path(step)
        source = Path(os.path.abspath(os.fspath(folder))) if folder is not None else target
        if not source.is_dir():
            raise LiferaftError(f"{source} is not a folder", "pass the folder the framework wrote")
        self._throttle(self.max_pending - 1)
        if source != target:
            if os.path.lexists(target):
                raise LiferaftError(f"{target} already exists", f"save step {step} once, or remove {target}")
            self.directory.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
        self._submit(step, self._job_folder, step, target, clean)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every background save is written and committed; raise if one failed.

        A checkpoint saved while the vault could not be reached (kept in the folder, with a
        warning) is committed now; if the vault still cannot be reached, this raises
        :class:`CheckpointSaveFailed` naming it.

        >>> ck.wait()     # e.g. before the notebook's runtime goes away      # doctest: +SKIP
        """
        self._drain(timeout)
        if self._local_only:
            self._commit_local_only()

    def _drain(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for fut in list(self._inflight):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _await(fut, left):
                raise LiferaftError(f"checkpoint saves still running after {timeout}s", "call wait() again, or wait() with no timeout")
        self._prune_done()
        self._raise_error()

    def _commit_local_only(self) -> None:
        """Commit what was saved while the vault could not be reached; raise if it still cannot be."""
        try:
            with self._vault_lock:
                self._catch_up(exclude=None)
        except (VaultUnreachable, VaultFull) as err:
            names = ", ".join(self._naming.name(s) for s in sorted(self._local_only))
            what = f"checkpoints {names} are" if len(self._local_only) > 1 else f"checkpoint {names} is"
            raise CheckpointSaveFailed(
                f"{what} saved in {self.directory} only: the vault cannot take them ({err.what})",
                "call wait() again once it can; the next save, or the next run's first save, commits them",
            ) from None
        self._local_only.clear()

    def close(self) -> None:
        """Wait for background saves, stop the worker and free the staging memory.

        Raises if a save failed, or if a checkpoint saved while the vault could not be
        reached still cannot be committed (it stays in the folder).
        """
        if self._closed:
            return
        try:
            self._warn_monitor_never_seen()
            self.wait()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            self._pools.clear()

    # ------------------------------------------------------------ restore

    def restore(self, step: int | None = None, *, best: bool = False) -> Restored | None:
        """The newest checkpoint that verifies (or ``step=N``, or the ``best=True`` one); None on a first run.

        Local folders are tried first; a checkpoint missing or damaged here comes from the
        vault (and is put back in the folder). A damaged one is skipped with a
        :class:`CheckpointWarning` naming it, and the one before is used.

        >>> r = ck.restore()                                                # doctest: +SKIP
        >>> if r is not None:
        ...     model.load_state_dict(r.state["model"]); start = r.step + 1  # doctest: +SKIP
        """
        return self._restore(step, best, load=True)

    def restore_path(self, step: int | None = None, *, best: bool = False) -> Path | None:
        """Like :meth:`restore`, but only make sure the folder is on local disk and verified; return it.

        >>> trainer.train(resume_from_checkpoint=ck.restore_path())          # doctest: +SKIP
        """
        r = self._restore(step, best, load=False)
        return r.path if r is not None else None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Checkpoints of this run, here and in the vault, oldest step first."""
        local = self._local()
        remote = self._remote(strict=False)
        out = []
        for step in sorted(set(local) | set(remote)):
            loc = local.get(step)
            snaps = remote.get(step, [])
            m = loc.manifest if loc else None
            metrics = m.metrics if m else (snaps[-1].metrics if snaps else {})
            committed = m is None or any(s.tags.get(MANIFEST_TAG) == m.checksum for s in snaps)
            out.append(CheckpointInfo(step, dict(metrics), loc.folder if loc else None, snaps, committed or self.vault is None))
        return out

    # ------------------------------------------------------------ metric checks

    def _check_monitor(self, metrics: dict[str, float]) -> None:
        """Warn once when saved metrics lack ``monitor`` but have a name close to it (a typo)."""
        monitor = self.policy.monitor
        if not monitor or not metrics:
            return
        if monitor in metrics:
            self._monitor_seen = True
            return
        self._metrics_seen.update(metrics)
        if "monitor" in self._warned:
            return
        # "accuracy" beside monitor="val_accuracy" is the training-time metric, not a typo
        names = [k for k in metrics if not monitor.endswith("_" + k)]
        near = [k for k in names if k.startswith(monitor) or monitor.startswith(k)]
        near += difflib.get_close_matches(monitor, names, n=1, cutoff=0.75)
        if near:
            self._warned.add("monitor")
            warnings.warn(
                f"liferaft: the metrics have no {monitor!r}, the Checkpointer's monitor; did you mean {near[0]!r}? "
                f"Retention ranks checkpoints by {monitor!r} only",
                CheckpointWarning,
                stacklevel=_stacklevel(),
            )

    def _warn_monitor_never_seen(self) -> None:
        monitor = self.policy.monitor
        if monitor and not self._monitor_seen and self._metrics_seen and "monitor" not in self._warned:
            self._warned.add("monitor")
            had = ", ".join(sorted(self._metrics_seen)[:6])
            warnings.warn(
                f"liferaft: no checkpoint saved had the metric {monitor!r} (they had: {had}), so keep_best kept none by it; "
                "pass monitor= one of those names",
                CheckpointWarning,
                stacklevel=_stacklevel(),
            )

    # ------------------------------------------------------------ background plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise LiferaftError("this Checkpointer is closed", "create a new one")

    def _take_pool(self) -> StagingPool:
        with self._lock:
            if self._pools:
                return self._pools.pop()
            self._pool_count += 1
            return StagingPool()

    def _give_pool(self, pool: StagingPool) -> None:
        with self._lock:
            if not self._closed:
                self._pools.append(pool)

    def _prune_done(self) -> None:
        with self._lock:
            self._inflight = [f for f in self._inflight if not f.done()]

    def _throttle(self, limit: int) -> None:
        """Wait until at most ``limit`` saves are in flight, then raise any background failure."""
        while True:
            self._prune_done()
            if len(self._inflight) <= limit:
                break
            _await(self._inflight[0], None)
        self._raise_error()

    def _raise_error(self) -> None:
        with self._lock:
            failed, self._error = self._error, None
        if failed is None:
            return
        step, err = failed
        name = self._naming.name(step)
        fix = (
            err.fix if isinstance(err, LiferaftError) and err.fix else "the checkpoints before it are intact; fix the cause and save again"
        )
        what = err.what if isinstance(err, LiferaftError) else f"{type(err).__name__}: {err}"
        raise CheckpointSaveFailed(f"saving checkpoint {name} failed in the background: {what}", fix) from err

    def _submit(self, step: int, fn: Callable[..., None], *args: Any) -> None:
        def job() -> None:
            try:
                fn(*args)
            except BaseException as err:
                with self._lock:
                    if self._error is None:
                        self._error = (step, err)
                raise

        fut = self._executor.submit(job)
        with self._lock:
            self._inflight.append(fut)

    def _warn(self, message: str) -> None:
        warnings.warn(f"liferaft: {message}", CheckpointWarning, stacklevel=_stacklevel())

    # ------------------------------------------------------------ background jobs

    def _job_save(self, step: int, staged: Any, metrics: dict[str, float], pool: StagingPool) -> None:
        try:
            folder, manifest = fs.write_checkpoint(self._naming, self.run, step, metrics, staged)
        finally:
            self._give_pool(pool)
        self._publish(step, folder, manifest, remove_on_failure=True)

    def _job_folder(self, step: int, folder: Path, metrics: dict[str, float]) -> None:
        files = fs.describe_folder(folder)
        manifest = fs.Manifest(run=self.run, step=step, time_ns=time.time_ns(), metrics=metrics, files=files)
        fs.write_manifest(folder, manifest)
        self._publish(step, folder, manifest, remove_on_failure=False)

    def _publish(self, step: int, folder: Path, manifest: fs.Manifest, *, remove_on_failure: bool) -> None:
        """Commit a complete local checkpoint to the vault, then apply retention."""
        self._damaged_local.discard(step)
        try:
            self._catch_up(exclude=step)
            self._commit(folder, manifest)
        except (VaultUnreachable, VaultFull) as err:
            # The checkpoint is whole on local disk: training goes on, and it is committed
            # by the next save or wait() (deleting it would lose the newest state).
            self._mark_good(step)
            self._caught_up = False
            if not self._local_only:
                self._warn(
                    f"the vault cannot take checkpoints ({err.what}); checkpoint {folder.name} is kept in {self.directory} "
                    "only until it can, and committed by the next save or wait()"
                )
            self._local_only.add(step)
            return
        except BaseException:
            # A failed save never becomes "latest": its folder goes (or, for a framework's
            # folder, its manifest, so it no longer counts as a checkpoint).
            if remove_on_failure:
                fs.remove(self._naming, folder)
            else:
                try:
                    os.unlink(folder / fs.MANIFEST)
                except OSError:
                    pass
            raise
        self._mark_good(step)
        self._local_only.clear()  # the catch-up committed them
        try:
            self._retain(step)
        except LiferaftError as err:
            self._warn(f"retention after saving {folder.name} failed ({err}); it runs again after the next save")

    def _mark_good(self, step: int) -> None:
        self._newest_good = step if self._newest_good is None else max(self._newest_good, step)

    def _commit(self, folder: Path, manifest: fs.Manifest) -> SnapshotInfo | None:
        if self.vault is None:
            return None
        tags = {KIND_TAG: "checkpoint", FOLDER_TAG: self._folder_tag, MANIFEST_TAG: manifest.checksum}
        with self._vault_lock:
            # Committed once: no stat cache entry to pile up.
            info = self.vault.snapshot(
                [folder], run=self.run, step=manifest.step, tags=tags, metrics=fs.finite_metrics(manifest.metrics), use_cache=False
            )
            skipped = info.stats.get("skipped") or []
            if info.stats.get("changed_during_read") or skipped:
                self.vault.forget_ids([info.id])
                if skipped:  # "<path>: <reason>", a file or folder that could not be read
                    raise CheckpointDamaged(
                        f"{folder.name} could not be read whole ({skipped[0]})",
                        "make the checkpoint folder readable (permissions, the disk or mount it is on) and save again",
                    )
                raise CheckpointDamaged(
                    f"{folder.name} changed while it was committed", "make sure nothing writes to a checkpoint folder after saving it"
                )
        return info

    def _catch_up(self, exclude: int | None) -> None:
        """Commit local checkpoints a crashed process wrote but never committed (once per process)."""
        if self._caught_up:
            return
        local = self._local()
        remote = self._remote(strict=True)
        for step, loc in sorted(local.items()):
            m = loc.manifest
            if step == exclude or m is None or any(s.tags.get(MANIFEST_TAG) == m.checksum for s in remote.get(step, [])):
                continue
            try:
                fs.verify_files(loc.folder, m)
            except CheckpointDamaged as err:
                self._damaged_local.add(step)
                self._warn(f"checkpoint {loc.folder.name} in {self.directory} is damaged ({err}); it is not committed to the vault")
                continue
            try:
                self._commit(loc.folder, m)
            except CheckpointDamaged as err:  # changed while read: this one only, not the vault
                self._warn(f"checkpoint {loc.folder.name} could not be committed ({err.what}); it stays local")
        self._caught_up = True

    # ------------------------------------------------------------ inventory

    def _local(self) -> dict[int, _Local]:
        out: dict[int, _Local] = {}
        for step, folder in self._naming.scan().items():
            if not (folder / fs.MANIFEST).exists():
                continue  # written only in part, or not ours: never restored, never deleted
            try:
                m = fs.read_manifest(folder)
            except CheckpointDamaged as err:
                out[step] = _Local(folder, None, err)
                continue
            if m.run != self.run or m.step != step:
                continue  # another run's checkpoint in this folder: leave it alone
            out[step] = _Local(folder, m)
        return out

    def _remote(self, *, strict: bool) -> dict[int, list[SnapshotInfo]]:
        """Vault snapshots of this run's checkpoints, by step, oldest first."""
        if self.vault is None:
            return {}
        try:
            with self._vault_lock:
                snaps = self.vault.snapshots(run=self.run, missing_ok=True)
        except VaultUnreachable as err:
            if strict:
                raise
            self._warn(f"the vault cannot be reached ({err.what}); using local checkpoints only")
            return {}
        out: dict[int, list[SnapshotInfo]] = {}
        for s in self._mine([s for s in snaps if s.tags.get(KIND_TAG) == "checkpoint" and isinstance(s.step, int)]):
            out.setdefault(s.step, []).append(s)  # type: ignore[arg-type]
        for lst in out.values():
            lst.sort(key=lambda s: (s.time_ns, s.id))
        return out

    def _mine(self, snaps: list[SnapshotInfo]) -> list[SnapshotInfo]:
        """The checkpoint snapshots of this run that belong to this folder.

        Those tagged with its identity (see :func:`folder_identity`), or written before the
        tag held a path (``liferaft.folder=<base name>``) from this very folder. Failing
        those, a fresh machine may see the same folder from another working folder: the
        one folder whose path ends like this one's (``ck`` for ``/content/ck``), if only
        one does.
        """
        mine = [s for s in snaps if s.tags.get(FOLDER_TAG) == self._folder_tag or self._legacy_here(s)]
        self._other_folders = sorted({t for s in snaps if isinstance(t := s.tags.get(FOLDER_TAG), str)} - {self._folder_tag})
        if mine or not snaps:
            return mine
        fits = {tag for s in snaps if isinstance(tag := s.tags.get(FOLDER_TAG), str) and _same_tail(tag, self._folder_tag)}
        if len(fits) == 1:
            return [s for s in snaps if s.tags.get(FOLDER_TAG) in fits]
        return []

    def _legacy_here(self, snap: SnapshotInfo) -> bool:
        roots = snap.roots
        return (
            snap.tags.get(FOLDER_TAG) == self.directory.name
            and len(roots) == 1
            and isinstance(roots[0].get("source"), str)
            and os.path.dirname(roots[0]["source"]) == str(self.directory)
        )

    # ------------------------------------------------------------ retention

    def _retain(self, saved: int) -> None:
        local = self._local()
        remote = self._remote(strict=True)
        newest = max(set(local) | set(remote), default=saved)
        if saved < newest and "older" not in self._warned:
            self._warned.add("older")
            name, top = self._naming.name(saved), self._naming.name(newest)
            if self._resumed is None:
                how = "call restore() first to resume, or use another run name or folder to start over"
            else:
                how = f"this process resumed from {self._naming.name(self._resumed[0])}; to branch off, use another run name or folder"
            self._warn(
                f"checkpoint {name} is older than {top}, saved before for run {self.run!r}: retention keeps the newest "
                f"steps, so it deletes the new ones first, and the next restore() takes {top}; {how}"
            )
        protect: set[int] = set()
        if self._newest_good is not None:
            protect.add(self._newest_good)
        if self._resumed is not None:
            protect.add(self._resumed[0])
        metrics: dict[int, dict[str, float]] = {}
        alive: set[int] = set()
        for step in set(local) | set(remote):
            loc = local.get(step)
            good_snaps = [s for s in remote.get(step, []) if s.id not in self._damaged_snaps]
            local_ok = loc is not None and loc.manifest is not None and step not in self._damaged_local
            if local_ok and self.vault is not None:
                assert loc is not None and loc.manifest is not None
                checksum = loc.manifest.checksum
                if not any(s.tags.get(MANIFEST_TAG) == checksum for s in remote.get(step, [])):
                    protect.add(step)  # not in the vault yet: never deleted
            if local_ok or good_snaps:
                alive.add(step)
                if local_ok:
                    assert loc is not None and loc.manifest is not None
                    metrics[step] = loc.manifest.metrics
                else:
                    metrics[step] = good_snaps[-1].metrics
        keep = select_keep(alive, metrics, self.policy, protect) | protect
        forget: list[str] = []
        resumed_snap = self._resumed[1] if self._resumed else None
        for step, snaps in remote.items():
            if step not in keep:
                forget += [s.id for s in snaps if s.id != resumed_snap]
                continue
            good = [s for s in snaps if s.id not in self._damaged_snaps]
            newest = good[-1].id if good else None
            forget += [s.id for s in snaps if s.id not in (newest, resumed_snap)]  # superseded or damaged copies
        if forget and self.vault is not None:
            with self._vault_lock:
                self.vault.forget_ids(forget)
        for step, loc in local.items():
            if step not in keep or (step in self._damaged_local and step not in protect):
                fs.remove(self._naming, loc.folder)
                self._damaged_local.discard(step)
        if forget and self.prune and self.vault is not None:
            self._prune()

    def _prune(self) -> None:
        from ..errors import LockedError

        assert self.vault is not None
        try:
            with self._vault_lock:
                self.vault.prune(wait=0)
        except LockedError:
            pass  # another prune is at it
        except LiferaftError as err:
            key = f"prune:{err.what}"
            if key not in self._warned:
                self._warned.add(key)
                self._warn(f"pruning the vault after retention failed ({err}); run `liferaft prune`")

    # ------------------------------------------------------------ restore internals

    def _restore(self, step: int | None, best: bool, *, load: bool) -> Restored | None:
        self._check_open()
        if step is not None:
            step = _check_step(step)
            if best:
                raise LiferaftError("restore(step=N) and best=True both given", "pass one of them")
        if best and not self.policy.monitor:
            raise LiferaftError("restore(best=True) needs a metric to rank by", 'create the Checkpointer with monitor="val_loss"')
        self._drain()
        local = self._local()
        try:
            remote = self._remote(strict=True)
        except VaultUnreachable as err:
            if not local:
                raise VaultUnreachable(
                    f"the vault cannot be reached ({err.what}) and {self.directory} holds no checkpoint of run {self.run!r}",
                    "check the network and credentials, then restore again (vault=False starts without the vault)",
                ) from None
            self._warn(f"the vault cannot be reached ({err.what}); using the checkpoints in {self.directory} only")
            remote = {}
        steps = set(local) | set(remote)
        if step is not None:
            if step not in steps:
                have = ", ".join(str(s) for s in sorted(steps)[-5:]) or "none"
                raise LiferaftError(f"run {self.run!r} has no checkpoint step {step}", f"steps available: {have}")
            order = [step]
        elif best:
            metrics: dict[int, dict[str, float]] = {}
            for s in steps:
                loc = local.get(s)
                if loc is not None and loc.manifest is not None:
                    metrics[s] = loc.manifest.metrics
                elif remote.get(s):
                    metrics[s] = remote[s][-1].metrics
            order = self.policy.rank(metrics)
            if steps and not order:
                raise LiferaftError(
                    f"no checkpoint of run {self.run!r} has the metric {self.policy.monitor!r}", "pass metrics={...} to save()"
                )
        else:
            order = sorted(steps, reverse=True)
        if not order:
            if self._other_folders:
                self._warn(
                    f"run {self.run!r} has no checkpoint of {self._folder_tag} in the vault, only of "
                    f"{', '.join(self._other_folders[:4])}; starting afresh. To resume one of those, run from the "
                    "working folder it was saved from (the paths are relative to it) or pass its path"
                )
            return None
        fallbacks: list[str] = []
        for s in order:
            r = self._try_step(s, local.get(s), remote.get(s, []), load, fallbacks)
            if r is not None:
                r.fallbacks = fallbacks
                self._resumed = (s, r.snapshot_id)
                self._mark_good(s)
                return r
        raise CheckpointDamaged(
            f"no checkpoint of run {self.run!r} verifies ({len(fallbacks)} tried): {fallbacks[0]}",
            "run `liferaft verify --read-data`; to start over, move the checkpoints folder away",
        )

    def _try_step(self, step: int, loc: _Local | None, snaps: list[SnapshotInfo], load: bool, fallbacks: list[str]) -> Restored | None:
        name = self._naming.name(step)
        good_snaps = [s for s in snaps if s.id not in self._damaged_snaps]
        if loc is not None:
            try:
                if loc.manifest is None:
                    assert loc.error is not None
                    raise loc.error
                state = self._load(loc.folder, loc.manifest, load)
                match = [s.id for s in snaps if s.tags.get(MANIFEST_TAG) == loc.manifest.checksum]
                return Restored(step, state, dict(loc.manifest.metrics), loc.folder, "local", match[-1] if match else None)
            except CheckpointDamaged as err:
                self._damaged_local.add(step)
                msg = f"checkpoint {name} in {self.directory} is damaged: {err.what}"
                then = "trying its copy in the vault" if good_snaps else "falling back to the checkpoint before it"
                self._warn(f"{msg}; {then}")
                fallbacks.append(msg)
        for snap in reversed(good_snaps):
            try:
                folder, m, state = self._fetch(snap, step, load)
            except VaultCorrupt as err:
                self._damaged_snaps.add(snap.id)
                msg = f"checkpoint {name} in the vault (snapshot {snap.short_id}) is damaged: {err.what}"
                self._warn(f"{msg}; falling back to the checkpoint before it")
                fallbacks.append(msg)
                continue
            self._damaged_local.discard(step)
            return Restored(step, state, dict(m.metrics), folder, "vault", snap.id)
        return None

    def _fetch(self, snap: SnapshotInfo, step: int, load: bool) -> tuple[Path, fs.Manifest, Any]:
        """Restore a checkpoint snapshot into the folder (replacing a damaged copy), verified."""
        assert self.vault is not None
        if len(snap.roots) != 1:
            raise CheckpointDamaged(f"snapshot {snap.short_id} is not a checkpoint (it has {len(snap.roots)} paths)")
        tmp = self._naming.temp_dir(step, kind="fetch")
        try:
            dest = tmp / self._naming.name(step)
            with self._vault_lock:
                self.vault.restore(snap.id, targets={snap.roots[0]["name"]: dest}, use_cache=False)
            m = fs.read_manifest(dest)
            if m.step != step or m.checksum != snap.tags.get(MANIFEST_TAG):
                raise CheckpointDamaged(f"snapshot {snap.short_id} holds a manifest that is not the one it was tagged with")
            state = self._load(dest, m, load)
            return fs.install(self._naming, dest, step), m, state
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, folder: Path, m: fs.Manifest, load: bool) -> Any:
        """Verify every file of a checkpoint; with ``load``, also rebuild its state in the same pass."""
        if not load or not m.has_state:
            fs.verify_files(folder, m)
            return None
        arrays: dict[str, Any] = {}
        if TENSORS in m.files:
            size, digest = m.files[TENSORS]
            arrays = read_tensors(folder / TENSORS, size, digest, m.arrays)
        elif m.arrays:
            raise CheckpointDamaged(f"{folder.name}: its manifest lists arrays but no {TENSORS}")
        others: list[Any] | None = None
        if PICKLE in m.files:
            if not self.allow_pickle:
                raise LiferaftError(
                    f"checkpoint {folder.name} holds pickled objects ({', '.join(m.pickled[:3])}) and allow_pickle=False",
                    "pass allow_pickle=True if the folder and vault are your own",
                )
            size, digest = m.files[PICKLE]
            data = read_bytes(folder / PICKLE, size, digest)
            try:
                others = pickle.loads(data)
            except (ImportError, AttributeError) as err:
                raise LiferaftError(
                    f"checkpoint {folder.name} holds pickled objects that need code not available here: {err}",
                    "import the module that defines them before restoring",
                ) from None
            except Exception as err:
                raise CheckpointDamaged(f"{folder.name}/{PICKLE} cannot be unpickled ({type(err).__name__})") from None
        fs.verify_files(folder, m, skip={TENSORS, PICKLE})
        return decode(m.state, arrays, others)
