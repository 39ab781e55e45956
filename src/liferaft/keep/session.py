"""``liferaft.attach``: keep a notebook's (or a script's) files alive, in process.

``attach`` restores the kept paths, then a background thread snapshots them every
interval; the last snapshot is taken at interpreter exit and on SIGTERM. One raft per
process: a second ``attach`` returns the running one, so re-running a notebook cell
does not start a second syncer.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..errors import LiferaftError
from ..platform import register_exit_hook
from .keeper import KeptPath, RestoreOutcome, check_run_name, check_vault_outside, resolve_keeps, restore_kept
from .signals import SignalHandlers
from .syncer import NOTHING_YET, PassResult, Syncer, check_writable, ensure_vault
from .units import format_duration, format_size, plural

if TYPE_CHECKING:
    from ..api import Vault
    from ..vault.repository import SnapshotInfo

_lock = threading.Lock()
_current: Raft | None = None

_in_flight: Raft | None = None  # a closed raft whose final snapshot close() stopped waiting for

#: How long a process that ends with a snapshot in flight waits for the vault to delete
#: that snapshot's session lock.
GIVE_UP_WAIT = 5.0


def _wait_limit(seconds: float) -> float | None:
    """A wait of ``seconds`` for ``Event.wait``: None (no limit) for one too long to wait
    (``math.inf``, or past what the platform's timers take)."""
    return None if not math.isfinite(seconds) or seconds >= threading.TIMEOUT_MAX else max(0.0, seconds)


class Raft:
    """A running attachment: its syncer, what was restored, and the last snapshot.

    Made by :func:`attach`; use ``sync()`` for a snapshot now and ``close()`` to stop.
    """

    def __init__(
        self,
        vault: Vault,
        run: str,
        keeps: Sequence[KeptPath],
        every: float,
        *,
        quiet: bool = False,
        flush_timeout: float = 25.0,
        include_secrets: bool = False,
    ) -> None:
        self.vault = vault
        self.run = run
        self.keeps = list(keeps)
        self.every = every
        self.quiet = quiet
        self.flush_timeout = flush_timeout
        self.restored = RestoreOutcome()
        self.closed = False
        self._syncer = Syncer(vault, run, self.keeps, every, on_error=self._warn, on_notice=self._say, include_secrets=include_secrets)
        self._handlers: SignalHandlers | None = None
        self._finishing = False  # the final snapshot is being taken
        self._deferred: int | None = None  # a SIGTERM that came meanwhile
        self._exit_trigger = "exit"  # "SIGTERM" once one has ended the script
        self._given_up = False  # a new attach gave up the snapshot close() left in flight

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"syncing every {format_duration(self.every)}"
        last = self.last_snapshot
        tail = f", last snapshot {last.short_id}" if last is not None else ""
        return f"<liferaft.Raft run={self.run!r} keep={[k.arg for k in self.keeps]} vault={self.vault.url!r} {state}{tail}>"

    def __enter__(self) -> Raft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ info

    @property
    def resumed(self) -> bool:
        """True when the kept paths came from (or already matched) a snapshot."""
        return self.restored.resumed

    @property
    def snapshot_id(self) -> str | None:
        """The snapshot the kept paths were restored from, if any."""
        snap = self.restored.snapshot
        return snap.id if snap is not None and self.resumed else None

    @property
    def last_snapshot(self) -> SnapshotInfo | None:
        """The newest snapshot this raft took or found unchanged."""
        for p in reversed(self._syncer.history):
            if p.snapshot is not None:
                return p.snapshot
        return None

    @property
    def snapshots_taken(self) -> int:
        return len(self._syncer.committed)

    @property
    def error(self) -> str | None:
        """The last background failure, until a pass succeeds again."""
        return self._syncer.last_error

    # ------------------------------------------------------------ control

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"liferaft: {text}", flush=True)

    def _warn(self, text: str) -> None:
        print(f"liferaft: warning: {text}", file=sys.stderr, flush=True)

    def _start(self, *, force: bool) -> None:
        ensure_vault(self.vault)
        lost = self.vault.lost_with_the_machine()
        if lost:
            self._warn(lost)
        # Before anything is restored: a read-only mount or credentials that may only read
        # would otherwise fail every background snapshot, one warning an interval.
        check_writable(self.vault, other="vault=")
        self.restored = restore_kept(self.vault, self.run, self.keeps, force=force, say=self._warn)
        o = self.restored
        for msg in o.messages:
            self._warn(msg)
        if o.snapshot is None:
            self._say(f"nothing to restore for run {self.run!r} (a first run); syncing every {format_duration(self.every)}")
        elif o.restored:
            self._say(
                f"restored {', '.join(k.arg for k in o.restored)} from snapshot {o.snapshot.short_id}: "
                f"{plural(o.files, 'file')}, {format_size(o.nbytes)}; syncing every {format_duration(self.every)}"
            )
        else:
            self._say(f"kept paths already match snapshot {o.snapshot.short_id}; syncing every {format_duration(self.every)}")
        self._syncer.start()
        if threading.current_thread() is threading.main_thread():
            self._handlers = SignalHandlers((signal.SIGTERM,), self._on_sigterm)
        register_exit_hook(self._at_exit)

    def sync(self, *, step: int | None = None, metrics: dict[str, Any] | None = None, timeout: float | None = None) -> SnapshotInfo:
        """Snapshot the kept paths now (if something changed) and wait for the commit.

        >>> raft.sync(step=1200, metrics={"val_loss": 0.31})   # doctest: +SKIP
        """
        if self.closed:
            raise LiferaftError("this raft is closed", "call liferaft.attach(...) again")
        result = self._syncer.sync("sync", timeout=timeout, step=step, metrics=metrics)
        if result is None:
            raise LiferaftError(f"the snapshot did not finish within {format_duration(timeout or 0)}", "wait longer or check the vault")
        return self._result(result)

    def _result(self, result: PassResult) -> SnapshotInfo:
        if result.error:
            raise LiferaftError(f"snapshot failed: {result.error}", "check the vault; the previous snapshot is intact")
        if result.snapshot is None and result.skipped == NOTHING_YET:
            raise LiferaftError("nothing to snapshot: none of the kept paths exists yet", f"create {self.keeps[0].arg} first")
        if result.snapshot is None:
            raise LiferaftError(f"no snapshot taken: {result.skipped}", "call liferaft.attach(...) again")
        return result.snapshot

    def close(self, *, final: bool = True, timeout: float | None = None) -> SnapshotInfo | None:
        """Take the final snapshot (unless ``final=False``) and stop syncing.

        Waits at most ``timeout`` seconds (default: ``flush_timeout``; ``math.inf``: as
        long as it takes), so that a stalled vault does not hang the notebook. A snapshot
        still in flight then goes on in the background and commits if the vault answers
        before the process ends (at exit it gets ``flush_timeout`` more); meanwhile the
        vault keeps the previous one, and this returns None.

        >>> raft.close()   # doctest: +SKIP
        """
        global _current, _in_flight
        if self.closed:
            return None
        with _lock:
            if _current is self:
                _current = None
        limit = self.flush_timeout if timeout is None else timeout
        # Our handler stays in until the snapshot is done: a SIGTERM meanwhile waits for it.
        result = self._final("close" if final else None, timeout=_wait_limit(limit))
        deferred = self._deferred
        self._release_signals()
        if not self._syncer.stopped():
            what = "the final snapshot (close)" if final else "the snapshot in flight"
            advice = "pass close(timeout=...) or a larger flush_timeout= to attach() if the vault is slow"
            if deferred is not None:
                # The SIGTERM held meanwhile is acted on now, and may end the process at once.
                self._warn(
                    f"{what} did not finish within {format_duration(limit)}; the vault keeps the previous one: {advice}{self._give_up()}"
                )
            else:
                self._warn(
                    f"{what} did not finish within {format_duration(limit)}; it goes on in the background and commits "
                    f"if the vault answers before this process ends, and the vault keeps the previous one meanwhile: {advice}"
                )
                with _lock:
                    _in_flight = self
        if deferred is not None:
            os.kill(os.getpid(), deferred)  # now to the handler that was there before us
        if result is None:
            return None
        if result.error:
            self._warn(f"the final snapshot failed: {result.error}; the vault keeps the previous one")
            return None
        return result.snapshot

    def _final(self, trigger: str | None, timeout: float | None) -> PassResult | None:
        """Take the final snapshot (the last pass of the syncer), once."""
        self._finishing = True  # before ``closed``: a signal may come between the two
        self.closed = True
        try:
            return self._syncer.stop(trigger, timeout=timeout)
        finally:
            self._finishing = False

    def _final_bounded(self, trigger: str) -> None:
        """The final snapshot as the process ends, bounded by ``flush_timeout``."""
        result = self._final(trigger, timeout=_wait_limit(self.flush_timeout))
        if result is None:
            self._warn(
                f"the final snapshot ({trigger}) did not finish within {format_duration(self.flush_timeout)}; "
                f"the vault keeps the previous one: pass a larger flush_timeout= to attach() if the vault is slow{self._give_up()}"
            )
        elif result.error:
            self._warn(f"the final snapshot ({trigger}) failed: {result.error}; the vault keeps the previous one")

    def _snapshot_before_handler(self) -> None:
        self._finishing = True  # a second SIGTERM meanwhile is the same request: held, then dropped
        try:
            result = self._syncer.sync("SIGTERM", timeout=_wait_limit(self.flush_timeout))
        finally:
            self._finishing = False
            self._deferred = None
        if result is None:
            self._warn(f"the snapshot on SIGTERM did not finish within {format_duration(self.flush_timeout)}; it goes on in the background")
        elif result.error:
            self._warn(f"the snapshot on SIGTERM failed: {result.error}; the final snapshot is tried again at exit")

    def _release_signals(self) -> None:
        """Put back the SIGTERM handler we replaced, unless the script has put in its own since."""
        handlers = self._handlers
        if handlers is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            handlers.restore()
        else:
            handlers.previous.clear()

    def _give_up(self) -> str:
        """The process ends with a snapshot in flight: end its writer session, so that
        its lock does not hold off prune until it goes stale. Waits on the vault for
        ``GIVE_UP_WAIT`` at most; returns what to add to the warning when that failed."""
        done = threading.Event()
        failed: list[str] = []

        def end() -> None:
            try:
                self._syncer.give_up()
            except Exception as err:  # the vault does not answer: the lock goes stale
                failed.append(str(err) or type(err).__name__)
            finally:
                done.set()

        threading.Thread(target=end, name="liferaft-give-up", daemon=True).start()
        if done.wait(GIVE_UP_WAIT) and not failed:
            return ""
        return self._syncer.lock_left(failed[0] if failed else "no answer")

    def _at_exit(self) -> None:
        if self.closed:
            # close() stopped waiting for its snapshot: it gets flush_timeout more now,
            # as the exit snapshot would have, and is given up after that.
            if self._given_up:
                return
            if not self._syncer.stopped() and not self._syncer.stopped(_wait_limit(self.flush_timeout)):
                self._warn(
                    f"the snapshot that close() left in flight did not finish by the end of the process "
                    f"(waited {format_duration(self.flush_timeout)} more); the vault keeps the previous one{self._give_up()}"
                )
            return
        # A SIGTERM during this snapshot is not passed on: the process is ending anyway.
        self._final_bounded(self._exit_trigger)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        handlers = self._handlers
        if self._finishing:
            # A second SIGTERM (or one during the exit or close snapshot): dying now would
            # lose the final snapshot and leave its session lock behind; it is bounded by
            # flush_timeout, and the signal is acted on once it is done.
            self._deferred = signum
            return
        if self.closed or handlers is None:
            if handlers is not None:
                handlers.chain(signum, frame)
            return
        previous = handlers.previous.get(signum)
        if callable(previous) or previous == signal.SIG_IGN:
            # First a snapshot of what is there now (bounded by flush_timeout): the script's
            # handler may end the process without unwinding (os._exit, or SIG_DFL and the
            # signal again), and then no exit hook runs.
            self._exit_trigger = "SIGTERM"
            self._snapshot_before_handler()
            # Then the script's handler. If it ends the process (sys.exit), the final
            # snapshot is taken at exit, after the unwinding (finally blocks): it holds
            # what the handler saved. If it returns (a flag the training loop checks), the
            # script goes on, and the final snapshot is taken when it ends.
            handlers.chain(signum, frame)
            return
        # The default action: the final snapshot, then end the process by the signal.
        self._final_bounded("SIGTERM")
        handlers.chain(signum, frame)


def attach(
    keep: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    every: float | str = 60,
    vault: str | os.PathLike[str] | Vault | None = None,
    run: str | None = None,
    force: bool = False,
    quiet: bool = False,
    flush_timeout: float = 25.0,
    include_secrets: bool = False,
) -> Raft:
    """Restore ``keep`` from the vault, then snapshot it in the background every ``every`` seconds.

    The last snapshot is taken at interpreter exit (kernel shutdown or restart too) and
    on SIGTERM. With a SIGTERM handler of the script's own (installed before or after
    ``attach``), what it saves is in the final snapshot: taken when the process exits,
    after that handler, its ``sys.exit`` and the ``finally`` blocks (a handler installed
    before ``attach`` is called after a snapshot of what is there, in case it ends the
    process without unwinding). A second call in the same process returns the running raft.

    Parameters
    ----------
    keep
        Files or folders to keep, relative to the working folder (default: ``keep`` in
        ``liferaft.toml``).
    every
        Seconds between background snapshots (taken only when something changed);
        also ``"5m"`` and the like.
    vault
        A vault URL or path, or a :class:`liferaft.Vault` (default: ``LIFERAFT_VAULT``,
        ``liferaft.toml``, the default folder).
    run
        The run name (default: ``LIFERAFT_RUN``, ``liferaft.toml``, the working folder's name).
    force
        Restore the snapshot even over local files that differ from it.
    quiet
        Print only warnings.
    flush_timeout
        How long the final snapshot may take at exit, on SIGTERM or in ``close()``
        (a stalled vault then keeps the previous snapshot, with a warning).
    include_secrets
        Also keep credential files (``.netrc``, ``*.pem``, ``kaggle.json``, ``.env``,
        service-account keys), which are left out by default with a note.

    Returns
    -------
    Raft
        ``raft.sync()`` snapshots now, ``raft.close()`` stops; ``raft.resumed`` says
        whether the files came from a snapshot.

    Examples
    --------
    >>> import liferaft
    >>> raft = liferaft.attach(keep=["checkpoints", "runs"], every=60,
    ...                        vault="/content/drive/MyDrive/liferaft")   # doctest: +SKIP
    >>> raft.sync(step=500)                                              # doctest: +SKIP
    """
    global _current
    from ..api import Vault
    from ..config import default_run_name
    from .units import parse_duration

    with _lock:
        running = _current
    if running is not None and not running.closed:
        asked = [os.fspath(k) for k in ([keep] if isinstance(keep, (str, os.PathLike)) else (keep or []))]
        if asked and sorted(asked) != sorted(k.arg for k in running.keeps):
            warnings.warn(
                f"liferaft is already attached (keep={[k.arg for k in running.keeps]}); returning that raft. "
                "Call raft.close() first to attach with other paths.",
                stacklevel=2,
            )
        return running
    given = "keep="
    if keep is None:
        from .keeper import keep_from_config

        keeps_in: list[str | os.PathLike[str]] = list(keep_from_config())
        given = "liferaft.toml"
    elif isinstance(keep, (str, os.PathLike)):
        keeps_in = [keep]
    else:
        keeps_in = list(keep)
    every_s = parse_duration(every, "every")
    if not every_s:
        raise LiferaftError(f"every={every!r} must be more than 0 seconds", "e.g. every=60")
    keeps = resolve_keeps(keeps_in, given=given)
    the_vault = vault if isinstance(vault, Vault) else Vault(vault)
    check_vault_outside(keeps, the_vault)
    run_name = check_run_name(run or default_run_name())
    _take_over(the_vault, run_name)
    raft = Raft(the_vault, run_name, keeps, every_s, quiet=quiet, flush_timeout=flush_timeout, include_secrets=include_secrets)
    with _lock:
        if _current is not None and not _current.closed:  # another thread won the race
            return _current
        raft._start(force=force)
        _current = raft
    return raft


def _take_over(vault: Vault, run: str) -> None:
    """Before a new raft of the run a closed one was keeping: give up that raft's final
    snapshot if close() left it in flight (a stalled vault). Were the vault to answer
    later, it would commit the older files over the new raft's snapshots."""
    global _in_flight
    with _lock:
        old = _in_flight
        if old is None or old.run != run or old.vault.url != vault.url:
            return
        _in_flight = None
    if not old._syncer.stopped():
        old._given_up = True  # not waited for again at exit
        old._warn(f"the final snapshot of run {run!r} that close() left in flight is given up: the new attach takes over{old._give_up()}")


def current() -> Raft | None:
    """The running raft of this process, if any."""
    return _current
