"""The repository: config, packs, index fragments, manifests, locks, verify, forget, prune.

Commit order is packs → index fragment → manifest. The manifest is written last and
create-only: a snapshot exists exactly when its manifest does, and a manifest is only
written once every byte it references is durable in the store.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import __version__
from ..backends import Backend, BackendError, NoSpace, ObjectExists, ObjectInfo, ObjectNotFound
from ..errors import (
    LiferaftError,
    LockedError,
    NotAVault,
    SnapshotNotFound,
    VaultCorrupt,
    VaultFormatTooNew,
    VaultFull,
    VaultNotFound,
    VaultUnreachable,
)
from ..platform import hostname, pid_alive, pid_scope
from . import format as fmt
from .metacache import MetaCache

CONFIG = "config.json"
_T = TypeVar("_T")
_A = TypeVar("_A")
PACK_TARGET = 16 << 20  # restic's default too: few objects, small buffers, cheap retries
SESSION_REFRESH = 30.0
STALE_AFTER = 300.0
PRUNE_LOCK = "locks/prune.json"


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int = 512 << 10  # restic's minimum too; the gear hash skips the first min bytes of every chunk
    avg_size: int = 1 << 20
    max_size: int = 4 << 20
    seed: int = 0
    small_file: int = 1 << 20


@dataclass
class SnapshotInfo:
    """A committed snapshot, as listed by ``Vault.snapshots()``."""

    id: str
    run: str
    step: int | None
    time_ns: int
    host: str
    tags: dict[str, str]
    metrics: dict[str, float]
    parent: str | None
    roots: list[dict[str, Any]]
    tree: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    unchanged: bool = False  # set by snapshot(skip_unchanged=True) when nothing was committed

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def time(self) -> float:
        return self.time_ns / 1e9

    @property
    def label(self) -> str:
        """``run 'mnist', step 1200``; no step when it has none."""
        return f"run {self.run!r}" + (f", step {self.step}" if self.step is not None else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run": self.run,
            "step": self.step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time)),
            "time_ns": self.time_ns,
            "host": self.host,
            "tags": self.tags,
            "metrics": self.metrics,
            "parent": self.parent,
            "paths": [r["name"] for r in self.roots],
            "stats": self.stats,
        }


def _wrap_backend_errors(what: str, url: str) -> Callable[[BaseException], LiferaftError]:
    def convert(err: BaseException) -> LiferaftError:
        if isinstance(err, LiferaftError):
            return err
        if isinstance(err, NoSpace):
            return VaultFull(
                f"the vault at {url} is full while {what}", "free space or choose another vault; committed snapshots are intact"
            )
        return VaultUnreachable(
            f"the vault at {url} failed while {what}: {err}", "check the location and retry; committed snapshots are intact"
        )

    return convert


def _config_is_ours(raw: bytes) -> bool:
    """Whether a config.json that does not parse as a vault config was written by liferaft
    (then it is damage): liferaft's has a ``chunker`` and says ``created_by: liferaft``;
    an empty file or a cut one (invalid JSON holding those words) is taken as ours."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return not raw.strip() or b'"chunker"' in raw or b"liferaft" in raw
    if not isinstance(doc, dict):
        return False
    return "chunker" in doc or str(doc.get("created_by", "")).startswith("liferaft")


_LAYOUT = ("snapshots/", "index/", "packs/")


def _holds_vault_data(backend: Backend) -> bool:
    """Whether the location holds objects where a vault keeps its data; a store that
    cannot say counts as yes (then damage is reported, never a foreign folder)."""
    try:
        return any(next(iter(backend.list(prefix)), None) is not None for prefix in _LAYOUT)
    except BackendError:
        return True


def _top_names(backend: Backend, limit: int = 200) -> list[str]:
    """A few top-level names at the location (folders end in ``/``), for a message."""
    names: dict[str, None] = {}
    try:
        for i, obj in enumerate(backend.list("")):
            head, sep, _ = obj.name.partition("/")
            names[head + sep] = None
            if i >= limit:
                break
    except BackendError:
        return []
    return sorted(names)


def _without_config(backend: Backend) -> LiferaftError:
    """A location with something in it but no config.json: a vault that lost its config
    (its snapshots cannot be read without it), or someone else's folder."""
    url = backend.url
    if _holds_vault_data(backend):
        return VaultCorrupt(
            f"{url} holds a liferaft vault's data but no {CONFIG} (deleted, or not synced yet)",
            f"restore {CONFIG} from a copy of the vault (a Drive mount may still be syncing it); its snapshots cannot be read without it",
        )
    names = _top_names(backend)
    root = getattr(backend, "root", None)
    if not names and isinstance(root, Path):  # a local folder holding only empty folders
        try:
            with os.scandir(root) as entries:
                folders = sorted(e.name + "/" for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            folders = []
        if folders and all(f in _LAYOUT or f == "locks/" for f in folders):
            return NotAVault(
                f"{url} is not a liferaft vault (it holds only empty {', '.join(folders)} and no {CONFIG})",
                "remove those empty folders to create a new vault there, or choose the vault's own folder",
                cli_fix="remove those empty folders to create a new vault there, or point --vault at the vault folder",
            )
        names = folders
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    held = f"it holds {shown} but no {CONFIG}" if shown else f"it has files but no {CONFIG}"
    return NotAVault(
        f"{url} is not a liferaft vault ({held})",
        "choose an empty or new folder for the vault, or an existing vault",
        cli_fix="point --vault at an empty or new folder, or at an existing vault",
    )


class Repository:
    """A vault's storage layer over a Backend."""

    def __init__(self, backend: Backend, config: dict[str, Any]) -> None:
        self.backend = backend
        self.config = config
        c = config["chunker"]
        self.chunker = ChunkerParams(c["min"], c["avg"], c["max"], c["seed"], c["small_file"])
        self.pack_target = int(config.get("pack_size", PACK_TARGET))
        self._index: dict[bytes, fmt.IndexEntry] | None = None
        self._fragments: dict[str, dict[bytes, fmt.IndexEntry]] = {}
        self._manifests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # Where a read is a round trip, manifests and fragments are kept locally too.
        self.meta: MetaCache | None = MetaCache(self.id, backend.url) if backend.remote else None

    # ------------------------------------------------------------ open / create

    @property
    def id(self) -> str:
        return str(self.config["id"])

    @classmethod
    def open(cls, backend: Backend, *, create: bool = False) -> Repository:
        try:
            raw = backend.get(CONFIG)
        except ObjectNotFound:
            raw = None
        except BackendError as err:
            raise _wrap_backend_errors("reading its config", backend.url)(err) from None
        if raw is None:
            if not create:
                if backend.exists_location() and not backend.is_empty():
                    raise _without_config(backend)
                raise VaultNotFound(
                    f"no vault at {backend.url}",
                    "take a snapshot to create it, or check the vault's location",
                    cli_fix="take a snapshot to create it, or check --vault",
                )
            if not backend.is_empty():
                try:
                    raw = backend.get(CONFIG)  # another process may have created it just now
                except ObjectNotFound:
                    raise _without_config(backend) from None
                return cls(backend, cls._read_config(raw, backend))
            return cls._create(backend)
        return cls(backend, cls._read_config(raw, backend))

    @classmethod
    def _read_config(cls, raw: bytes, backend: Backend) -> dict[str, Any]:
        """The parsed config; a config.json that is not liferaft's (a Hugging Face model
        folder has one) is NotAVault, while a damaged one of ours stays VaultCorrupt."""
        try:
            return cls._parse_config(raw, backend.url)
        except (VaultCorrupt, VaultFormatTooNew):
            if _config_is_ours(raw) or _holds_vault_data(backend):
                raise
        raise NotAVault(
            f"{backend.url} is not a liferaft vault (its {CONFIG} is not liferaft's)",
            "choose the vault's own folder, or an empty or new folder to create one",
            cli_fix="point --vault at the vault folder, or at an empty or new folder to create one",
        ) from None

    @staticmethod
    def _parse_config(raw: bytes, url: str) -> dict[str, Any]:
        try:
            config = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise VaultCorrupt(f"{url}/{CONFIG} is not valid JSON", "restore it from a copy, or start a new vault") from None
        if not isinstance(config, dict) or not isinstance(config.get("format"), int):
            raise VaultCorrupt(f"{url}/{CONFIG} has no format version", "restore it from a copy, or start a new vault")
        if config["format"] > fmt.FORMAT_VERSION:
            raise VaultFormatTooNew(
                f"the vault at {url} has format {config['format']}, this liferaft {__version__} reads up to {fmt.FORMAT_VERSION}",
                "upgrade: pip install -U liferaft",
            )
        try:
            c = config["chunker"]
            values = [c[k] for k in ("min", "avg", "max", "seed", "small_file")]
            pack_size = config.get("pack_size", PACK_TARGET)
            if not all(type(v) is int for v in [*values, pack_size]):
                raise TypeError("not integers")
            # What pyfastcdc.FastCDC accepts (checked here, so that opening a vault does
            # not import the chunker: a restore or an unchanged snapshot never cuts).
            if not (64 <= c["min"] <= 1 << 20 and 256 <= c["avg"] <= 4 << 20 and 1024 <= c["max"] <= 16 << 20):
                raise ValueError("chunk sizes out of range")
            if not (c["min"] <= c["avg"] <= c["max"] and 0 <= c["seed"] < 1 << 63):
                raise ValueError("chunk sizes or seed out of range")
            if not 0 <= c["small_file"] <= fmt.MAX_BLOB or not 0 < pack_size <= 1 << 32:
                raise ValueError("out of range")
            str(config["id"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise VaultCorrupt(f"{url}/{CONFIG} has missing or unusable chunker parameters", "restore it from a copy") from None
        return config

    @classmethod
    def _create(cls, backend: Backend) -> Repository:
        params = ChunkerParams(seed=int.from_bytes(os.urandom(4), "big") % (1 << 31) + 1)
        config = {
            "format": fmt.FORMAT_VERSION,
            "id": uuid.uuid4().hex,
            "hash": "blake3",
            "chunker": {
                "name": "fastcdc2020",
                "min": params.min_size,
                "avg": params.avg_size,
                "max": params.max_size,
                "seed": params.seed,
                "small_file": params.small_file,
            },
            "compression": "zstd",
            "pack_size": PACK_TARGET,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_by": f"liferaft {__version__}",
        }
        data = json.dumps(config, indent=2).encode()
        try:
            backend.put(CONFIG, data, overwrite=False)
        except ObjectExists:
            # Another process created it first: use theirs.
            return cls.open(backend)
        except BackendError as err:
            raise _wrap_backend_errors("creating it", backend.url)(err) from None
        return cls(backend, config)

    # ------------------------------------------------------------ index

    def _read_checked(self, kind: str, name: str, listed: ObjectInfo | None, parse: Callable[[bytes], _T], *, fresh: bool) -> _T:
        """``parse`` (which checks the bytes against the object's hash-name) of a manifest
        or fragment: from the local copy of the ``listed`` version when one passes, else
        from the vault, then kept. ``fresh`` reads the vault's bytes (verify)."""
        meta = self.meta
        if meta is not None and listed is not None and not fresh:
            raw = meta.get(kind, listed)
            if raw is not None:
                try:
                    return parse(raw)
                except VaultCorrupt:
                    pass  # a damaged copy: the vault's bytes decide
        raw = self.backend.get(name)
        value = parse(raw)
        if meta is not None and listed is not None:
            meta.put(kind, listed, raw)
        return value

    def _load_fragment(self, listed: ObjectInfo, *, fresh: bool = False) -> dict[bytes, fmt.IndexEntry]:
        frag_id = listed.name.rsplit("/", 1)[-1]

        def parse(raw: bytes) -> dict[bytes, fmt.IndexEntry]:
            if fmt.hexdigest(raw) != frag_id:
                raise VaultCorrupt(f"index fragment {frag_id[:12]} does not match its hash")
            return fmt.parse_index(raw)

        return self._read_checked("index", listed.name, listed, parse, fresh=fresh)

    def load_fragments(
        self, into: dict[str, dict[bytes, fmt.IndexEntry]], *, fresh: bool = False
    ) -> tuple[list[ObjectInfo], list[tuple[str, VaultCorrupt]]]:
        """List ``index/`` and load each listed fragment not yet ``into`` it; return the
        listing and the damaged ones. A fragment listed but gone was merged by a prune,
        which writes the replacement before deleting: then the folder is listed again."""
        bad: list[tuple[str, VaultCorrupt]] = []
        vanished: list[str] = []

        def load(listed: ObjectInfo) -> None:
            try:
                into[listed.name.rsplit("/", 1)[-1]] = self._load_fragment(listed, fresh=fresh)
            except ObjectNotFound:
                vanished.append(listed.name)
            except VaultCorrupt as err:
                bad.append((listed.name, err))

        for _attempt in range(3):
            listing = self._list("index/")
            todo = [o for o in listing if o.name.rsplit("/", 1)[-1] not in into]
            vanished.clear()
            bad.clear()
            parallel_map(load, todo, self.backend.read_concurrency)
            if not vanished:
                break
        return listing, bad

    def index(self, *, reload: bool = False, strict: bool = False) -> dict[bytes, fmt.IndexEntry]:
        """The union of all index fragments: blob id → where it lies.

        A damaged fragment is skipped (``verify`` names it) unless ``strict``.
        """
        with self._lock:
            if self._index is not None and not reload:
                return self._index
            listing, bad = self.load_fragments(self._fragments)
            if strict and bad:
                raise VaultCorrupt(f"{bad[0][0]}: {bad[0][1]}")
            live = {o.name.rsplit("/", 1)[-1] for o in listing}
            for stale in set(self._fragments) - live:
                del self._fragments[stale]
            if self.meta is not None:
                self.meta.retain("index", live)
            merged: dict[bytes, fmt.IndexEntry] = {}
            for frag in self._fragments.values():
                merged.update(frag)
            self._index = merged
            return merged

    def fragments(self) -> dict[str, dict[bytes, fmt.IndexEntry]]:
        self.index()
        return dict(self._fragments)

    # ------------------------------------------------------------ blobs

    def read_pack_range(self, pack_id: str, offset: int, length: int) -> bytes:
        data = self.backend.get(pack_name(pack_id), offset, length)
        if len(data) != length:
            raise VaultCorrupt(f"pack {pack_id[:12]} is shorter than its index says")
        return data

    def read_pack_into(self, pack_id: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` from a pack (restore reuses its buffers this way)."""
        if self.backend.read_into(pack_name(pack_id), offset, view) != len(view):
            raise VaultCorrupt(f"pack {pack_id[:12]} is shorter than its index says")

    def read_blob(self, blob_id: bytes) -> bytes:
        """Return a blob's bytes, checked against its id."""
        for attempt in (0, 1):
            entry = self.index(reload=attempt == 1).get(blob_id)
            if entry is None:
                if attempt == 0:
                    continue
                raise VaultCorrupt(f"blob {blob_id.hex()[:12]} is missing from the index")
            pack_id, codec, offset, length, raw_length = entry
            try:
                stored = self.read_pack_range(pack_id, offset, length)
            except ObjectNotFound:
                if attempt == 0:
                    continue  # a prune may have repacked it: look again
                raise VaultCorrupt(f"pack {pack_id[:12]} holding blob {blob_id.hex()[:12]} is missing") from None
            return bytes(fmt.unpack_blob(blob_id, codec, stored, raw_length))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ snapshots

    def _list(self, prefix: str) -> list[Any]:
        try:
            return list(self.backend.list(prefix))
        except BackendError as err:
            raise _wrap_backend_errors(f"listing {prefix}", self.backend.url)(err) from None

    def load_manifest(self, snapshot_id: str, listed: ObjectInfo | None = None, *, fresh: bool = False) -> dict[str, Any]:
        """A manifest, checked against its id. With the ``listed`` object, a local copy of
        that version may serve; ``fresh`` reads the vault's bytes, never a copy."""
        if snapshot_id in self._manifests and not fresh:
            return self._manifests[snapshot_id]
        name = f"snapshots/{snapshot_id}.json"
        try:
            doc = self._read_checked("snapshots", name, listed, lambda raw: fmt.parse_manifest(raw, snapshot_id), fresh=fresh)
        except ObjectNotFound:
            raise SnapshotNotFound(f"no snapshot {snapshot_id[:12]}", "list them with: liferaft snapshots") from None
        self._manifests[snapshot_id] = doc
        return doc

    def snapshots(self, *, damaged: list[str] | None = None, fresh: bool = False) -> list[SnapshotInfo]:
        """All committed snapshots, oldest first. Unreadable manifests go to ``damaged``.

        ``fresh`` reads every manifest from the vault, not from memory or the local cache.
        """
        listed: dict[str, ObjectInfo] = {}
        for obj in self._list("snapshots/"):
            name = obj.name.rsplit("/", 1)[-1]
            if name.endswith(".json") and fmt.is_hex_id(name[:-5]):
                listed[name[:-5]] = obj
        ids = list(listed)
        if self.meta is not None:
            self.meta.retain("snapshots", set(ids))
        out: list[SnapshotInfo] = []

        def load(sid: str) -> None:
            try:
                doc = self.load_manifest(sid, listed[sid], fresh=fresh)
            except SnapshotNotFound:
                return  # forgotten meanwhile
            except VaultCorrupt as err:
                if damaged is not None:
                    damaged.append(f"snapshot {sid[:12]}: {err}")
                return
            out.append(info_from_manifest(sid, doc))

        parallel_map(load, ids, self.backend.read_concurrency)
        out.sort(key=lambda s: (s.time_ns, s.id))
        return out

    def find(self, ref: str) -> SnapshotInfo:
        """A snapshot by id or unique id prefix (at least 4 characters)."""
        ref = ref.strip().lower()
        if len(ref) < 4:
            raise SnapshotNotFound(f"snapshot id {ref!r} is too short", "give at least 4 characters of the id")
        matches = [s for s in self.snapshots() if s.id.startswith(ref)]
        if not matches:
            raise SnapshotNotFound(f"no snapshot with id {ref!r}", "list them with: liferaft snapshots")
        if len(matches) > 1:
            raise SnapshotNotFound(f"snapshot id {ref!r} is ambiguous ({len(matches)} match)", "give more characters")
        return matches[0]

    def read_tree(self, snap: SnapshotInfo | dict[str, Any]) -> list[fmt.Entry]:
        tree_ids = snap.tree if isinstance(snap, SnapshotInfo) else snap["tree"]
        data = b"".join(self.read_blob(bytes.fromhex(b)) for b in tree_ids)
        return fmt.parse_tree(data)

    def commit(self, manifest: dict[str, Any]) -> str:
        """Write the manifest create-only: the commit point."""
        data = fmt.encode_doc(manifest, compressed=False)
        sid = fmt.hexdigest(data)
        try:
            self.backend.put(f"snapshots/{sid}.json", data, overwrite=False)
        except ObjectExists:
            pass  # the very same bytes are already committed
        except BackendError as err:
            raise _wrap_backend_errors("committing a snapshot", self.backend.url)(err) from None
        self._manifests[sid] = manifest
        return sid

    def forget(self, snapshot_ids: Iterable[str]) -> list[str]:
        removed = []
        for sid in snapshot_ids:
            try:
                self.backend.delete(f"snapshots/{sid}.json")
                removed.append(sid)
            except ObjectNotFound:
                pass
            except BackendError as err:
                raise _wrap_backend_errors("forgetting a snapshot", self.backend.url)(err) from None
            self._manifests.pop(sid, None)
        return removed

    # ------------------------------------------------------------ sessions and locks

    def _read_lock(self, name: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.backend.get(name))
        except (ObjectNotFound, ValueError, UnicodeDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    def _lock_live(self, doc: dict[str, Any] | None) -> bool:
        if doc is None or lock_holder_gone(doc):
            return False
        refreshed = doc.get("refreshed")
        return isinstance(refreshed, (int, float)) and time.time() - refreshed < STALE_AFTER

    def _session_live(self, doc: dict[str, Any] | None, mtime: float) -> bool:
        """Live by the writer's clock or by the store's: a writer whose clock is behind (or
        whose lock cannot be read right now) is still a writer, unless it is known to be
        gone (killed on this machine: see ``lock_holder_gone``)."""
        if doc is not None and lock_holder_gone(doc):
            return False
        return self._lock_live(doc) or time.time() - mtime < STALE_AFTER

    def live_sessions(self) -> list[dict[str, Any]]:
        out = []
        for obj in self._list("locks/"):
            if not obj.name.startswith("locks/session-"):
                continue
            doc = self._read_lock(obj.name)
            if self._session_live(doc, obj.mtime):
                doc = dict(doc or {})
                doc["name"] = obj.name
                out.append(doc)
            else:
                try:
                    self.backend.delete(obj.name)  # a dead writer's session
                except BackendError:
                    pass
        return out

    def doomed_packs(self) -> set[str]:
        """Packs a running prune is about to delete: writers must not dedup against them."""
        doc = self._read_lock(PRUNE_LOCK)
        if not self._lock_live(doc):
            return set()
        assert doc is not None
        return {p for p in doc.get("doomed", []) if isinstance(p, str)}

    def probe_write(self) -> None:
        """Prove the vault takes writes: put and delete one writer-session lock, the first
        object a snapshot writes (prune knows it, and removes it if this process dies
        first). A read-only mount or read-only credentials pass every read; this raises
        the store's BackendError. A failed delete is ignored: such a store still commits."""
        name = f"locks/session-{uuid.uuid4().hex}.json"
        self.backend.put(name, session_lock(time.time()), overwrite=True)
        try:
            self.backend.delete(name)
        except BackendError:
            pass  # the lock goes stale and prune removes it

    def session(self, **kw: Any) -> WriteSession:
        return WriteSession(self, **kw)

    # ------------------------------------------------------------ helpers


def session_lock(started: float) -> bytes:
    """A writer session's lock document: who holds it, since when, refreshed now."""
    doc = {"host": hostname(), "pid": os.getpid(), "scope": pid_scope(), "started": started, "refreshed": time.time()}
    return json.dumps(doc).encode()


class _DaemonPool:
    """A pool of daemon worker threads: a snapshot's uploads and fsyncs.

    ThreadPoolExecutor's workers are waited for when the interpreter exits, so one hung
    on a stalled vault (a frozen mount, a store that stopped answering) would hang the
    process's exit, after liferaft gave the snapshot up (``WriteSession.end``). These
    are not: whatever they were writing is garbage for prune. A worker starts with each
    task submitted, up to ``workers``.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._max = workers
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        fut: Future[_T] = Future()
        self._queue.put((fut, fn, args))
        with self._lock:
            if len(self._threads) < self._max:
                t = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as err:
                    fut.set_exception(err)
                else:
                    fut.set_result(result)

    def shutdown(self, wait: bool = True) -> None:
        """Let the workers end once the work queued is done (``wait``: wait for that)."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                t.join()


def parallel_map(fn: Callable[[_A], _T], items: Sequence[_A], workers: int, name: str = "liferaft") -> list[_T]:
    """``fn`` of each item, results in order: in this thread for one item or one worker,
    else in up to ``workers`` threads. The first failure cancels the calls not yet
    started (a damaged pack: the fallback comes sooner) and is raised."""
    if len(items) <= 1 or workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def lock_holder_gone(doc: dict[str, Any]) -> bool:
    """Whether a lock's process is known to be dead: it ran in this pid scope (this boot and
    pid namespace, see ``platform.pid_scope``) and its pid is gone. A writer or prune that
    was SIGKILLed here then stops holding others up at once, not after ``STALE_AFTER``;
    a process elsewhere is judged by its lock's age only."""
    scope, pid = doc.get("scope"), doc.get("pid")
    return bool(scope) and scope == pid_scope() and type(pid) is int and not pid_alive(pid)


def info_from_manifest(sid: str, doc: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        id=sid,
        run=doc["run"],
        step=doc.get("step"),
        time_ns=doc["time_ns"],
        host=doc.get("host", ""),
        tags=dict(doc.get("tags", {})),
        metrics=dict(doc.get("metrics", {})),
        parent=doc.get("parent"),
        roots=list(doc["roots"]),
        tree=list(doc["tree"]),
        stats=dict(doc.get("stats", {})) if isinstance(doc.get("stats"), dict) else {},
    )


def _anonymous(size: int) -> mmap.mmap:
    """Fresh page-aligned memory, private to this process (a forked child gets a copy)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, size)  # Windows: anonymous memory is the process's own


class _PackBuffer:
    """A reusable, growable pack buffer.

    Anonymous memory (``mmap``), so it starts on a page boundary: a local vault writes
    it to disk past the page cache (``O_DIRECT``), which needs aligned memory."""

    def __init__(self, capacity: int) -> None:
        self.buf = _anonymous(capacity)
        self.n = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        end = self.n + len(data)
        if end > len(self.buf):
            grown = _anonymous(max(end, len(self.buf) + len(self.buf) // 2))
            with memoryview(self.buf) as old:
                grown[: self.n] = old[: self.n]
            self.buf = grown  # the old map goes when its last view does
        self.buf[self.n : end] = data
        self.n = end

    def view(self) -> memoryview:
        return memoryview(self.buf)[: self.n]


_SYNCS_PENDING = 16  # packs written and not yet fsynced, each an open file
_READ_SLACK = 1 << 20  # read-ahead room past one max-size chunk
_HEADER_ROOM = 64 << 10  # a pack header of ~1500 entries fits without growing the buffer


class StreamPacker:
    """One reader thread's packs for large files, filled with no copy of its own.

    A file's bytes are read straight into the pack buffer, then cut (FastCDC), hashed
    and kept where they landed: a duplicate is dropped and a compressible chunk replaced
    by its smaller form, both by moving later bytes down. The only copies are the
    kernel's read and the upload's write, except at a pack's end, where the bytes not
    yet cut (under one max-size chunk) start the next pack. Cut points are the same as
    FastCDC's stream chunker's: a chunk is cut only with ``max_size`` bytes ahead of it
    or at the end of the file. Not thread-safe: each thread makes its own.
    """

    def __init__(self, session: WriteSession, cdc: Any) -> None:
        self.session = session
        self.cdc = cdc
        self.max: int = cdc.max_size
        self.buf: _PackBuffer | None = None
        self.entries: list[fmt.PackEntry] = []

    def add_file(self, f: Any, on_bytes: Callable[[int], None]) -> tuple[list[bytes], int]:
        """Store the bytes of ``f`` (a raw file) from here to its end: blob ids and length."""
        s = self.session
        s._check()
        if self.buf is None:
            self.buf = s._take_buffer()
        ids: list[bytes] = []
        total = 0
        target = s.repo.pack_target
        mv = memoryview(self.buf.buf)
        r = w = self.buf.n  # bytes [r, w) are read and not yet cut
        eof = False
        try:
            while True:
                while not eof and w - r < self.max:
                    limit = len(self.buf.buf) - _HEADER_ROOM  # this buffer's: a grown one may be in the pool
                    if w >= limit:
                        mv, r, w = self._roll(mv, r, w)
                        continue
                    n = f.readinto(mv[w:limit])
                    if not n:
                        eof = True
                    else:
                        w += n
                if r == w:
                    return ids, total
                length = next(self.cdc.cut_buf(mv[r:w])).length
                ids.append(self._keep(mv, r, length))
                r += length
                total += length
                on_bytes(length)
                if self.buf.n >= target and w - r <= self.max:
                    mv, r, w = self._roll(mv, r, w)  # full: (with the default sizes, the buffer is too)
        finally:
            mv.release()

    def _keep(self, mv: memoryview, r: int, length: int) -> bytes:
        """Hash the chunk at ``r``; unless known, move it (or its compressed form) down to
        the end of the kept blobs."""
        s = self.session
        buf = self.buf
        assert buf is not None
        chunk = mv[r : r + length]
        blob_id = fmt.digest(chunk)
        if not s._claim(blob_id):
            return blob_id
        try:
            codec, stored = fmt.maybe_compress(chunk)
            k = buf.n
            if codec != fmt.CODEC_RAW or k != r:
                mv[k : k + len(stored)] = stored  # memoryview assignment is memmove: overlap is safe
            self.entries.append(fmt.PackEntry(blob_id, codec, k, len(stored), length))
            buf.n = k + len(stored)
            with s._add_lock:
                s._counted(length, len(stored))
        except BaseException:
            s._unclaim(blob_id)
            raise
        return blob_id

    def _roll(self, mv: memoryview, r: int, w: int) -> tuple[memoryview, int, int]:
        """The buffer is full: seal it and carry the bytes not yet cut to a new one, or,
        when it holds little (mostly duplicates), move them down and go on filling it."""
        buf = self.buf
        assert buf is not None
        tail = w - r
        if buf.n < self.session.repo.pack_target // 2:
            k = buf.n
            mv[k : k + tail] = mv[r:w]
            return mv, k, k + tail
        new = self.session._take_buffer()
        out = memoryview(new.buf)
        out[:tail] = mv[r:w]
        mv.release()
        self._seal()
        self.buf = new
        return out, 0, tail

    def _seal(self) -> None:
        buf, entries = self.buf, self.entries
        self.buf, self.entries = None, []
        if buf is not None:
            self.session._send(buf, entries)

    def close(self) -> None:
        """Seal the open pack, unless it is small: then it becomes (or goes into) the
        session's shared pack, which small files and the tree fill, so that a snapshot
        with a few changed large files still writes one pack, not one per reader."""
        s = self.session
        buf = self.buf
        if buf is not None and self.entries and buf.n < s.repo.pack_target:
            with s._add_lock:
                if s._cur is None:
                    s._cur, s._entries = buf, self.entries  # adopted as it is: no copy
                    self.buf, self.entries = None, []
                    return
                merge = s._cur.n + buf.n <= s.repo.pack_target
            if not merge:
                self._seal()
                return
            with memoryview(buf.buf) as mv:
                for e in self.entries:
                    s._append(e.blob_id, e.codec, mv[e.offset : e.offset + e.length], e.raw_length, counted=True)
            self.entries = []
        self._seal()


class WriteSession:
    """One writer's packs, index fragment and session lock.

    ``add`` hashes and dedups a blob, appends it to the open pack and hands full packs
    to background uploads (at most ``max_pending`` in memory). ``commit`` writes the
    remaining pack, the index fragment and then the manifest. A background failure is
    raised by the next call.
    """

    def __init__(self, repo: Repository, *, max_pending: int = 4, upload_workers: int = 4) -> None:
        # Four packs in flight: a pack's fsync (or PUT) waits on the disk (or network),
        # and four at once keep its queue full; on this 2-core VM 1 GiB took 0.64 s
        # against 0.79 s with two. Buffers are made only as needed, 21 MiB each.
        self.repo = repo
        self.backend = repo.backend
        self.id = uuid.uuid4().hex
        self.lock_name = f"locks/session-{self.id}.json"
        self.started = time.time()
        self._convert = _wrap_backend_errors("writing a snapshot", self.backend.url)
        self.thread = threading.get_ident()  # the thread that opened it (see sessions_of)
        self.closed = False
        self._expired = False
        self._ended: str | None = None  # why end() ended it
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._write_lock()  # before reading the prune lock: see prune()
        _OPEN.add(self)  # from here on end() can delete the lock, even while what follows hangs
        doomed = repo.doomed_packs()
        index = repo.index(reload=True)
        self.known: set[bytes] = {b for b, e in index.items() if e[0] not in doomed}
        # Pack buffers are reused: fresh memory costs page faults, and on some VMs
        # first-touched memory costs several times a memcpy. At most max_pending + 1
        # packs are in memory at once: the one being filled and those uploading.
        self._free: queue.Queue[_PackBuffer] = queue.Queue()
        self._add_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._buffers = 0
        self._max_buffers = max_pending + 1  # one more for each stream packer
        self._capacity = self.repo.pack_target + repo.chunker.max_size + _READ_SLACK + _HEADER_ROOM
        self._packers: list[StreamPacker] = []
        self._cur: _PackBuffer | None = None
        self._entries: list[fmt.PackEntry] = []
        self._packs: dict[str, tuple[int, list[fmt.PackEntry]]] = {}
        self._pool = _DaemonPool(upload_workers, "liferaft-upload")
        self._sync_pool = _DaemonPool(upload_workers, "liferaft-sync")
        self._sync_futures: list[Future[None]] = []
        self._syncs_pending = threading.BoundedSemaphore(_SYNCS_PENDING)
        self._futures: list[Future[None]] = []
        self._error: BaseException | None = None
        self.added_bytes = 0
        self.added_blobs = 0
        self.stored_bytes = 0
        self._heartbeat = threading.Thread(target=self._refresh, name="liferaft-session", daemon=True)
        self._heartbeat.start()

    # -- lock

    def _write_lock(self) -> None:
        try:
            self.backend.put(self.lock_name, session_lock(self.started), overwrite=True)
        except BackendError as err:
            raise self._convert(err) from None

    def end(self, reason: str = "given up") -> None:
        """End this session from another thread, while its snapshot may still be in
        flight (hung on a stalled mount): it can no longer commit, and its lock is
        deleted so that it does not hold off prune until it goes stale. What it uploaded
        is unreferenced: prune removes it. Waits on the vault (call it where that is
        bounded); raises BackendError when the lock cannot be deleted."""
        self._ended = reason
        self._expired = True  # before the delete: the heartbeat must not bring it back
        self._stop.set()
        for _ in range(2):  # twice: a heartbeat write in flight may land after the first delete
            try:
                self.backend.delete(self.lock_name)
            except ObjectNotFound:
                pass
            beat = self._heartbeat
            if beat is not None:
                beat.join(timeout=SESSION_REFRESH)
            if (beat is None or not beat.is_alive()) and not self.backend.exists(self.lock_name):
                return

    def _refresh(self) -> None:
        while not self._stop.wait(SESSION_REFRESH):
            try:
                if self._expired or not self.backend.exists(self.lock_name):
                    # A prune took this writer for dead (it stalled past STALE_AFTER) and may
                    # have deleted what it deduplicated against: never bring the lock back.
                    self._expired = True
                    return
                self._write_lock()
            except (LiferaftError, BackendError):
                pass

    # -- blobs

    def _check(self) -> None:
        if self._error is not None:
            err = self._error
            raise err

    def has(self, blob_id: bytes) -> bool:
        return blob_id in self.known

    def _claim(self, blob_id: bytes) -> bool:
        """Whether this blob is new, marking it known so that no other reader stores it."""
        with self._add_lock:
            if blob_id in self.known:
                return False
            self.known.add(blob_id)
            return True

    def _unclaim(self, blob_id: bytes) -> None:
        with self._add_lock:
            self.known.discard(blob_id)  # never stored: nobody may dedup against it

    def add(self, data: bytes | bytearray | memoryview, blob_id: bytes | None = None, *, compress: bool | None = None) -> bytes:
        """Store a blob unless the vault already has it; return its id.

        Safe to call from several reader threads: hashing and compression run outside
        the session's lock (both release the GIL), only the pack append runs inside it.
        """
        self._check()
        if blob_id is None:
            blob_id = fmt.digest(data)
        if not self._claim(blob_id):
            return blob_id  # claimed: a second reader of the same bytes dedups against it
        appended = False
        try:
            if compress is None:
                codec, stored = fmt.maybe_compress(data)
            elif compress:
                codec, stored = fmt.CODEC_ZSTD, fmt.compress(data)
            else:
                codec, stored = fmt.CODEC_RAW, data
            self._append(blob_id, codec, stored, len(data))
            appended = True
        except BaseException:
            if not appended:
                self._unclaim(blob_id)
            raise
        return blob_id

    def _append(
        self, blob_id: bytes, codec: int, stored: bytes | bytearray | memoryview, raw_length: int, *, counted: bool = False
    ) -> None:
        """Append a claimed blob to the shared open pack, sealing it when full."""
        with self._add_lock:
            if self._cur is None:
                self._cur = self._take_buffer()
            buf = self._cur
            self._entries.append(fmt.PackEntry(blob_id, codec, buf.n, len(stored), raw_length))
            buf.append(stored)
            if not counted:
                self._counted(raw_length, len(stored))
            if buf.n >= self.repo.pack_target:
                self._cur = None
                entries, self._entries = self._entries, []
                self._send(buf, entries)

    def _counted(self, raw: int, stored: int) -> None:
        self.added_bytes += raw
        self.stored_bytes += stored
        self.added_blobs += 1

    def _take_buffer(self) -> _PackBuffer:
        """An empty pack buffer: a free one, a new one while under the limit, else the
        next one an upload frees (back-pressure)."""
        with self._pool_lock:
            make = self._free.empty() and self._buffers < self._max_buffers
            if make:
                self._buffers += 1
        buf = _PackBuffer(self._capacity) if make else self._wait_for_buffer()
        if self._error is not None:
            self._free.put(buf)  # back for whoever else waits, then the error
            self._check()
        buf.n = 0
        return buf

    def _wait_for_buffer(self) -> _PackBuffer:
        """The next buffer an upload frees; a session ended meanwhile (``end``: its
        uploads hang on a stalled vault) fails the reader instead of leaving it waiting."""
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                if self._ended is not None:
                    raise LockedError(f"this writer's session was {self._ended}", "take the snapshot again") from None

    def _send(self, buf: _PackBuffer, entries: list[fmt.PackEntry]) -> None:
        """Seal a pack (header and trailer after its blobs) and start its upload; a buffer
        with no blobs goes back to the pool.

        Its blobs are claimed in ``known``: if this fails they are lost, so the session
        is failed too and will not commit (whoever catches this error)."""
        if not entries:
            self._free.put(buf)
            return
        try:
            header = fmt.build_pack_header(os.urandom(16), entries)
            buf.append(header)
            pack_id = fmt.pack_id(header)
            with self._pool_lock:
                self._packs[pack_id] = (buf.n, entries)
                self._futures.append(self._pool.submit(self._upload, pack_id, buf))
        except BaseException as err:
            self._failed(err)
            raise

    def _seal(self) -> None:
        with self._add_lock:
            buf, entries = self._cur, self._entries
            self._cur, self._entries = None, []
        if buf is not None:
            self._send(buf, entries)

    def close_packers(self) -> None:
        """Seal the packers' open packs (see ``StreamPacker.close``); no packer is in use."""
        for packer in self._packers:
            packer.close()

    def packer(self, cdc: Any) -> StreamPacker:
        """A packer for one thread's large files (see ``StreamPacker``), cutting with ``cdc``."""
        packer = StreamPacker(self, cdc)
        with self._pool_lock:
            self._packers.append(packer)
            self._max_buffers += 1
        return packer

    def _upload(self, pack_id: str, buf: _PackBuffer) -> None:
        """Write a pack; its buffer is free once the bytes are written, and its fsync (a
        local vault's) runs in the sync pool, at most ``_SYNCS_PENDING`` behind."""
        finish = None
        self._syncs_pending.acquire()
        try:
            finish = self.backend.put_staged(pack_name(pack_id), buf.view())
        except ObjectExists:
            pass  # same bytes, random nonce: only a retry of ours can collide
        except BaseException as err:  # surfaced by the next call
            self._failed(err)
        finally:
            self._free.put(buf)
            if finish is None:
                self._syncs_pending.release()
        if finish is not None:
            try:
                self._sync_futures.append(self._sync_pool.submit(self._finish, finish))
            except BaseException:  # no pool (interpreter shutting down): finish here
                self._finish(finish)

    def _finish(self, finish: Callable[[], None]) -> None:
        try:
            finish()
        except ObjectExists:
            pass
        except BaseException as err:
            self._failed(err)
        finally:
            self._syncs_pending.release()

    def _failed(self, err: BaseException) -> None:
        if self._error is None:
            self._error = self._convert(err)

    def flush(self) -> list[str]:
        """Seal the open packs, wait for uploads, write this session's index fragment."""
        self.close_packers()
        self._seal()
        for fut in self._futures:
            fut.result()
        self._futures.clear()
        for fut in self._sync_futures:  # complete: every upload has queued its sync
            fut.result()
        self._sync_futures.clear()
        self._check()
        if not self._packs:
            return []
        # From the fragment's write on, other writers may learn of these packs (even if
        # the write reports a failure it may have landed): never discarded by close().
        packs, self._packs = self._packs, {}
        data = fmt.build_index(packs, os.urandom(8).hex())
        frag_id = fmt.hexdigest(data)
        try:
            self.backend.put(f"index/{frag_id}", data, overwrite=False)
        except ObjectExists:
            pass
        except BackendError as err:
            raise self._convert(err) from None
        for pid, (_size, entries) in packs.items():
            for e in entries:
                self.repo._fragments.setdefault(frag_id, {})[e.blob_id] = (pid, e.codec, e.offset, e.length, e.raw_length)
        self.repo._index = None
        return [frag_id]

    def commit(self, manifest: dict[str, Any]) -> str:
        """Flush, check our session is still registered, then write the manifest."""
        self.flush()
        if self._ended is not None:
            raise LockedError(f"this writer's session was {self._ended} before the commit", "take the snapshot again")
        if self._expired or not self.backend.exists(self.lock_name):
            raise LockedError(
                "this writer's session expired (a prune took it for dead) before the commit",
                "take the snapshot again",
            )
        return self.repo.commit(manifest)

    def close(self, failed: BaseException | None = None) -> None:
        """End the session: wait for uploads, free the buffers, delete what no fragment
        lists and the session lock. ``failed``: the error that ended it, if any."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._pool.shutdown(wait=True)
        self._sync_pool.shutdown(wait=True)
        self._release_buffers()
        failed = failed or self._error
        if isinstance(failed, VaultUnreachable) and self.backend.remote:
            # The store stopped answering: each delete would wait out a whole retry
            # deadline (a pack at a time: 20 minutes for 10 packs). Prune removes the
            # packs and the stale lock later.
            self._packs = {}
            return
        self._discard_unindexed()
        try:
            self.backend.delete(self.lock_name)
        except BackendError:
            pass

    def _release_buffers(self) -> None:
        """Give the pack buffers' memory back now (21 MiB each, up to ``max_pending`` + 1
        + one per reader), not whenever a cycle collection finds this session: in a
        notebook or under ``liferaft run`` the process goes on after the snapshot."""
        bufs = [p.buf for p in self._packers if p.buf is not None]
        for packer in self._packers:
            packer.buf = None
        if self._cur is not None:
            bufs.append(self._cur)
            self._cur = None
        while True:
            try:
                bufs.append(self._free.get_nowait())
            except queue.Empty:
                break
        for buf in bufs:
            try:
                buf.buf.close()
            except BufferError:
                pass  # a view of it is still alive (an interrupted reader): freed with that

    def _discard_unindexed(self) -> None:
        """Delete the packs of a snapshot that stopped before its index fragment (Ctrl-C,
        a failed read, a full disk): no manifest references them and no other writer
        knows them (writers learn of packs from fragments only), so an interrupted
        snapshot of 30 GiB does not leave 30 GiB for the next prune to find. Best effort:
        what is left (a kill, a failed delete) is still prune's."""
        packs, self._packs = list(self._packs), {}
        for pack_id in packs:
            try:
                self.backend.delete(pack_name(pack_id))
            except ObjectNotFound:
                continue  # never uploaded
            except BackendError:
                return  # the store refuses now: the rest is prune's, not a wait for each

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        self.close(err)


#: Writer sessions open in this process (see ``sessions_of``).
_OPEN: weakref.WeakSet[WriteSession] = weakref.WeakSet()


def sessions_of(thread: threading.Thread) -> list[WriteSession]:
    """The writer sessions ``thread`` opened that are not closed yet: a background
    snapshot's, to end when it is given up (``WriteSession.end``)."""
    return [s for s in list(_OPEN) if s.thread == thread.ident and not s.closed]


def iter_referenced(repo: Repository, snaps: list[SnapshotInfo]) -> Iterator[tuple[SnapshotInfo, bytes]]:
    """Every blob id each snapshot references (trees and file contents)."""
    for snap in snaps:
        for b in snap.tree:
            yield snap, bytes.fromhex(b)
        for entry in repo.read_tree(snap):
            for b in entry.blobs:
                yield snap, bytes.fromhex(b)
