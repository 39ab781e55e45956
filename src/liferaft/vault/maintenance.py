"""Keeping a vault healthy: verify, forget (retention) and prune."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backends import BackendError, ObjectExists, ObjectInfo, ObjectNotFound
from ..backends.local import LocalBackend
from ..errors import LiferaftError, LockedError, VaultCorrupt
from ..platform import hostname, pid_scope
from . import format as fmt
from .repository import PRUNE_LOCK, SESSION_REFRESH, Repository, SnapshotInfo, pack_name

# Index fragments: every writer adds one, and a fresh machine reads them all. Prune
# merges the small ones (fewer than COMPACT_ENTRIES blobs) once there are more than
# COMPACT_COUNT, into fragments of at most about FRAGMENT_ENTRIES blobs (~100 bytes each).
COMPACT_COUNT = 16
COMPACT_ENTRIES = 50_000
FRAGMENT_ENTRIES = 200_000

# ------------------------------------------------------------------ verify


@dataclass
class VerifyReport:
    snapshots: int = 0
    packs: int = 0
    blobs: int = 0
    bytes_read: int = 0
    damage: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    damaged_snapshots: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.damage

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "packs": self.packs,
            "blobs": self.blobs,
            "bytes_read": self.bytes_read,
            "damage": self.damage,
            "warnings": self.warnings,
            "damaged_snapshots": sorted(self.damaged_snapshots),
        }


def verify(repo: Repository, *, read_data: bool = False, on_progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every snapshot's structure; with ``read_data`` also every byte of every pack."""
    report = VerifyReport()
    damaged_manifests: list[str] = []
    snaps = repo.snapshots(damaged=damaged_manifests, fresh=True)  # the vault's bytes, not a local copy
    report.damage += damaged_manifests
    report.snapshots = len(snaps)
    fragments: dict[str, dict[bytes, fmt.IndexEntry]] = {}
    _listing, bad = repo.load_fragments(fragments, fresh=True)  # the vault's bytes, not a local copy
    report.damage += [f"index fragment {name}: {err}" for name, err in bad]
    index: dict[bytes, fmt.IndexEntry] = {}
    for frag in fragments.values():
        index.update(frag)
    relisted = False

    def relist_if(missing: bool) -> None:
        # A prune may have merged fragments while we listed (a paged listing can miss both
        # the old ones and the new one): list once more before calling a blob missing.
        nonlocal relisted
        if missing and not relisted:
            relisted = True
            repo.load_fragments(fragments, fresh=True)
            for frag in fragments.values():
                index.update(frag)

    relist_if(any(bytes.fromhex(b) not in index for snap in snaps for b in snap.tree))
    packs = {o.name.rsplit("/", 1)[-1]: o.size for o in repo._list("packs/")}
    # Which snapshots depend on each blob.
    users: dict[bytes, set[str]] = defaultdict(set)
    for snap in snaps:
        for b in snap.tree:
            users[bytes.fromhex(b)].add(snap.id)
        try:
            tree = _read_tree_with(repo, snap, index)
        except LiferaftError as err:
            report.damage.append(f"snapshot {snap.short_id} (run {snap.run}, step {snap.step}): tree unreadable: {err}")
            report.damaged_snapshots.add(snap.id)
            continue
        for e in tree:
            for b in e.blobs:
                users[bytes.fromhex(b)].add(snap.id)

    def blame(blob_ids: set[bytes]) -> str:
        ids = set().union(*(users.get(b, set()) for b in blob_ids)) if blob_ids else set()
        report.damaged_snapshots |= ids
        return ", ".join(sorted(i[:12] for i in ids)) or "no snapshot"

    relist_if(any(bid not in index for bid in users))
    for bid in users:
        entry = index.get(bid)
        if entry is None:
            report.damage.append(f"blob {bid.hex()[:12]} is missing from the index; needed by snapshot(s) {blame({bid})}")
        elif entry[0] not in packs:
            report.damage.append(f"pack {pack_name(entry[0])} is missing; needed by snapshot(s) {blame({bid})}")
    by_pack: dict[str, list[tuple[bytes, fmt.IndexEntry]]] = defaultdict(list)
    for bid, entry in index.items():
        by_pack[entry[0]].append((bid, entry))
    for pid, items in by_pack.items():
        end = max(e[2] + e[3] for _b, e in items)
        if pid in packs and packs[pid] < end:
            needed = {b for b, _e in items if b in users}
            if needed:
                report.damage.append(f"pack {pack_name(pid)} is truncated ({packs[pid]} bytes); affects snapshot(s) {blame(needed)}")
    report.blobs = len(index)
    report.packs = len(packs)
    if read_data:
        done = 0
        for pid, _size in sorted(packs.items()):
            needed = {bid for bid, _ in by_pack.get(pid, []) if bid in users}
            try:
                data = repo.backend.get(pack_name(pid))
            except (BackendError, ObjectNotFound) as err:
                report.damage.append(f"pack {pack_name(pid)} cannot be read: {err}")
                continue
            report.bytes_read += len(data)
            done += len(data)
            if on_progress:
                on_progress(done, sum(packs.values()))
            problem = None
            if not fmt.pack_matches_id(data, pid):
                problem = "its bytes do not match its hash"
            bad_blobs: set[bytes] = set()
            for bid, (_p, codec, off, length, raw) in by_pack.get(pid, []):
                try:
                    fmt.unpack_blob(bid, codec, data[off : off + length], raw)
                except VaultCorrupt:
                    bad_blobs.add(bid)
            try:
                fmt.parse_pack_header(data, len(data))
            except VaultCorrupt as err:
                problem = problem or f"its header is damaged ({err})"
            if bad_blobs:
                problem = f"{len(bad_blobs)} blob(s) fail their hash" + (f"; {problem}" if problem else "")
            if problem:
                hit = bad_blobs & set(users)
                if hit or (problem and needed and not bad_blobs):
                    report.damage.append(f"pack {pack_name(pid)} is damaged: {problem}; affects snapshot(s) {blame(hit or needed)}")
                else:
                    report.warnings.append(f"pack {pack_name(pid)} is damaged ({problem}) but no snapshot needs it; prune removes it")
    return report


def _read_tree_with(repo: Repository, snap: SnapshotInfo, index: dict[bytes, fmt.IndexEntry]) -> list[fmt.Entry]:
    data = bytearray()
    for b in snap.tree:
        bid = bytes.fromhex(b)
        entry = index.get(bid)
        if entry is None:
            raise VaultCorrupt(f"tree blob {b[:12]} is missing from the index")
        pid, codec, off, length, raw = entry
        try:
            stored = repo.read_pack_range(pid, off, length)
        except ObjectNotFound:
            raise VaultCorrupt(f"pack {pid[:12]} holding tree blob {b[:12]} is missing") from None
        data += fmt.unpack_blob(bid, codec, stored, raw)
    return fmt.parse_tree(bytes(data))


# ------------------------------------------------------------------ forget


def select_forget(
    snaps: list[SnapshotInfo],
    run: str,
    keep_last: int,
    protect: set[str] | None = None,
    healthy: Callable[[SnapshotInfo], bool] | None = None,
) -> list[SnapshotInfo]:
    """Snapshots of ``run`` beyond the newest ``keep_last``, never the newest healthy one."""
    if keep_last < 1:
        raise LiferaftError(f"--keep-last {keep_last} would forget every snapshot", "keep at least 1")
    mine = [s for s in snaps if s.run == run]
    keep = {s.id for s in mine[-keep_last:]} | (protect or set())
    if healthy is not None:
        for s in reversed(mine):
            if healthy(s):
                keep.add(s.id)
                break
    return [s for s in mine if s.id not in keep]


def quick_check(repo: Repository, snap: SnapshotInfo) -> bool:
    """The snapshot's tree reads and every blob it needs is in the index."""
    try:
        index = repo.index()
        tree = repo.read_tree(snap)
        return all(bytes.fromhex(b) in index for e in tree for b in e.blobs)
    except LiferaftError:
        return False


# ------------------------------------------------------------------ prune


@dataclass
class PruneReport:
    packs_deleted: int = 0
    bytes_deleted: int = 0
    packs_repacked: int = 0
    index_rewritten: int = 0
    temp_deleted: int = 0
    kept_for_writers: int = 0
    waiting_on: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class _PruneLock:
    """The prune lock: create-only, refreshed by a heartbeat, released only while ours."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.backend = repo.backend
        self.id = uuid.uuid4().hex
        self.doomed: list[str] = []
        self.lost = False
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="liferaft-prune-lock", daemon=True)

    def _doc(self) -> bytes:
        doc = {"id": self.id, "host": hostname(), "pid": os.getpid(), "scope": pid_scope(), "refreshed": time.time(), "doomed": self.doomed}
        return json.dumps(doc).encode()

    def _ours(self) -> bool:
        doc = self.repo._read_lock(PRUNE_LOCK)
        return doc is not None and doc.get("id") == self.id

    def acquire(self) -> None:
        try:
            self.backend.put(PRUNE_LOCK, self._doc(), overwrite=False)
        except ObjectExists:
            doc = self.repo._read_lock(PRUNE_LOCK)
            if self.repo._lock_live(doc):
                who = f"{doc.get('host')} pid {doc.get('pid')}" if doc else "another process"
                raise LockedError(f"a prune is already running on {who}", "wait for it to finish") from None
            self.backend.put(PRUNE_LOCK, self._doc(), overwrite=True)  # a dead prune's lock
        if not self.backend.capabilities.create_only:
            # The store ignores create-only: wait out a racing prune's write, then check.
            time.sleep(1.0)
            if not self._ours():
                raise LockedError("another prune took the lock at the same moment", "run prune again later")
        self._thread.start()

    def publish(self, doomed: list[str]) -> None:
        with self._mu:
            self.doomed = doomed
            if self.lost:
                raise LockedError("this prune lost its lock (it stalled too long)", "run prune again")
            self.backend.put(PRUNE_LOCK, self._doc(), overwrite=True)

    def _beat(self) -> None:
        while not self._stop.wait(SESSION_REFRESH):
            with self._mu:
                try:
                    if not self._ours():
                        self.lost = True
                        return
                    self.backend.put(PRUNE_LOCK, self._doc(), overwrite=True)
                except (LiferaftError, BackendError):
                    pass

    def check(self) -> None:
        if self.lost or not self._ours():
            self.lost = True
            raise LockedError("this prune lost its lock before deleting anything", "run prune again")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            if self._ours():
                self.backend.delete(PRUNE_LOCK)
        except BackendError:
            pass


def prune(repo: Repository, *, wait: float = 30.0, repack_below: float = 0.5, temp_age: float = 3600.0) -> PruneReport:
    """Delete what no snapshot needs; never what a running writer may still reference.

    Protocol (see the README's design section):
    1. take the prune lock (create-only; a heartbeat keeps it fresh);
    2. list packs, index fragments, manifests; mark blobs reachable from manifests;
    3. publish the doomed packs in the lock: writers that start from now on read it
       and never dedup against them;
    4. list writer sessions: those may have read the index before step 3, so wait for
       them to end (up to ``wait`` seconds), else delete nothing this time;
    5. mark again (they may have committed), repack partly-used packs, write the
       replacement index fragment, delete the old fragments, then the doomed packs.
    """
    report = PruneReport()
    lock = _PruneLock(repo)
    lock.acquire()
    try:
        return _prune_locked(repo, report, wait, repack_below, temp_age, lock)
    finally:
        lock.release()


def _mark(repo: Repository) -> tuple[list[SnapshotInfo], set[bytes]]:
    damaged: list[str] = []
    snaps = repo.snapshots(damaged=damaged)
    if damaged:
        raise VaultCorrupt(
            f"{damaged[0]}", "prune needs every snapshot readable: run `liferaft verify`, then `liferaft forget ID` the damaged one"
        )
    live: set[bytes] = set()
    for snap in snaps:
        try:
            live.update(bytes.fromhex(b) for b in snap.tree)
            for e in repo.read_tree(snap):
                live.update(bytes.fromhex(b) for b in e.blobs)
        except LiferaftError as err:
            raise VaultCorrupt(
                f"snapshot {snap.short_id} cannot be read ({err})",
                "prune needs every snapshot readable: forget it with `liferaft forget ID`",
            ) from None
    return snaps, live


def _fresh_index(repo: Repository) -> tuple[dict[str, dict[bytes, fmt.IndexEntry]], dict[str, list[tuple[bytes, fmt.IndexEntry]]]]:
    repo.index(reload=True)
    fragments = repo.fragments()
    # Each (blob, pack) once: a prune killed after writing its replacement fragment leaves
    # the same entry in two fragments, which must not count twice towards a pack's use.
    unique: dict[str, dict[bytes, fmt.IndexEntry]] = defaultdict(dict)
    for frag in fragments.values():
        for bid, entry in frag.items():
            unique[entry[0]].setdefault(bid, entry)
    by_pack = {pid: list(entries.items()) for pid, entries in unique.items()}
    return fragments, by_pack


def _prune_locked(
    repo: Repository, report: PruneReport, wait: float, repack_below: float, temp_age: float, lock: _PruneLock
) -> PruneReport:
    backend = repo.backend
    packs = {o.name.rsplit("/", 1)[-1]: o for o in repo._list("packs/")}
    # Read the index after listing packs, never from a cache: a pack listed above whose
    # fragment we do not see is an orphan or belongs to a writer with a live session.
    fragments, by_pack = _fresh_index(repo)
    _snaps, live = _mark(repo)

    keeper: dict[bytes, str] = {}  # the one listed pack each live blob is kept in

    def plan(live: set[bytes]) -> tuple[set[str], set[str]]:
        # A blob indexed in several packs (a prune killed after writing its replacement
        # fragment but before deleting the old ones, or two writers storing one blob) is
        # kept in one of them, the pack with the most live bytes; its other copies count
        # as dead, so they are repacked away or deleted instead of kept forever.
        gross = {pid: sum(e[3] for b, e in by_pack.get(pid, []) if b in live) for pid in packs}
        keeper.clear()
        for pid in sorted(packs, key=lambda p: (gross[p], p), reverse=True):
            for b, _e in by_pack.get(pid, []):
                if b in live:
                    keeper.setdefault(b, pid)
        doomed, repack = set(), set()
        for pid in packs:
            entries = by_pack.get(pid, [])
            used = sum(e[3] for b, e in entries if keeper.get(b) == pid)
            if used == 0:
                doomed.add(pid)  # unreferenced, an orphan of an interrupted writer, or only duplicates
            elif used < repack_below * packs[pid].size:
                repack.add(pid)
        return doomed, repack

    doomed, repack = plan(live)
    if not doomed and not repack:
        merge = _small_fragments(fragments)
        if merge:  # deletes no data, so no writer needs waiting for
            lock.check()
            _rewrite_index(repo, fragments, merge, set(), packs, {}, report)
            repo.index(reload=True)
        _delete_temps(repo, report, temp_age)
        return report
    lock.publish(sorted(doomed | repack))
    deadline = time.monotonic() + wait
    while True:
        sessions = repo.live_sessions()
        if not sessions:
            break
        if time.monotonic() >= deadline:
            report.kept_for_writers = len(doomed | repack)
            report.waiting_on = [f"{s.get('host')} pid {s.get('pid')}" for s in sessions]
            return report
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        lock.publish(sorted(doomed | repack))
    # Writers that were running have finished: read the index again (their fragments name
    # packs listed above) and mark again, their commits count.
    fragments, by_pack = _fresh_index(repo)
    _snaps, live = _mark(repo)
    doomed2, repack2 = plan(live)
    doomed &= doomed2
    repack &= repack2 | doomed2
    repack -= doomed
    # Repack the live blobs of mostly-dead packs into new packs.
    new_entries: dict[str, tuple[int, list[fmt.PackEntry]]] = {}
    if repack:
        session_like = _Repacker(repo)
        for pid in sorted(repack):
            for bid, (_p, codec, off, length, raw) in by_pack[pid]:
                if keeper.get(bid) == pid and bid not in session_like.seen:
                    stored = repo.read_pack_range(pid, off, length)
                    fmt.unpack_blob(bid, codec, stored, raw)  # never copy damage forward
                    session_like.add(bid, codec, stored, raw)
        new_entries = session_like.finish()
        report.packs_repacked = len(repack)
        doomed |= repack
    lock.check()  # nothing is deleted by a prune that lost its lock
    # Touched fragments are replaced by their surviving entries; many small ones are
    # merged while at it, so that opening the vault on a fresh machine stays a few reads.
    touched = {fid for fid, frag in fragments.items() if any(e[0] in doomed for e in frag.values())}
    _rewrite_index(repo, fragments, touched | _small_fragments(fragments), doomed, packs, new_entries, report)
    for pid in sorted(doomed):
        try:
            backend.delete(pack_name(pid))
            report.packs_deleted += 1
            report.bytes_deleted += packs[pid].size
        except ObjectNotFound:
            pass
    repo.index(reload=True)
    _delete_temps(repo, report, temp_age)
    return report


def _small_fragments(fragments: dict[str, dict[bytes, fmt.IndexEntry]]) -> set[str]:
    """The small fragments, when there are enough of them to be worth merging."""
    small = {fid for fid, frag in fragments.items() if len(frag) < COMPACT_ENTRIES}
    return small if len(small) > COMPACT_COUNT else set()


def _rewrite_index(
    repo: Repository,
    fragments: dict[str, dict[bytes, fmt.IndexEntry]],
    touched: set[str],
    doomed: set[str],
    packs: dict[str, ObjectInfo],
    new_entries: dict[str, tuple[int, list[fmt.PackEntry]]],
    report: PruneReport,
) -> None:
    """Replace the ``touched`` fragments by new ones holding their entries outside the
    ``doomed`` packs, plus ``new_entries``; written before the old ones are deleted, so a
    reader always finds every live blob (it lists again when a listed fragment is gone)."""
    kept: dict[str, dict[bytes, fmt.PackEntry]] = defaultdict(dict)  # each (pack, blob) once
    for fid in touched:
        for bid, (pid, codec, off, length, raw) in fragments[fid].items():
            if pid not in doomed:
                kept[pid].setdefault(bid, fmt.PackEntry(bid, codec, off, length, raw))
    survivors: dict[str, tuple[int, list[fmt.PackEntry]]] = dict(new_entries)
    for pid, by_blob in kept.items():
        entries = list(by_blob.values())
        # The size recorded is never less than the entries' extent: a pack uploaded after
        # we listed packs (a writer we waited for) has no listed size, and a truncated one
        # (verify names it) must not make the parser refuse the whole new fragment.
        extent = max(e.offset + e.length for e in entries)
        survivors[pid] = (max(packs[pid].size, extent) if pid in packs else extent, entries)
    groups: list[dict[str, tuple[int, list[fmt.PackEntry]]]] = [{}]
    count = 0
    for pid, value in survivors.items():
        if count >= FRAGMENT_ENTRIES:
            groups.append({})
            count = 0
        groups[-1][pid] = value
        count += len(value[1])
    for group in groups:
        if group:
            _put_fragment(repo, group)
    for fid in touched:  # only once every replacement is written and reads back whole
        try:
            repo.backend.delete(f"index/{fid}")
        except ObjectNotFound:
            pass
        report.index_rewritten += 1


def _put_fragment(repo: Repository, packs: dict[str, tuple[int, list[fmt.PackEntry]]]) -> None:
    data = fmt.build_index(packs, os.urandom(8).hex())
    want = {e.blob_id for _size, entries in packs.values() for e in entries}
    try:
        whole = set(fmt.parse_index(data)) == want
    except VaultCorrupt:
        whole = False
    if not whole:  # before any old fragment is deleted
        raise VaultCorrupt("a rewritten index fragment does not read back whole", "nothing was deleted; run `liferaft verify`")
    repo.backend.put(f"index/{fmt.hexdigest(data)}", data, overwrite=False)


def _delete_temps(repo: Repository, report: PruneReport, temp_age: float) -> None:
    backend = repo.backend
    if isinstance(backend, LocalBackend):
        for obj in backend.list_temp():
            if time.time() - obj.mtime > temp_age:
                try:
                    os.unlink(backend.root / obj.name)
                    report.temp_deleted += 1
                except OSError:
                    pass
    repo.live_sessions()  # removes the dead writers' sessions


class _Repacker:
    """Writes already-stored blobs into fresh packs (no re-compression)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.buf = bytearray()
        self.entries: list[fmt.PackEntry] = []
        self.out: dict[str, tuple[int, list[fmt.PackEntry]]] = {}
        self.seen: set[bytes] = set()

    def add(self, bid: bytes, codec: int, stored: bytes, raw: int) -> None:
        self.entries.append(fmt.PackEntry(bid, codec, len(self.buf), len(stored), raw))
        self.buf += stored
        self.seen.add(bid)
        if len(self.buf) >= self.repo.pack_target:
            self._seal()

    def _seal(self) -> None:
        if not self.entries:
            return
        header = fmt.build_pack_header(os.urandom(16), self.entries)
        self.buf += header
        data = bytes(self.buf)
        pid = fmt.pack_id(header)
        self.repo.backend.put(pack_name(pid), data, overwrite=False)
        self.out[pid] = (len(data), self.entries)
        self.buf = bytearray()
        self.entries = []

    def finish(self) -> dict[str, tuple[int, list[fmt.PackEntry]]]:
        self._seal()
        return self.out
