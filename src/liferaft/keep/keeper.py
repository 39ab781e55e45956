"""Kept paths: which folders a run keeps, and bringing them back before it starts.

A kept path is restored from the run's newest valid snapshot only when that cannot
destroy local work: when it is missing (or an empty folder), or when everything in it
is already in the snapshot. When it holds work the snapshot does not have, it is kept
as it is (and the user is told, and offered ``--force``); when it holds *older* work
that differs from the snapshot, starting would fork the run from stale state, so
liferaft refuses and asks for ``--force`` or for the folder to be moved away.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LiferaftError, VaultCorrupt

if TYPE_CHECKING:
    from ..api import Vault
    from ..vault.repository import SnapshotInfo

SMALL_FILE = 1 << 20  # files up to this size are one blob: their id is the hash of their bytes


@dataclass(frozen=True)
class KeptPath:
    """One ``--keep`` path: as the user wrote it, absolute, and its name in a snapshot."""

    arg: str
    path: Path
    name: str
    inside_cwd: bool
    given: str = "--keep"  # where it was named: "--keep", "keep=" (attach) or "liferaft.toml"

    def __str__(self) -> str:
        return self.arg

    @property
    def shown(self) -> str:
        """The path as the user gave it, in the words of where they gave it."""
        return _where(self.given) + _shown(self.arg, self.given)


def _shown(arg: str, given: str) -> str:
    return f"--keep {arg}" if given == "--keep" else f"kept path {arg!r}"


def _where(given: str) -> str:
    """Said once, before the paths: the file they came from."""
    return "liferaft.toml: " if given == "liferaft.toml" else ""


def _example(given: str) -> str:
    return {"--keep": "--keep checkpoints", "liferaft.toml": 'keep = ["checkpoints"]'}.get(given, 'keep=["checkpoints"]')


def resolve_keeps(keeps: Sequence[str | os.PathLike[str]], cwd: Path | None = None, *, given: str = "--keep") -> list[KeptPath]:
    """Check and resolve kept paths against the working folder.

    Refused: none at all, duplicates, one inside another, and a path that holds the
    working folder itself (restoring it would write over the code that runs). ``given``
    says where the paths were named, for the wording of a refusal: ``"--keep"``,
    ``"keep="`` (attach) or ``"liferaft.toml"``.

    >>> [k.name for k in resolve_keeps(["checkpoints", "runs"])]
    ['checkpoints', 'runs']
    """
    from ..vault.snapshot import root_names

    here = Path(os.path.abspath(cwd or os.getcwd()))
    where = _where(given)
    if not keeps:
        raise LiferaftError(
            "nothing to keep",
            'name what your script writes, e.g. keep=["checkpoints", "runs"] (or keep = [...] in liferaft.toml)',
            cli_fix="name what your script writes, e.g. --keep checkpoints --keep runs (or keep = [...] in liferaft.toml)",
        )
    paths: list[Path] = []
    args: list[str] = []
    for raw in keeps:
        arg = os.fspath(raw)
        if not arg or "\x00" in arg:
            raise LiferaftError(f"{where}bad kept path {arg!r}", f"give a file or folder, e.g. {_example(given)}")
        path = Path(os.path.abspath(os.path.join(here, os.path.expanduser(arg))))
        if path == here or path in here.parents:
            raise LiferaftError(
                f"{where}{_shown(arg, given)} holds the working folder {here}: restoring it would write over the code that runs",
                f"keep the folders your script writes instead, e.g. {_example(given)}",
            )
        if path in paths:
            raise LiferaftError(f"{where}{_shown(arg, given)} is given twice", "name each path once")
        for other, other_arg in zip(paths, args, strict=False):
            if other in path.parents or path in other.parents:
                inner, outer = (arg, other_arg) if other in path.parents else (other_arg, arg)
                raise LiferaftError(f"{where}{_shown(inner, given)} is inside {_shown(outer, given)}", f"keep {outer} only")
        paths.append(path)
        args.append(arg)
    names = root_names(paths)
    return [KeptPath(a, p, n, here == p or here in p.parents, given) for a, p, n in zip(args, paths, names, strict=False)]


def check_vault_outside(keeps: Sequence[KeptPath], vault: Vault) -> None:
    """Refuse a kept path that holds a local vault (or lies inside it)."""
    root = getattr(vault.backend, "root", None)
    if not isinstance(root, Path):
        return
    for k in keeps:
        if k.path == root or k.path in root.parents or root in k.path.parents:
            raise LiferaftError(f"{k.shown} and the vault {root} overlap", "keep the vault outside the kept paths")


def check_run_name(run: str) -> str:
    """Refuse a run name the vault would refuse, before any work starts."""
    from ..vault.format import check_run_name as check

    return check(run)


def keep_from_config() -> list[str]:
    """``keep = [...]`` from ``liferaft.toml`` (in the working folder or a parent), if any, as
    paths from the working folder: the file's paths are taken from its own folder."""
    from ..config import project_keeps

    return project_keeps()


# ------------------------------------------------------------------ comparing with a snapshot


@dataclass
class Comparison:
    """How a local kept path relates to its copy in a snapshot."""

    state: str  # "missing", "same", "subset", "newer", "older"
    differing: list[str] = field(default_factory=list)  # a few relative paths, for messages
    newest_local_ns: int = 0
    snap_files: int = 0  # files and bytes of this path in the snapshot
    snap_bytes: int = 0

    @property
    def is_file(self) -> bool:
        """The kept path is a file: the one differing path is itself (``"."``)."""
        return self.differing[:1] == ["."]


def _is_secret(name: str) -> bool:
    from ..vault.snapshot import is_secret

    return is_secret(name)


def _local_entries(root: Path) -> dict[str, os.stat_result] | None:
    """Relative path → lstat of every file and link below root ('.' for a file root).

    None when the path does not exist; empty dict for a folder with no files or links.
    """
    from ..vault.restore import is_restore_temp

    try:
        st = os.stat(root)  # the root a user names may be a link (e.g. to a Drive folder)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return {".": st}
    out: dict[str, os.stat_result] = {}
    stack = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for de in entries:
            path = f"{rel}{de.name}"
            try:
                est = de.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(est.st_mode):
                stack.append((de.path, path + "/"))
            elif stat.S_ISLNK(est.st_mode) or stat.S_ISREG(est.st_mode):
                if stat.S_ISREG(est.st_mode) and _is_secret(de.name):
                    continue  # never in a snapshot, so not a difference
                if is_restore_temp(de.name):
                    continue  # an interrupted restore's temp file
                out[path] = est
    return out


# A file the snapshot lacks that says nothing but "keep this folder in git" is not work.
PLACEHOLDER_NAMES = frozenset({".gitkeep", ".keep", ".gitignore", ".placeholder", "readme", "readme.md", "readme.txt", "readme.rst"})
PLACEHOLDER_MAX = 4096


def is_placeholder(rel: str, st: os.stat_result) -> bool:
    """An empty regular file, or a small ``.gitkeep``/``.keep``/``.gitignore``/``README``
    (what a fresh ``git clone`` puts in an empty checkpoints folder)."""
    if rel == "." or not stat.S_ISREG(st.st_mode):
        return False
    return st.st_size == 0 or (st.st_size <= PLACEHOLDER_MAX and rel.rsplit("/", 1)[-1].lower() in PLACEHOLDER_NAMES)


def _same_file(path: Path, st: os.stat_result, entry: Any, cached: list[str] | None) -> bool:
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
        return False
    if st.st_mtime_ns == entry.mtime_ns:
        return True
    if cached is not None:
        return cached == entry.blobs
    if st.st_size <= SMALL_FILE:
        from ..vault import format as fmt

        try:
            data = path.read_bytes()
        except OSError:
            return False
        return (fmt.hexdigest(data) if data else None) == (entry.blobs[0] if entry.blobs else None)
    return False


def compare(keep: KeptPath, snap: SnapshotInfo, root_name: str, vault: Vault) -> Comparison:
    """Compare the local copy of ``keep`` with root ``root_name`` of ``snap``.

    Only files and links count as work; folders' times do not, nor placeholders the
    snapshot lacks (``is_placeholder``: a fresh ``git clone`` with a ``.gitkeep`` must
    still be restored into; the restore leaves them where they are). A file the snapshot
    also has counts whenever it differs, placeholder or not.
    """
    from ..vault import format as fmt
    from ..vault.statcache import StatCache

    repo = vault.repository()
    snap_entries: dict[str, Any] = {}
    snap_newest = 0
    for e in repo.read_tree(snap):
        top, _, rel = e.path.partition("/")
        if top != root_name or e.type == fmt.TYPE_DIR:
            continue
        snap_entries[rel or "."] = e
        snap_newest = max(snap_newest, e.mtime_ns)
    files = sum(1 for e in snap_entries.values() if e.type == fmt.TYPE_FILE)
    nbytes = sum(e.size for e in snap_entries.values() if e.type == fmt.TYPE_FILE)
    local = _local_entries(keep.path)
    if local is None or (not local and keep.path.is_dir()):
        return Comparison("missing", snap_files=files, snap_bytes=nbytes)
    cache = StatCache(repo.id, keep.path).load()
    differing: list[str] = []
    newest_local = 0
    absent = 0
    for rel, e in snap_entries.items():
        st = local.get(rel)
        if st is None:
            absent += 1
            continue
        path = keep.path if rel == "." else keep.path / rel
        if e.type == fmt.TYPE_LINK:
            try:
                same = stat.S_ISLNK(st.st_mode) and os.readlink(path) == e.target
            except OSError:
                same = False
        else:
            same = _same_file(path, st, e, cache.lookup(rel, st))
        if not same:
            differing.append(rel)
            newest_local = max(newest_local, st.st_mtime_ns)
    for rel, st in local.items():
        if rel not in snap_entries and not is_placeholder(rel, st):
            differing.append(rel)
            newest_local = max(newest_local, st.st_mtime_ns)
    if not differing:
        return Comparison("subset" if absent else "same", snap_files=files, snap_bytes=nbytes)
    state = "newer" if newest_local > snap_newest else "older"
    return Comparison(state, sorted(differing)[:3], newest_local, files, nbytes)


# ------------------------------------------------------------------ restore before a start


@dataclass
class RestoreOutcome:
    """What happened to the kept paths before the command started."""

    snapshot: SnapshotInfo | None = None
    restored: list[KeptPath] = field(default_factory=list)
    same: list[KeptPath] = field(default_factory=list)
    kept_local: list[KeptPath] = field(default_factory=list)
    files: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def resumed(self) -> bool:
        """True when kept state came from (or equals) a snapshot."""
        return bool(self.restored or self.same)


def match_roots(keeps: Sequence[KeptPath], snap: SnapshotInfo) -> dict[str, KeptPath]:
    """Snapshot root name → the kept path it belongs to.

    Matched by original location first (the same folder layout, as on Colab, Kaggle and
    SkyPilot), then by name: a fresh machine may use another working folder.
    """
    out: dict[str, KeptPath] = {}
    taken: set[str] = set()
    for root in snap.roots:
        for k in keeps:
            if k.arg not in taken and root.get("source") == str(k.path):
                out[root["name"]] = k
                taken.add(k.arg)
                break
    for root in snap.roots:
        if root["name"] in out:
            continue
        for k in keeps:
            if k.arg not in taken and k.name == root["name"]:
                out[root["name"]] = k
                taken.add(k.arg)
                break
    return out


def check_not_dangling(keep: KeptPath) -> None:
    """Refuse a kept path that is (or lies below) a link to something absent, such as
    ``checkpoints -> /content/drive/MyDrive/ckpt`` before Drive is mounted: restoring
    would replace the link (or fail on it), and the command would write to the wrong
    place or nowhere."""
    from ..vault.restore import dangling_link

    found = dangling_link(keep.path)
    if found is not None:
        link, target = found
        at = keep.arg if link == keep.path else f"{link} (on the way to {keep.arg})"
        raise LiferaftError(
            f"{at} is a link to {target}, which does not exist",
            "mount or create what it points to (e.g. Google Drive), or remove the link to keep a local folder",
        )


def restore_kept(
    vault: Vault,
    run: str,
    keeps: Sequence[KeptPath],
    *,
    force: bool = False,
    say: Callable[[str], None] = print,
    snapshots: list[SnapshotInfo] | None = None,
) -> RestoreOutcome:
    """Bring kept paths back from the run's newest snapshot that verifies, never destroying newer local work.

    Raises ``LiferaftError`` (before anything is written) when a kept path holds older
    work that differs from the snapshot, unless ``force``.

    >>> restore_kept(liferaft.Vault(), "mnist", resolve_keeps(["checkpoints"]))  # doctest: +SKIP
    """
    import time

    for k in keeps:
        check_not_dangling(k)
    outcome = RestoreOutcome()
    candidates = [s for s in (snapshots if snapshots is not None else vault.snapshots(run=run)) if s.run == run]
    candidates = [s for s in candidates if match_roots(keeps, s)]
    for snap in reversed(candidates):
        t0 = time.monotonic()
        try:
            done = _restore_from(vault, snap, keeps, force=force, outcome=outcome)
        except VaultCorrupt as err:
            msg = f"snapshot {snap.short_id} of run {run!r} failed verification ({err}); trying the one before"
            outcome.messages.append(msg)
            say(msg)
            continue
        outcome.seconds = time.monotonic() - t0
        if done:
            return outcome
    return outcome


def _restore_from(vault: Vault, snap: SnapshotInfo, keeps: Sequence[KeptPath], *, force: bool, outcome: RestoreOutcome) -> bool:
    roots = match_roots(keeps, snap)
    plans = {name: compare(k, snap, name, vault) for name, k in roots.items()}
    to_restore: dict[str, KeptPath] = {}
    notes: list[str] = []
    for name, k in roots.items():
        c = plans[name]
        if c.state == "same":
            outcome.same.append(k)
        elif c.state in ("missing", "subset") or force:
            to_restore[name] = k
        elif c.state == "newer":
            outcome.kept_local.append(k)
            # a kept file is its own example; "(e.g. .)" said nothing
            work, example = ("it is", "") if c.is_file else ("it has work", f" (e.g. {c.differing[0]})")
            notes.append(
                f"keeping local {k.arg}: {work} newer than snapshot {snap.short_id}{example}; --force would restore the snapshot over it"
            )
        else:
            where = "" if k.inside_cwd else " (outside the working folder)"
            held = (
                f"differs from the run's newest snapshot {snap.short_id} and is older than it; restoring would write over it"
                if c.is_file
                else f"holds files that differ from the run's newest snapshot {snap.short_id} and are older than it "
                f"(e.g. {c.differing[0]}); restoring would write over them"
            )
            raise LiferaftError(
                f"{k.arg}{where} {held}",
                f"move {k.arg} away, or pass force=True to restore the snapshot over it",
                cli_fix=f"move {k.arg} away, or pass --force to restore the snapshot over it",
            )
    outcome.snapshot = snap
    if to_restore:
        # Vault.restore puts every root somewhere: the ones we do not restore go to a
        # scratch folder that is deleted at once.
        scratch = None
        if len(to_restore) < len(snap.roots):
            scratch = tempfile.mkdtemp(prefix="liferaft-unwanted-")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = vault.restore(snap.id, targets={n: k.path for n, k in to_restore.items()}, to=scratch)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        assert result is not None
        outcome.restored = list(to_restore.values())
        outcome.files = sum(plans[n].snap_files for n in to_restore)
        outcome.nbytes = sum(plans[n].snap_bytes for n in to_restore)
    outcome.messages.extend(notes)
    return True
