"""Snapshot back to folders: the restorer.

Every blob is checked against its BLAKE3 id before a byte of it is written. Files are
written to temp names beside their final place and renamed only once the whole
snapshot has been read and verified, so a damaged snapshot changes nothing on disk
(and the caller can fall back to the one before). Nothing is written through a link
or outside the target: paths are checked, parent folders must be real folders, and
links that point out of the tree are not created.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import ObjectNotFound
from ..errors import RestoreRefused, VaultCorrupt
from ..platform import pid_alive, pid_scope
from ..progress import Progress, SyncedProgress
from . import format as fmt
from .repository import Repository, SnapshotInfo, parallel_map
from .statcache import StatCache, stat_key

SEGMENT = 8 << 20
GAP = 1 << 20
SEGMENT_BLOBS = 500  # small files per unit of work, so that one pack's files are made in parallel
_CREATE = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

# A restore's temp files: ``.liferaft-SCOPE-PID-RANDOM.tmp`` (see ``platform.pid_scope``),
# or ``.liferaft-RANDOM.tmp`` from liferaft 0.1, which carried no owner.
_TEMP = re.compile(r"\.liferaft-(?:([0-9a-f]{8})-([0-9]{1,10})-)?[0-9a-f]{12}\.tmp")


def is_restore_temp(name: str) -> bool:
    """Whether a file name is a restore's temp file (never user data: snapshots skip it)."""
    return name.startswith(".liferaft-") and _TEMP.fullmatch(name) is not None


def _temp_name() -> str:
    return f".liferaft-{pid_scope() or '00000000'}-{os.getpid()}-{os.urandom(6).hex()}.tmp"


def sweep_temps(folder: str | os.PathLike[str]) -> int:
    """Remove the temp files that killed restores left in ``folder``; return how many.

    Only files stamped with this machine's pid scope and a pid that is not alive are
    removed: a running restore's temps, another machine's and old unstamped ones stay.
    """
    removed = 0
    scope = pid_scope()
    if not scope:
        return 0
    try:
        with os.scandir(folder) as it:
            names = [de.name for de in it if de.name.startswith(".liferaft-")]
    except OSError:
        return 0
    for name in names:
        m = _TEMP.fullmatch(name)
        if m is None or m.group(1) != scope or pid_alive(int(m.group(2))):
            continue
        try:
            path = os.path.join(folder, name)
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
                removed += 1
        except OSError:
            pass
    return removed


def _finish_file(fd: int, f: fmt.Entry) -> None:
    """Mode and time on a complete temp file, then close it (rename keeps both)."""
    try:
        os.fchmod(fd, f.mode & 0o1777)  # never set-uid/set-gid from a vault
        os.utime(fd, ns=(f.mtime_ns, f.mtime_ns))
    finally:
        os.close(fd)


@dataclass
class RestoreResult:
    snapshot: SnapshotInfo
    destinations: dict[str, Path]
    files: int = 0
    nbytes: int = 0
    skipped_links: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    stale_temps_removed: int = 0  # left by restores that were killed (see sweep_temps)


def _check_source(source: str) -> Path:
    if not source.startswith("/") or "\x00" in source or ".." in source.split("/"):
        raise VaultCorrupt(f"snapshot names an unsafe original location {source!r:.80}")
    return Path(source)


def destinations(
    snap: SnapshotInfo,
    to: str | os.PathLike[str] | None,
    targets: Mapping[str, str | os.PathLike[str]] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Path]:
    """Where each saved root goes: ``targets[name]``, else ``to/name``, else where it came from.

    With ``only``, just those roots are restored.
    """
    out = {}
    known = {root["name"] for root in snap.roots}
    for name in [*(targets or {}), *(only or ())]:
        if name not in known:
            raise RestoreRefused(f"snapshot {snap.short_id} has no path named {name!r}", f"it has: {', '.join(sorted(known))}")
    for root in snap.roots:
        name = root["name"]
        if only is not None and name not in only:
            continue
        if targets and name in targets:
            out[name] = Path(os.path.abspath(targets[name]))
        elif to is not None:
            out[name] = Path(os.path.abspath(to)) / name
        else:
            out[name] = _in_place(snap, name, _check_source(root.get("source", "")))
    return out


def _in_place(snap: SnapshotInfo, name: str, source: Path) -> Path:
    """Where a saved path goes back to: where it came from, unless it came from another
    machine whose layout this one lacks. A run restored on a fresh machine into another
    folder, with no change since, has no newer snapshot to name the new place: its
    snapshot still names the old machine's path, where a restore would make folders
    that nothing here reads.

    The layout is missing when two or more folders above the saved path are
    (``/home/alice/proj`` on another machine), or one of the path's top two folders
    is (``/content`` off Colab, ``/kaggle/working`` off Kaggle). One missing folder
    below those is made, as on the machine itself: a new Colab VM (another host
    name) with the project cloned again but its ``outputs/`` not made yet restores
    ``/content/proj/outputs/ckpt`` in place.
    """
    from ..platform import hostname

    if not snap.host or snap.host == hostname():
        return source
    missing = []
    folder = source.parent
    while folder != folder.parent and not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    top = Path(*source.parts[:3]) if len(source.parts) > 3 else source.parent
    if not missing or (len(missing) == 1 and top.is_dir()):
        return source
    gone = missing[-1]
    drive = Path("/content/drive")
    if gone == drive or drive in gone.parents or gone in drive.parents:
        first = "mount Google Drive at /content/drive first"
    else:
        first = f"make {gone} (clone the project there) to restore in place"
    raise RestoreRefused(
        f"snapshot {snap.short_id} was taken on {snap.host} from {source}, and {gone} does not exist on this machine",
        f"{first}, or pass to=DIR (DIR/{name})",
        cli_fix=f"{first}, or restore with --to DIR (DIR/{name})",
    )


def dangling_link(path: Path) -> tuple[Path, str] | None:
    """The link to something absent that ``path`` is or lies below (``checkpoints ->
    /content/drive/...`` before Drive is mounted), with its target; None if there is none."""
    while not os.path.exists(path):
        if os.path.islink(path):
            try:
                return path, os.readlink(path)
            except OSError:
                return path, "?"
        if path.parent == path:
            return None
        path = path.parent
    return None


def _refuse_dangling(path: Path) -> None:
    """Refuse to restore through a dangling link: replacing the link, or a folder made in
    its place, would put the files where the user's own setup does not look."""
    found = dangling_link(path)
    if found is not None:
        raise RestoreRefused(
            f"{found[0]} is a link to {found[1]}, which does not exist",
            "mount or create what it points to (e.g. Google Drive), remove the link, or restore with --to DIR",
        )


def _describe(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "link"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    return "file"


class _Tree:
    """Makes folders below a destination root without ever following a link."""

    def __init__(self) -> None:
        self.made: set[Path] = set()
        self.created: dict[Path, None] = {}  # folders this restore made, parents first
        self.created_names: set[str] = set()  # the same, as strings (a Path hashes slowly)
        self._ensured: dict[tuple[str, ...], Path] = {}
        self.swept: set[str] = set()
        self.stale_removed = 0

    def sweep(self, folder: str | os.PathLike[str]) -> None:
        """Once per folder that was there before this restore: clear killed restores' temps."""
        key = os.fspath(folder)
        if key in self.swept:
            return
        self.swept.add(key)
        if key not in self.created_names:
            self.stale_removed += sweep_temps(key)

    def remove_created(self) -> None:
        """Take back the folders of a restore that failed before showing anything."""
        for path in reversed(self.created):
            try:
                os.rmdir(path)
            except OSError:
                pass

    def ensure_root(self, root: Path) -> None:
        if root in self.made:
            return
        try:
            st = os.stat(root)  # the root itself may be a link the user made (e.g. to Drive)
            if not stat.S_ISDIR(st.st_mode):
                raise RestoreRefused(f"{root} is a file where a folder is to be restored", "move it away or restore with --to DIR")
        except FileNotFoundError:
            missing, p = [], root
            while not os.path.lexists(p):
                missing.append(p)
                p = p.parent
            _refuse_dangling(root)
            os.makedirs(root, exist_ok=True)
            self.created.update(dict.fromkeys(reversed(missing)))
            self.created_names.update(str(p) for p in missing)
        self.made.add(root)

    def ensure(self, root: Path, rel_parts: list[str]) -> Path:
        key = (str(root), *rel_parts)
        known = self._ensured.get(key)
        if known is not None:
            return known
        self.ensure_root(root)
        path = root
        for part in rel_parts:
            path = path / part
            if path in self.made:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                self.created[path] = None
                self.created_names.add(str(path))
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise RestoreRefused(
                        f"{path} is a {_describe(st)} where the snapshot has a folder",
                        "move it away or restore with --to DIR",
                    )
            self.made.add(path)
        self._ensured[key] = path
        return path


def _newer_work(st: os.stat_result, f: fmt.Entry) -> bool:
    """A regular file that is not the snapshot's version of it and was modified after that
    version was (a file rewritten while the snapshot ran counts: the snapshot kept the
    version before)."""
    same = st.st_size == f.size and st.st_mtime_ns == f.mtime_ns
    return stat.S_ISREG(st.st_mode) and not same and st.st_mtime_ns > f.mtime_ns


def _split(entry_path: str) -> tuple[str, list[str]]:
    parts = entry_path.split("/")
    return parts[0], parts[1:]


def restore_snapshot(
    repo: Repository,
    snap: SnapshotInfo,
    *,
    to: str | os.PathLike[str] | None = None,
    targets: Mapping[str, str | os.PathLike[str]] | None = None,
    only: Collection[str] | None = None,
    progress: Progress | None = None,
    workers: int = min(4, os.cpu_count() or 2),
    update_cache: bool = True,
    replace_newer: bool = True,
) -> RestoreResult:
    """Restore ``snap`` into ``to`` (each saved path as ``to/NAME``) or back where it was.

    ``targets`` maps a saved path's name to its own destination, overriding both. With
    ``replace_newer=False``, a file in the way that differs from the snapshot's version
    and was modified after it (work the snapshot does not have) makes the restore refuse
    before any file is written or removed.
    """
    progress = progress or Progress()
    dests = destinations(snap, to, targets, only)
    entries = repo.read_tree(snap)
    if only is not None:
        entries = [e for e in entries if e.path.split("/")[0] in dests]
    result = RestoreResult(snap, dests)
    root_kinds = {r["name"]: r["type"] for r in snap.roots}
    for e in entries:
        if e.path.split("/")[0] not in dests:
            raise VaultCorrupt(f"tree entry {e.path!r:.80} is outside the snapshot's roots")
    index = repo.index()
    files = [e for e in entries if e.type == fmt.TYPE_FILE]
    for f in files:
        offset = 0
        for b in f.blobs:
            entry = index.get(bytes.fromhex(b))
            if entry is None:
                index = repo.index(reload=True)
                entry = index.get(bytes.fromhex(b))
                if entry is None:
                    raise VaultCorrupt(f"snapshot {snap.short_id} needs blob {b[:12]} which the vault does not hold")
            offset += entry[4]
        if offset != f.size:
            raise VaultCorrupt(f"snapshot {snap.short_id}: {f.path!r:.80} is {f.size} bytes but its blobs add up to {offset}")

    tree = _Tree()
    newer: list[str] = []  # files in the way holding work the snapshot does not have
    folders: list[str | Path] = []  # where temps go: swept of killed restores' temps
    temps: dict[int, str] = {}
    finals: dict[int, str] = {}
    shown = False
    try:
        # Folders first; every file's place is checked before any byte is read.
        for e in entries:
            root, rel = _split(e.path)
            if e.type == fmt.TYPE_DIR:
                if rel:
                    tree.ensure(dests[root], rel)
                else:
                    tree.ensure_root(dests[root])
        for i, f in enumerate(files):
            root, rel = _split(f.path)
            if not rel:  # the root itself is a file
                parent = dests[root].parent
                tree.ensure_root(parent)  # made folders are taken back if this restore fails
                _refuse_dangling(dests[root])
                final = str(dests[root])
            else:
                parent = tree.ensure(dests[root], rel[:-1])
                final = os.path.join(parent, rel[-1])
            try:
                st = os.lstat(final)  # even in a folder this restore made: a folder it made may be in the way
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(st.st_mode):
                    raise RestoreRefused(f"{final} is a folder where the snapshot has a file", "move it away or restore with --to DIR")
                if not replace_newer and _newer_work(st, f):
                    newer.append(final)
                    continue
            folders.append(parent)
            temps[i] = os.path.join(parent, _temp_name())
            finals[i] = final
            if not f.blobs:
                _finish_file(os.open(temps[i], _CREATE, 0o600), f)
        if newer:
            raise RestoreRefused(
                f"{len(newer)} file(s) in the way are newer than snapshot {snap.short_id}'s version, e.g. {newer[0]}",
                "restore elsewhere with --to DIR, or replace them with --force",
            )
        for folder in folders:
            tree.sweep(folder)
        _fill(repo, files, temps, index, progress, workers)
        # Everything verified: now make it visible.
        shown = True
        stats = _show([(temps[i], finals[i]) for i in range(len(files))], update_cache, workers)
        temps.clear()
        result.files = len(files)
        result.nbytes = sum(f.size for f in files)
        for e in entries:
            if e.type != fmt.TYPE_LINK:
                continue
            root, rel = _split(e.path)
            if not rel or fmt.link_escapes(e.path, e.target):
                result.skipped_links.append(f"{e.path} -> {e.target}")
                continue
            parent = tree.ensure(dests[root], rel[:-1])
            final = parent / rel[-1]
            tree.sweep(parent)
            tmp = parent / _temp_name()
            os.symlink(e.target, tmp)
            try:
                if stat.S_ISDIR(os.lstat(final).st_mode):
                    os.unlink(tmp)
                    raise RestoreRefused(f"{final} is a folder where the snapshot has a link", "move it away or restore with --to DIR")
            except FileNotFoundError:
                pass
            os.replace(tmp, final)
            try:
                os.utime(final, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
            except (NotImplementedError, OSError):
                pass
        for e in sorted((e for e in entries if e.type == fmt.TYPE_DIR), key=lambda e: -e.path.count("/")):
            root, rel = _split(e.path)
            path = dests[root].joinpath(*rel)
            if rel or root_kinds.get(root) == fmt.TYPE_DIR:
                os.chmod(path, (e.mode & 0o1777) | 0o700)
                os.utime(path, ns=(e.mtime_ns, e.mtime_ns))
    except OSError as err:
        where = getattr(err, "filename2", None) or getattr(err, "filename", None) or "a file"  # a rename's target, else the file
        raise RestoreRefused(f"restore failed writing {where}: {err.strerror}", "check the target folder and free space") from None
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not shown:
            tree.remove_created()
    result.stale_temps_removed = tree.stale_removed
    if update_cache:
        _record_cache(repo, dests, files, stats)
    return result


_SHOW_BATCH = 1000


def _show(moves: list[tuple[str, str]], want_stat: bool, workers: int) -> list[os.stat_result | None]:
    """Rename each verified temp file to its name; with ``want_stat``, each one's stat after.

    In threads for many files: a rename waits on the file system, not on the GIL."""

    failed = threading.Event()

    def batch(part: list[tuple[str, str]]) -> list[os.stat_result | None]:
        out: list[os.stat_result | None] = []
        for tmp, final in part:
            if failed.is_set():
                break  # another thread's rename failed: stop soon, as one thread would
            try:
                os.replace(tmp, final)
            except BaseException:
                failed.set()
                raise
            st = None
            if want_stat:
                try:
                    st = os.lstat(final)
                except OSError:
                    pass
            out.append(st)
        return out

    parts = [moves[k : k + _SHOW_BATCH] for k in range(0, len(moves), _SHOW_BATCH)]
    return [st for done in parallel_map(batch, parts, workers, "liferaft-restore") for st in done]


def _fill(
    repo: Repository,
    files: list[fmt.Entry],
    temps: dict[int, str],
    index: dict[bytes, fmt.IndexEntry],
    progress: Progress,
    workers: int,
) -> None:
    """Read every needed blob pack by pack, verify it, and write it where it goes."""
    targets: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for i, f in enumerate(files):
        offset = 0
        for b in f.blobs:
            bid = bytes.fromhex(b)
            targets[bid].append((i, offset))
            offset += index[bid][4]
    by_pack: dict[str, list[tuple[int, int, int, int, bytes]]] = defaultdict(list)
    for bid in targets:
        pack_id, codec, off, length, raw = index[bid]
        by_pack[pack_id].append((off, length, codec, raw, bid))
    total = sum(f.size for f in files)
    progress = SyncedProgress(progress)  # workers report from their threads
    progress.start("restore", len(files), total)
    empty = sum(1 for f in files if not f.size)
    if empty:
        progress.advance(empty, 0)
    remaining = {i: len(f.blobs) for i, f in enumerate(files)}
    lock = threading.Lock()
    local = threading.local()  # one reusable read buffer per worker

    def do_segment(job: tuple[str, list[tuple[int, int, int, int, bytes]]]) -> None:
        pack_id, seg = job
        start = seg[0][0]
        end = seg[-1][0] + seg[-1][1]
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < end - start:
            buf = local.buf = bytearray(max(SEGMENT + (4 << 20), end - start))
        data = memoryview(buf)[: end - start]
        moved: dict[bytes, bytes] | None = None
        try:
            repo.read_pack_into(pack_id, start, data)
        except ObjectNotFound:
            # A prune (here or in another process) repacked these blobs since our index
            # was read: read_blob reloads the index and reads them where they are now,
            # raising VaultCorrupt only if they are really gone.
            moved = {item[4]: repo.read_blob(item[4]) for item in seg}
        for off, length, codec, raw, bid in seg:
            plain = moved[bid] if moved is not None else fmt.unpack_blob(bid, codec, data[off - start : off - start + length], raw)
            for i, file_off in targets[bid]:
                # Temp names are random and fresh: created by the first blob to arrive.
                fd = os.open(temps[i], _CREATE, 0o600)
                try:
                    view = memoryview(plain)
                    pos = file_off
                    while view:
                        n = os.pwrite(fd, view, pos)
                        view = view[n:]
                        pos += n
                    with lock:
                        remaining[i] -= 1
                        done = remaining[i] == 0
                    if done:
                        _finish_file(fd, files[i])
                        fd = -1
                finally:
                    if fd >= 0:
                        os.close(fd)
                progress.advance(1 if done else 0, raw)

    # The unit of work is a segment: one read of nearby blobs in a pack. A pack of many
    # small files is cut into several, so that its files are made by every worker.
    work: list[tuple[str, list[tuple[int, int, int, int, bytes]]]] = []
    for pack_id, items in by_pack.items():
        seg: list[tuple[int, int, int, int, bytes]] = []
        for item in sorted(items):
            if seg and (item[0] - (seg[-1][0] + seg[-1][1]) > GAP or item[0] + item[1] - seg[0][0] > SEGMENT or len(seg) >= SEGMENT_BLOBS):
                work.append((pack_id, seg))
                seg = []
            seg.append(item)
        if seg:
            work.append((pack_id, seg))
    with progress:  # Ctrl-C or a failure: stopped, not "done"
        parallel_map(do_segment, work, workers, "liferaft-restore")


def _record_cache(repo: Repository, dests: dict[str, Path], files: list[fmt.Entry], stats: list[os.stat_result | None]) -> None:
    """Restored files are known: the next snapshot of these folders need not read them."""
    per_root: dict[str, dict[str, list[object]]] = defaultdict(dict)
    for f, st in zip(files, stats, strict=True):
        if st is None:
            continue
        root, rel = _split(f.path)
        per_root[root]["/".join(rel) or "."] = [*stat_key(st), f.blobs]
    for root, entries in per_root.items():
        cache = StatCache(repo.id, dests[root]).load()
        merged = dict(cache.entries)
        merged.update(entries)
        cache.save(merged)
