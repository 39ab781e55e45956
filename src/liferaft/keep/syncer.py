"""The background syncer: snapshot the kept paths every interval, only when something changed.

One thread does all vault work for a run (interval passes, explicit syncs, the final
pass), so a signal handler never has to take a lock that the interrupted code may hold:
it only queues a request. The thread runs at a low CPU and I/O priority (see
``SYNC_NICE``), so the training it protects keeps its speed.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import LiferaftError
from .keeper import KeptPath
from .units import format_duration, plural

if TYPE_CHECKING:
    from ..api import Vault
    from ..vault.repository import SnapshotInfo


@dataclass
class PassResult:
    """One snapshot pass."""

    trigger: str
    snapshot: SnapshotInfo | None = None
    committed: bool = False  # False when nothing changed (or nothing to keep yet)
    seconds: float = 0.0
    error: str | None = None
    skipped: str | None = None

    @property
    def busy(self) -> bool:
        """Some file changed while it was read: its previous version went in instead (or,
        when nothing else changed, the pass committed nothing)."""
        return bool(self.snapshot is not None and self.snapshot.stats.get("changed_during_read"))

    @property
    def stored_bytes(self) -> int:
        return int(self.snapshot.stats.get("stored_bytes", 0)) if self.snapshot is not None and self.committed else 0


@dataclass
class _Request:
    trigger: str
    stop: bool = False
    step: int | None = None
    metrics: dict[str, Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: PassResult | None = None


#: Nice 10, not 19: at 19 a busy machine (data-loader workers on every core) starves the
#: syncer to ~1.5 % of a core and snapshots fall minutes behind; at 10 it gets ~10 %.
SYNC_NICE = 10

NOTHING_YET = "no kept path exists yet"

#: Quick extra passes after one that met a file being written, before the next interval.
MAX_QUICK_RETRIES = 3

# Ids, counts and times in an error's text ("locks/session-3f2a91c0...", "after 5 tries in
# 30s") vary from one pass to the next of the same outage.
_VARYING = re.compile(r"[0-9a-f]{8,}|\d+(?:\.\d+)?")


def error_kind(err: BaseException | str) -> str:
    """A failure's stable key: its type and its text with ids, counts and times taken out.

    >>> error_kind(TimeoutError("writing locks/session-3f2a91c04b7e.json: still failing after 5 tries in 31s"))
    'TimeoutError: writing locks/session-#.json: still failing after # tries in #s'
    """
    name, text = ("", err) if isinstance(err, str) else (type(err).__name__, str(err))
    return f"{name}: {_VARYING.sub('#', text)}" if name else _VARYING.sub("#", text)


def _call(callback: Callable[[str], None] | None, text: str) -> None:
    """Hand ``text`` to a caller's callback; what it raises must not stop the syncer."""
    if callback is not None:
        try:
            callback(text)
        except Exception:
            pass


def lower_thread_priority() -> None:
    """Nice ``SYNC_NICE`` and best-effort I/O level 7 for the calling thread (Linux only).

    On Linux both are per thread, and threads this one starts inherit them. Elsewhere
    they are per process and would slow the training too, so nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(SYNC_NICE, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:
        pass
    try:
        import psutil

        psutil.Process(tid).ionice(psutil.IOPRIO_CLASS_BE, 7)
    except Exception:
        pass


def vault_unavailable(url: str) -> str | None:
    """Why a vault cannot be written right now, for cases liferaft can see locally.

    A Drive path on Colab without the mount would silently fill the (ephemeral) local
    disk under the mount point: the classic way to lose a night of checkpoints.
    """
    if url.startswith("/content/drive/") and not os.path.isdir("/content/drive/MyDrive") and not os.path.ismount("/content/drive"):
        return "Google Drive is not mounted at /content/drive"
    return None


def ensure_vault(vault: Vault) -> None:
    """Reach the vault (creating it if new) so that a wrong location fails before any work starts."""
    from ..errors import VaultUnreachable

    why = vault_unavailable(vault.url)
    if why:
        raise VaultUnreachable(why, "mount it first: from google.colab import drive; drive.mount('/content/drive')")
    vault.repository(create=True)


class VaultNotWritable(LiferaftError):
    """The vault can be read but not written: every snapshot would fail."""


def check_writable(vault: Vault, *, other: str = "--vault") -> None:
    """Prove that the vault takes writes: put and delete one writer-session lock.

    A read-only mount, a folder without write permission or read-only credentials pass
    every read, and only the snapshots would fail, one by one. The probe is the object a
    snapshot writes first, in the vault's own format (a ``locks/session-*.json`` that
    prune already knows, and removes if this process dies before deleting it), so it
    costs one small write and one delete.

    >>> check_writable(liferaft.Vault("/mnt/ro"))  # doctest: +SKIP
    Traceback (most recent call last):
    VaultNotWritable: the vault at /mnt/ro can be read but not written (Read-only file system); ...
    """
    from ..backends import BackendError, NoSpace
    from ..errors import VaultUnreachable

    try:
        vault.repository(create=True).probe_write()
    except VaultUnreachable:
        raise  # retried until the deadline: unreachable, not read-only
    except NoSpace:
        raise VaultNotWritable(f"the vault at {vault.url} is full", f"free space there or choose another {other}") from None
    except BackendError as err:
        cause = err.__cause__
        if isinstance(cause, OSError) and cause.strerror:
            why = cause.strerror  # e.g. "Read-only file system", "Permission denied"
        else:  # e.g. "access denied while writing locks/... (AccessDenied)"
            why = (err.what if isinstance(err, LiferaftError) else str(err)).removeprefix(f"{vault.url}: ")
        raise VaultNotWritable(
            f"the vault at {vault.url} can be read but not written ({why})",
            f"make it writable (a read-write mount, write permission on the folder, credentials that may write) or choose another {other}",
        ) from None


class Syncer:
    """Snapshots ``keeps`` into ``vault`` as run ``run``: every ``every`` seconds and on request.

    >>> s = Syncer(vault, "mnist", resolve_keeps(["checkpoints"]), every=60)  # doctest: +SKIP
    >>> s.start(); ...; s.stop("final")                                       # doctest: +SKIP
    """

    def __init__(
        self,
        vault: Vault,
        run: str,
        keeps: Sequence[KeptPath],
        every: float,
        *,
        tags: dict[str, str] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        on_commit: Callable[[PassResult], None] | None = None,
        low_priority: bool = True,
        include_secrets: bool = False,
    ) -> None:
        self.vault = vault
        self.run = run
        self.keeps = list(keeps)
        self.every = every
        self.tags = dict(tags or {})
        self.on_error = on_error  # a warning: a pass failed (once per kind of failure while it lasts)
        self.on_notice = on_notice  # a note: snapshots work again, credential files left out
        self.on_commit = on_commit
        self.low_priority = low_priority
        self.include_secrets = include_secrets
        self.history: list[PassResult] = []
        self.last_error: str | None = None
        self._failing_kind: str | None = None  # the kind of failure last warned about
        self._failures = 0  # passes failed in a row
        self._failing_since = 0.0
        self._secrets_noted = False
        self._skipped_warned: set[str] = set()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._final: _Request | None = None

    # ------------------------------------------------------------ control

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="liferaft-sync", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request(self, trigger: str, *, stop: bool = False, step: int | None = None, metrics: dict[str, Any] | None = None) -> _Request:
        """Queue a pass (after the one in flight); safe to call from a signal handler."""
        req = _Request(trigger, stop=stop, step=step, metrics=metrics)
        if self.alive and (stop or not self._stopped):
            self._requests.put(req)  # SimpleQueue.put is reentrant: fine in a signal handler
        else:
            req.result = PassResult(trigger, skipped="the syncer is not running")
            req.done.set()
        return req

    def sync(self, trigger: str = "sync", timeout: float | None = None, **kw: Any) -> PassResult | None:
        """Take a pass now and wait for it; None on timeout."""
        req = self.request(trigger, **kw)
        if not req.done.wait(timeout):
            return None
        return req.result

    def stop(self, trigger: str | None = "final", timeout: float | None = None) -> PassResult | None:
        """Take a final pass (unless ``trigger`` is None) and end the thread."""
        if self._stopped:
            return None
        self._stopped = True
        req = self._final = self.request(trigger or "", stop=True)
        if not req.done.wait(timeout):
            return None
        if self._thread is not None:
            self._thread.join(timeout=5)
        return req.result if trigger else None

    def stopped(self, timeout: float | None = 0) -> bool:
        """Whether the last pass, asked by ``stop``, is done (waiting up to ``timeout``)."""
        req = self._final
        return req is None or req.done.wait(timeout)

    def give_up(self) -> None:
        """End the writer session of the pass in flight, if any: it can no longer commit
        and its lock is deleted (see ``WriteSession.end``). Waits on the vault: call it
        where that is bounded."""
        from ..vault.repository import sessions_of

        if self._thread is not None:
            for session in sessions_of(self._thread):
                session.end()

    @staticmethod
    def lock_left(why: str) -> str:
        """What to add to a warning when ``give_up`` could not delete the lock."""
        from ..vault.repository import STALE_AFTER

        return f"; its session lock could not be removed ({why}): it expires within {format_duration(STALE_AFTER)}, or liferaft prune removes it"

    @property
    def committed(self) -> list[PassResult]:
        return [p for p in self.history if p.committed]

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        if self.low_priority:
            lower_thread_priority()
        next_at = time.monotonic() + self.every
        retries = 0
        while True:
            try:
                req: _Request | None = self._requests.get(timeout=max(0.0, next_at - time.monotonic()))
            except queue.Empty:
                req = None
            if req is None:
                started = time.monotonic()
                result = self._pass("interval")
                # start to start; a pass longer than the interval is followed after a short pause
                next_at = max(started + self.every, time.monotonic() + min(1.0, self.every))
                if result.busy and retries < MAX_QUICK_RETRIES:
                    # a file was being written during the pass: try again soon rather than
                    # a whole interval later (a big torch.save takes seconds)
                    retries += 1
                    next_at = min(next_at, time.monotonic() + max(0.2, min(self.every / 4, 2 * result.seconds)))
                else:
                    retries = 0
                continue
            if req.stop and not req.trigger:
                req.result = PassResult("stop", skipped="no final pass asked")
            else:
                req.result = self._pass(req.trigger, step=req.step, metrics=req.metrics)
            req.done.set()
            if req.stop:
                self._drain()
                return

    def _drain(self) -> None:
        """Answer requests that raced with the stop, so that nobody waits forever."""
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            req.result = PassResult(req.trigger, skipped="the syncer has stopped")
            req.done.set()

    def _pass(self, trigger: str, *, step: int | None = None, metrics: dict[str, Any] | None = None) -> PassResult:
        paths = [k.path for k in self.keeps if os.path.lexists(k.path)]
        if not paths:
            result = PassResult(trigger, skipped=NOTHING_YET)
            self.history.append(result)
            return result
        why = vault_unavailable(self.vault.url)
        if why:
            result = PassResult(trigger, error=why)
            self._failed(result)
            return result
        t0 = time.monotonic()
        try:
            snap = self.vault.snapshot(
                paths,
                run=self.run,
                step=step,
                metrics=metrics,
                tags={**self.tags, "trigger": trigger},
                skip_unchanged=True,
                include_secrets=self.include_secrets,
            )
        except LiferaftError as err:
            result = PassResult(trigger, seconds=time.monotonic() - t0, error=str(err))
            self._failed(result)
            return result
        except Exception as err:  # a bug or an odd OS error must not kill the syncer
            result = PassResult(trigger, seconds=time.monotonic() - t0, error=f"{type(err).__name__}: {err}")
            self._failed(result)
            return result
        result = PassResult(trigger, snapshot=snap, committed=not snap.unchanged, seconds=time.monotonic() - t0)
        self.history.append(result)
        self.last_error = None
        if self._failures:
            failed, since = self._failures, time.monotonic() - self._failing_since
            self._failures, self._failing_kind = 0, None
            _call(
                self.on_notice,
                f"snapshots work again after {plural(failed, 'failed attempt')} in {format_duration(since)}: "
                f"snapshot {snap.short_id} holds {plural(int(snap.stats.get('files', 0)), 'file')}",
            )
        self._warn_skipped(snap)
        self._note_secrets(snap)
        if result.committed and self.on_commit is not None:
            try:
                self.on_commit(result)
            except Exception:
                pass
        return result

    def _warn_skipped(self, snap: SnapshotInfo) -> None:
        """Warn once a session per path that could not be read (EACCES, a mount's EIO): the
        snapshots go on without it, or with its previous version. Sockets and FIFOs are
        never kept, and not worth a warning."""
        from ..vault.snapshot import NOT_KEPT_KIND

        skipped = [s for s in snap.stats.get("skipped", []) if not s.endswith(f": {NOT_KEPT_KIND}")]
        new = [s for s in skipped if s not in self._skipped_warned]
        if not new:
            return
        self._skipped_warned.update(new)
        fix = (
            "rename it (a backslash or NUL in a name does not restore everywhere) to keep it"
            if new[0].endswith(": name not portable")
            else "make it readable (permissions, the mount it is on) to keep it"
        )
        _call(self.on_error, f"{plural(len(new), 'path')} could not be taken into the snapshots, e.g. {new[0]}; {fix}")

    def _note_secrets(self, snap: SnapshotInfo) -> None:
        """Say once a session that credential files were left out, as `liferaft snapshot` does."""
        n = int(snap.stats.get("secrets_excluded", 0) or 0)
        if self._secrets_noted or not n:
            return
        self._secrets_noted = True
        names = [str(p) for p in snap.stats.get("secrets_excluded_paths", [])[:3]]
        shown = f" ({', '.join(names)}{', ...' if n > len(names) else ''})" if names else ""
        _call(
            self.on_notice,
            f"note: {plural(n, 'credential file')} left out of the snapshots{shown}; "
            "pass --include-secrets (attach(include_secrets=True)) to keep them",
        )

    def _failed(self, result: PassResult) -> None:
        self.history.append(result)
        self.last_error = result.error
        kind = error_kind(result.error or "")  # one warning per kind of failure
        if not self._failures:
            self._failing_since = time.monotonic()
        self._failures += 1
        first = kind != self._failing_kind
        self._failing_kind = kind
        if first:  # loud once per kind of failure while it lasts, not every interval
            _call(self.on_error, f"snapshot ({result.trigger}) failed: {result.error}")
