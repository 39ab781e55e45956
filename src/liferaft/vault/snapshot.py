"""Walk folders into a snapshot: the archiver.

Files are read once, hashed with BLAKE3 and cut by FastCDC above the small-file size;
unchanged files are recognised by the stat cache and not read at all. A file that
changes while it is read is not committed in this snapshot: its previous version
(from the parent snapshot) stays, and the next pass takes it. A file that cannot be
read (permission denied, a mount's I/O error) is skipped with its reason, like an
unreadable folder, and its previous version stays too.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import functools
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import LiferaftError
from ..platform import hostname
from ..progress import Progress, SyncedProgress
from . import format as fmt
from .repository import Repository, SnapshotInfo, StreamPacker, WriteSession, info_from_manifest
from .restore import is_restore_temp
from .statcache import SECRET, StatCache, stat_key

# Never snapshotted unless asked: credentials that must not leave the machine.
SECRET_PATTERNS = (
    ".netrc",
    ".git-credentials",
    ".pypirc",
    "kaggle.json",
    "credentials",
    "application_default_credentials.json",
    "adc.json",
    "id_rsa",
    "id_ecdsa",
    "id_ed25519",
    "*.pem",
    ".env",
    ".env.*",
    "token",
    "*.token",
    "ngrok.yml",
    "service-account*.json",
    "*-sa-key.json",
)


@functools.lru_cache(maxsize=8)
def _secret_matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


def is_secret(name: str, patterns: Sequence[str] = SECRET_PATTERNS) -> bool:
    """Whether a file name matches one of the credential patterns (case-sensitive)."""
    return bool(patterns) and _secret_matcher(tuple(patterns))(name) is not None


# A key downloaded from a cloud console keeps whatever name it was given
# (my-project-1234-0123abcd.json, credentials.json): JSON files are also judged by what
# they hold. Service-account keys have "private_key", OAuth client files "client_secret",
# user credentials (gcloud's ADC, authorized_user) "refresh_token".
_KEY_FIELDS = (b'"private_key"', b'"client_secret"', b'"refresh_token"')


def holds_credentials(data: bytes) -> bool:
    """Whether a JSON file's bytes hold a credential field."""
    return data.lstrip()[:1] == b"{" and any(field in data for field in _KEY_FIELDS)


#: The reason a socket, FIFO or device in a snapshotted folder is skipped: never data to keep.
NOT_KEPT_KIND = "not a file, folder or link"


@dataclass
class _Item:
    entry: fmt.Entry
    abspath: str
    st: os.stat_result | None = None
    sniff: bool = False  # a JSON file: left out if it holds credentials (see holds_credentials)
    secret: bool = False  # it did
    unreadable: str | None = None  # why it could not be read (EACCES, EIO): skipped, not "changed while read"


@dataclass
class WalkResult:
    items: list[_Item] = field(default_factory=list)
    files: int = 0
    nbytes: int = 0
    skipped: list[str] = field(default_factory=list)  # "abspath: reason"
    gone: list[str] = field(default_factory=list)  # paths in the snapshot gone between listing and looking: changed
    secrets: list[str] = field(default_factory=list)  # paths in the snapshot ("ckpt/kaggle.json"), left out


def root_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = p.name or "root"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _walk(root: Path, name: str, result: WalkResult, skip: set[str], include_secrets: bool) -> str:
    """Collect entries below ``root``; return the root's type."""
    try:
        st = os.stat(root)  # the root a user names is followed, links inside are not
    except FileNotFoundError:
        raise LiferaftError(f"{root} does not exist", "check the path you asked to snapshot") from None
    except PermissionError:
        raise LiferaftError(f"{root} cannot be read (permission denied)", "check its permissions") from None
    if stat.S_ISREG(st.st_mode):
        result.items.append(_Item(fmt.Entry(name, fmt.TYPE_FILE, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size), str(root), st))
        result.files += 1
        result.nbytes += st.st_size
        return fmt.TYPE_FILE
    if not stat.S_ISDIR(st.st_mode):
        raise LiferaftError(f"{root} is neither a file nor a folder", "snapshot files and folders only")
    result.items.append(_Item(fmt.Entry(name, fmt.TYPE_DIR, stat.S_IMODE(st.st_mode), st.st_mtime_ns), str(root)))
    stack = [(str(root), name)]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            if err.errno in _GONE:
                result.gone.append(rel)  # renamed or deleted since its parent was listed
            else:
                result.skipped.append(f"{folder}: {err.strerror}")
            continue
        subdirs = []
        for de in entries:
            path = f"{rel}/{de.name}"
            if de.path in skip:
                continue
            if is_restore_temp(de.name) and not de.is_dir(follow_symlinks=False):
                continue  # a running or killed restore's temp file, never user data
            if "\\" in de.name or "\x00" in de.name:
                result.skipped.append(f"{de.path}: name not portable")
                continue
            try:
                est = de.stat(follow_symlinks=False)
            except OSError as err:
                if err.errno in _GONE:
                    result.gone.append(path)
                else:
                    result.skipped.append(f"{de.path}: {err.strerror}")
                continue
            mode = est.st_mode
            if stat.S_ISLNK(mode):
                try:
                    target = os.readlink(de.path)
                except OSError as err:
                    result.skipped.append(f"{de.path}: {err.strerror}")
                    continue
                result.items.append(_Item(fmt.Entry(path, fmt.TYPE_LINK, stat.S_IMODE(mode), est.st_mtime_ns, target=target), de.path))
            elif stat.S_ISDIR(mode):
                result.items.append(_Item(fmt.Entry(path, fmt.TYPE_DIR, stat.S_IMODE(mode), est.st_mtime_ns), de.path))
                subdirs.append((de.path, path))
            elif stat.S_ISREG(mode):
                if not include_secrets and is_secret(de.name):
                    result.secrets.append(path)
                    continue
                sniff = not include_secrets and de.name.endswith(".json")
                result.items.append(
                    _Item(fmt.Entry(path, fmt.TYPE_FILE, stat.S_IMODE(mode), est.st_mtime_ns, est.st_size), de.path, est, sniff)
                )
                result.files += 1
                result.nbytes += est.st_size
            else:
                result.skipped.append(f"{de.path}: {NOT_KEPT_KIND}")
        stack.extend(reversed(subdirs))
    return fmt.TYPE_DIR


class _Reader:
    """Reads one file into blobs, noticing a change made while reading."""

    def __init__(self, session: WriteSession, repo: Repository) -> None:
        self.session = session
        self.params = repo.chunker
        self.small = repo.chunker.small_file
        self._packer: StreamPacker | None = None

    def packer(self) -> StreamPacker:
        if self._packer is None:
            import pyfastcdc  # on first use: a pass that reads no large file never loads it

            p = self.params
            cdc = pyfastcdc.FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, seed=p.seed)
            self._packer = self.session.packer(cdc)
        return self._packer

    def read(self, item: _Item, progress: Progress) -> list[str] | None:
        """Blob ids of the file's bytes, or None when it changed while being read or
        could not be read (then ``item.unreadable`` says why).

        The file is judged by what was opened, not by the walk's earlier stat: a
        checkpoint replaced (temp + rename) between the walk and the read is taken in
        its new version, and only a change *during* the read skips it. The entry's size,
        time and mode, and ``item.st``, are updated to the version read.
        """
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(item.abspath, flags)  # O_NONBLOCK: a FIFO swapped in must not hang us
        except OSError as err:
            _note_unreadable(item, err)
            return None
        blobs: list[str] = []
        total = 0
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                opened = os.fstat(f.fileno())
                if not stat.S_ISREG(opened.st_mode):
                    return None
                if opened.st_size <= self.small:
                    # One byte past the size it has: a file that grew is noticed below,
                    # and a 4 KiB file costs a 4 KiB buffer, not a 1 MiB one.
                    data = f.read(opened.st_size + 1)
                    total = len(data)
                    if item.sniff and holds_credentials(data):
                        item.secret = True  # before a byte of it is stored
                        item.st = opened  # the version judged, for the stat cache
                        return None
                    if data:
                        blobs.append(self.session.add(data).hex())
                    progress.advance(0, total)
                else:
                    ids, total = self.packer().add_file(f, lambda n: progress.advance(0, n))
                    blobs = [b.hex() for b in ids]
                after = os.fstat(f.fileno())
        except OSError as err:
            _note_unreadable(item, err)
            return None
        if total != opened.st_size or stat_key(after) != stat_key(opened):
            return None
        item.st = opened
        item.entry.size = opened.st_size
        item.entry.mtime_ns = opened.st_mtime_ns
        item.entry.mode = stat.S_IMODE(opened.st_mode)
        return blobs


# What a file moved, deleted or swapped for a link between the walk and the read gives:
# a change, taken by the next pass. Any other error (EACCES, EIO from a flaky mount) is
# the file itself failing, and retrying soon would only fail again.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


def _note_unreadable(item: _Item, err: OSError) -> None:
    if err.errno not in _GONE:
        item.unreadable = err.strerror or type(err).__name__


def _same_roots(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """The same roots by what a restore reproduces (name and kind), wherever they lie.

    The absolute ``source`` is left out: a run restored into another working folder (a
    fresh machine) is not a change, and a snapshot committed only to record the new
    place would hold the same files again. The next real change records it.
    """
    return [(r.get("name"), r.get("type")) for r in a] == [(r.get("name"), r.get("type")) for r in b]


TREE_MIN, TREE_AVG, TREE_MAX = 16 << 10, 64 << 10, 256 << 10


def _cut_tree(repo: Repository, tree: bytes) -> list[bytes]:
    """The encoded tree cut into blobs by content, so that a small change keeps most blobs."""
    if len(tree) <= TREE_MIN:
        return [tree] if tree else []  # what FastCDC yields for so short an input, without loading it
    import pyfastcdc

    cdc = pyfastcdc.FastCDC(TREE_AVG, min_size=TREE_MIN, max_size=TREE_MAX, seed=repo.chunker.seed)
    return [bytes(c.data) for c in cdc.cut_buf(tree)]


def _unchanged(repo: Repository, walk: WalkResult, caches: dict[str, StatCache], parent: SnapshotInfo) -> bool:
    """True when every file is known to the stat cache and the tree equals the parent's.

    Reads no file and writes nothing: the cheap check an idle background pass makes.
    """
    index = repo.index()
    entries = []
    secrets = []
    for item in walk.items:
        entry = item.entry
        if entry.type == fmt.TYPE_FILE:
            assert item.st is not None
            root_name, _, rel = entry.path.partition("/")
            if item.sniff and caches[root_name].known_secret(rel or ".", item.st):
                secrets.append(entry.path)
                continue  # left out, as it was: a credential file does not make a pass busy
            blobs = caches[root_name].lookup(rel or ".", item.st)
            if blobs is None or not all(bytes.fromhex(b) in index for b in blobs):
                return False
            entry = fmt.Entry(entry.path, entry.type, entry.mode, entry.mtime_ns, entry.size, blobs)
        entries.append(entry)
    tree = fmt.encode_tree(entries)
    if [fmt.hexdigest(c) for c in _cut_tree(repo, tree)] != parent.tree:
        return False
    walk.secrets.extend(secrets)
    return True


def _as_unchanged(parent: SnapshotInfo, walk: WalkResult, changed: list[str]) -> SnapshotInfo:
    """``parent``, returned for a pass that committed nothing, with what this pass met.

    A file that changed while read (its previous version is the parent's) makes the pass
    busy although its tree equals the parent's; skipped and credential files are this
    pass's, not those the parent met.
    """
    stats = {
        **parent.stats,
        "changed_during_read": changed[:100],
        "skipped": walk.skipped[:100],
        "secrets_excluded": len(walk.secrets),
        "secrets_excluded_paths": walk.secrets[:100],
    }
    return dataclasses.replace(parent, stats=stats, unchanged=True)


def _readers() -> int:
    """Large files read at once. Chunking and hashing release the GIL, so a second reader
    uses a second core (1 GiB in 4 files: 0.88 s -> 0.72 s on 2 cores); small files stay
    in one thread, where their per-file Python work would only contend for the GIL."""
    return max(1, min(4, os.cpu_count() or 1))


def _read_files(session: WriteSession, repo: Repository, items: list[_Item], progress: Progress) -> list[list[str] | None]:
    """Blob ids of each file (None: changed while read, or unreadable), in order.

    Files above the small-file size are read by a pool of readers while this thread
    reads the small ones.
    """
    out: list[list[str] | None] = [None] * len(items)
    big = [k for k, item in enumerate(items) if item.entry.size > repo.chunker.small_file]
    readers = _readers()
    if readers <= 1 or len(big) < 2:
        reader = _Reader(session, repo)
        for k, item in enumerate(items):
            out[k] = reader.read(item, progress)
            progress.advance(1, 0)
        session.close_packers()
        return out
    synced = SyncedProgress(progress)
    local = threading.local()

    def read_one(k: int) -> None:
        reader = getattr(local, "reader", None)
        if reader is None:
            reader = local.reader = _Reader(session, repo)
        out[k] = reader.read(items[k], synced)
        synced.advance(1, 0)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(readers, len(big)), thread_name_prefix="liferaft-read") as pool:
        futures = [pool.submit(read_one, k) for k in big]
        chosen = set(big)
        for k in range(len(items)):
            if k not in chosen:
                read_one(k)
        for fut in futures:
            fut.result()
    session.close_packers()
    return out


def _check_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise LiferaftError(f"metric {k!r} is {v!r}, not a finite number", "pass numbers, e.g. metrics={'loss': 0.31}")
        out[str(k)] = float(v) if isinstance(v, float) else v
    return out


def _check_roots(roots: list[Path], given: list[str]) -> None:
    """Refuse what would store the same files twice (and restore them twice, the second
    over the first), and the whole file system (/proc, /sys, every other mount)."""
    for i, (root, arg) in enumerate(zip(roots, given, strict=True)):
        if root == Path(root.anchor):
            raise LiferaftError(
                f"refusing to snapshot {arg} (the whole file system)", "name the folders that matter, e.g. checkpoints runs"
            )
        for other, other_arg in zip(roots[:i], given[:i], strict=True):
            if other == root:
                raise LiferaftError(f"{arg} is given twice", "name each path once")
            if other in root.parents or root in other.parents:
                inner, outer = (arg, other_arg) if other in root.parents else (other_arg, arg)
                raise LiferaftError(f"{inner} is inside {outer}, which is snapshotted too", f"name {outer} only")


def take_snapshot(
    repo: Repository,
    paths: list[str | os.PathLike[str]],
    *,
    run: str,
    step: int | None = None,
    tags: dict[str, str] | None = None,
    metrics: dict[str, Any] | None = None,
    progress: Progress | None = None,
    include_secrets: bool = False,
    skip_paths: set[str] | None = None,
    use_cache: bool = True,
    skip_unchanged: bool = False,
) -> SnapshotInfo:
    """Snapshot ``paths`` into ``repo`` and commit it; return the committed snapshot."""
    progress = progress or Progress()
    if not paths:
        raise LiferaftError("nothing to snapshot", "name at least one file or folder")
    fmt.check_run_name(run)
    clean_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    clean_metrics = _check_metrics(metrics or {})
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise LiferaftError(f"step must be an integer, got {step!r}", "pass step=N")

    roots = [Path(os.path.abspath(os.fspath(p))) for p in paths]
    _check_roots(roots, [os.fspath(p) for p in paths])
    names = root_names(roots)
    skip = set(skip_paths or ())
    root_dir = getattr(repo.backend, "root", None)
    if isinstance(root_dir, Path):
        skip.add(str(root_dir))  # never snapshot the vault into itself
    walk = WalkResult()
    # "Racily clean" (git's term): a file changed within a second of this scan could be
    # rewritten again with the same size and time stamp; it is not cached, so the next
    # snapshot reads it again instead of trusting its stat.
    racy_after = time.time_ns() - 1_000_000_000
    root_docs = []
    for root, name in zip(roots, names, strict=False):
        kind = _walk(root, name, walk, skip, include_secrets)
        root_docs.append({"name": name, "source": str(root), "type": kind})

    previous = [s for s in repo.snapshots() if s.run == run]
    # The parent is the run's newest snapshot of these same paths (a Checkpointer's
    # snapshots may share the run name), else the run's newest.
    same = [s for s in previous if [r["name"] for r in s.roots] == names]
    parent = (same or previous)[-1] if previous else None
    parent_files: dict[str, fmt.Entry] | None = None

    def previous_version(path: str) -> fmt.Entry | None:
        nonlocal parent_files
        if parent is None:
            return None
        if parent_files is None:
            try:
                parent_files = {e.path: e for e in repo.read_tree(parent) if e.type == fmt.TYPE_FILE}
            except LiferaftError:
                parent_files = {}
        return parent_files.get(path)

    caches = {
        name: StatCache(repo.id, root).load() if use_cache else StatCache(repo.id, root) for root, name in zip(roots, names, strict=False)
    }
    if skip_unchanged and parent is not None and _same_roots(parent.roots, root_docs) and _unchanged(repo, walk, caches, parent):
        return _as_unchanged(parent, walk, list(walk.gone))  # an idle pass: not even a session lock is written
    new_cache: dict[str, dict[str, list[Any]]] = {name: {} for name in names}
    changed: list[str] = list(walk.gone)  # gone while walked: the next pass, soon, sees what replaced them
    entries: list[fmt.Entry] = []
    progress.start("snapshot", walk.files, walk.nbytes)
    with repo.session() as session:
        # The stat cache vouches for unchanged files; the rest are read, several at once.
        blobs_of: dict[int, list[str] | None] = {}
        to_read: list[int] = []
        for i, item in enumerate(walk.items):
            entry = item.entry
            if entry.type != fmt.TYPE_FILE:
                continue
            assert item.st is not None
            root_name, _, rel = entry.path.partition("/")
            if item.sniff and caches[root_name].known_secret(rel or ".", item.st):
                item.secret = True  # judged before, unchanged since: not read again
                blobs_of[i] = None
                progress.advance(1, entry.size)
                continue
            blobs = caches[root_name].lookup(rel or ".", item.st)
            if blobs is not None and all(session.has(bytes.fromhex(b)) for b in blobs):
                blobs_of[i] = blobs
                progress.advance(1, entry.size)
            else:
                to_read.append(i)
        reused = len(blobs_of)
        blobs_of.update(zip(to_read, _read_files(session, repo, [walk.items[i] for i in to_read], progress), strict=True))
        for i, item in enumerate(walk.items):
            entry = item.entry
            if entry.type != fmt.TYPE_FILE:
                entries.append(entry)
                continue
            blobs = blobs_of[i]
            cached: list[str] | str
            if item.secret:
                walk.secrets.append(entry.path)
                cached = SECRET  # left out, and known as such while it does not change
            elif blobs is None:
                prev = previous_version(entry.path)
                if prev is not None and all(session.has(bytes.fromhex(b)) for b in prev.blobs):
                    entries.append(prev)
                else:
                    prev = None
                if item.unreadable:
                    # Reported like an unreadable folder, not as busy; a flaky mount's EIO
                    # must not drop a checkpoint from the newest snapshot: its last version stays.
                    kept = "; its previous version is kept" if prev is not None else ""
                    walk.skipped.append(f"{item.abspath}: {item.unreadable}{kept}")
                else:
                    changed.append(entry.path)
                continue
            else:
                entry.blobs = cached = blobs
                entries.append(entry)
            assert item.st is not None  # the version read (or judged), when it was
            root_name, _, rel = entry.path.partition("/")
            if max(item.st.st_mtime_ns, item.st.st_ctime_ns) < racy_after:
                new_cache[root_name][rel or "."] = [*stat_key(item.st), cached]
        progress.finish()
        tree = fmt.encode_tree(entries)
        tree_ids = [session.add(c, compress=True).hex() for c in _cut_tree(repo, tree)]
        if skip_unchanged and parent is not None and parent.tree == tree_ids and _same_roots(parent.roots, root_docs):
            # What a restore would give equals the parent: nothing to commit, even when a
            # file changed while read (its previous version is the parent's) or failed.
            if use_cache:
                for root_name, cache in caches.items():
                    cache.save(new_cache[root_name])
            return _as_unchanged(parent, walk, changed)
        stats = {
            "files": sum(1 for e in entries if e.type == fmt.TYPE_FILE),
            "dirs": sum(1 for e in entries if e.type == fmt.TYPE_DIR),
            "links": sum(1 for e in entries if e.type == fmt.TYPE_LINK),
            "bytes": sum(e.size for e in entries if e.type == fmt.TYPE_FILE),
            "files_read": walk.files - reused,
            "added_blobs": session.added_blobs,
            "added_bytes": session.added_bytes,
            "stored_bytes": session.stored_bytes,
            "changed_during_read": changed[:100],
            "skipped": walk.skipped[:100],
            "secrets_excluded": len(walk.secrets),
            "secrets_excluded_paths": walk.secrets[:100],
        }
        manifest = {
            "v": fmt.FORMAT_VERSION,
            "run": run,
            "step": step,
            "tags": clean_tags,
            "metrics": clean_metrics,
            "time_ns": time.time_ns(),
            "host": hostname(),
            "parent": parent.id if parent else None,
            "roots": root_docs,
            "tree": tree_ids,
            "stats": stats,
            "liferaft": __version__,
        }
        sid = session.commit(manifest)
    if use_cache:
        for root_name, cache in caches.items():
            cache.save(new_cache[root_name])
    return info_from_manifest(sid, manifest)
