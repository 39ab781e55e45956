"""A vault an attacker could write to: restore refuses, and writes nothing outside its target.

Each test builds a real vault from a real folder, then plays an attacker with write
access to the vault's store: it commits hand-made trees and manifests through the
library's own building blocks (so every hash still matches), or damages stored bytes.
Restoring must then either be refused with a ``LiferaftError`` (one line, no
traceback from the CLI) or, for a link pointing out of the tree, skip that link and
say so; and nothing outside the restore target may appear or change.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

import liferaft
from conftest import cli, make_tree, tree_state
from liferaft.errors import LiferaftError, SnapshotNotFound, VaultCorrupt
from liferaft.vault import format as fmt
from liferaft.vault.repository import pack_name

RUN = "hostile"
ORIGINAL = {
    "a.txt": b"alpha\n",
    "sub/b.bin": bytes(range(256)) * 40,
    "sub/deeper/c.txt": b"gamma" * 1000,
    "empty": b"",
    "folder": None,
    "ln": "->sub/b.bin",
}
EVIL = b"attacker bytes\n"


# ---------------------------------------------------------------- helpers


def F(path: str, data: bytes = EVIL, mode: int = 0o644, mtime_ns: int = 1_600_000_000 * 10**9) -> fmt.Entry:
    return fmt.Entry(path, fmt.TYPE_FILE, mode, mtime_ns, len(data), [fmt.hexdigest(data)] if data else [])


def D(path: str, mode: int = 0o755) -> fmt.Entry:
    return fmt.Entry(path, fmt.TYPE_DIR, mode, 1_600_000_000 * 10**9)


def L(path: str, target: str) -> fmt.Entry:
    return fmt.Entry(path, fmt.TYPE_LINK, 0o777, 1_600_000_000 * 10**9, target=target)


def listing(root: Path, exclude: Iterable[Path] = (), dir_mtimes: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything under ``root`` (not following links), except the excluded subtrees.

    A folder's mtime changes when anything is created in it, even briefly (a temp file).
    """
    skip = {Path(p) for p in exclude}
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            p = here / name
            if p in skip:
                continue
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns if dir_mtimes else None)
            else:
                out[rel] = ("file", p.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out


def files_in(root: Path) -> set[str]:
    """Regular files and links (not folders) under ``root``."""
    if not root.exists():
        return set()
    return {k for k, v in listing(root).items() if v[0] != "dir"}


class Scene:
    """tmp_path holds: vault/ (local vaults), work/r (the snapshotted folder),
    outside/ (sentinels an attacker would like to touch), to/ (a restore target)."""

    def __init__(self, tmp_path: Path, vault_url: str) -> None:
        self.tmp = tmp_path
        self.url = vault_url
        self.work = make_tree(tmp_path / "work" / "r", dict(ORIGINAL))
        self.outside = make_tree(tmp_path / "outside", {"secret.txt": b"do not touch\n", "dir/keep.txt": b"keep\n"})
        self.to = tmp_path / "to"
        self.vault = liferaft.Vault(vault_url)
        self.good = self.vault.snapshot([self.work], run=RUN, step=1)
        self.base = dict(self.vault.repository().load_manifest(self.good.id))

    def fresh(self) -> liferaft.Vault:
        """The victim: a new Vault object with no caches from the attacker's writes."""
        return liferaft.Vault(self.url)

    def craft(
        self,
        entries: list[fmt.Entry] | None = None,
        *,
        tree: bytes | None = None,
        blobs: Iterable[bytes] = (EVIL,),
        tree_ids: list[str] | None = None,
        **overrides: Any,
    ) -> str:
        """Commit a hand-made snapshot whose hashes all check out; return its id."""
        repo = liferaft.Vault(self.url).repository()
        manifest = dict(self.base)
        manifest.update(step=2, parent=self.good.id, time_ns=time.time_ns())
        with repo.session() as s:
            for data in blobs:
                s.add(data)
            if entries is not None:
                tree = fmt.encode_tree(entries)
            if tree is not None:
                manifest["tree"] = [s.add(tree, compress=True).hex()] if tree else []
            if tree_ids is not None:
                manifest["tree"] = tree_ids
            manifest.update(overrides)
            return s.commit(manifest)

    def put_blob(self, stored: bytes, codec: int, raw_length: int, blob_id: bytes) -> None:
        """Store bytes as a blob by hand (a pack and an index fragment with honest names)."""
        entry = fmt.PackEntry(blob_id, codec, 0, len(stored), raw_length)
        pack = stored + fmt.build_pack_header(os.urandom(16), [entry])
        pid = fmt.hexdigest(pack)
        self.vault.backend.put(pack_name(pid), pack)
        index = fmt.build_index({pid: (len(pack), [entry])}, os.urandom(8).hex())
        self.vault.backend.put(f"index/{fmt.hexdigest(index)}", index)

    def put_manifest(self, data: bytes, name: str | None = None) -> str:
        sid = name or fmt.hexdigest(data)
        self.vault.backend.put(f"snapshots/{sid}.json", data, overwrite=True)
        return sid

    def watch(self, *targets: Path) -> Watch:
        return Watch(self, targets)


class Watch:
    """Records everything in tmp_path outside the vault and the restore targets."""

    def __init__(self, scene: Scene, targets: Iterable[Path]) -> None:
        self.scene = scene
        self.exclude = [scene.tmp / "vault", *targets]
        self.before = listing(scene.tmp, self.exclude)
        assert "outside/secret.txt" in self.before

    def check(self) -> None:
        after = listing(self.scene.tmp, self.exclude)
        assert after == self.before, f"written outside the target: {set(after.items()) ^ set(self.before.items())}"


def refused(call: Any) -> LiferaftError:
    with pytest.raises(LiferaftError) as info:
        call()
    err = info.value
    assert str(err) and "\n" not in str(err), "the error must be one line"
    return err


@pytest.fixture(params=["local", "memory"])
def scene(request: pytest.FixtureRequest, tmp_path: Path) -> Scene:
    """The attacker edits stored bytes, so a folder and the fsspec memory store are enough here:
    how each backend stores and lists bytes is the vault suite's business (vault_url)."""
    if request.param == "local":
        return Scene(tmp_path, str(tmp_path / "vault"))
    return Scene(tmp_path, f"memory://liferaft-hostile/{uuid.uuid4().hex}")


@pytest.fixture
def local_scene(tmp_path: Path, local_vault: str) -> Scene:
    return Scene(tmp_path, local_vault)


# ---------------------------------------------------------------- sanity: the scene restores


def test_the_untouched_snapshot_restores(scene: Scene) -> None:
    """The control: without an attacker, the same steps restore everything."""
    result = scene.fresh().restore(scene.good.id, to=scene.to)
    assert result is not None and not result.skipped_links
    assert tree_state(scene.to / "r") == tree_state(scene.work)


# ---------------------------------------------------------------- hostile trees

HOSTILE_TREES: dict[str, list[fmt.Entry]] = {
    "dotdot-in-path": [D("r"), F("r/../../outside/pwned")],
    "dotdot-at-start": [D("r"), F("../outside/pwned")],
    "dotdot-only": [D("r"), F("..")],
    "dot-component": [D("r"), F("r/./pwned")],
    "empty-component": [D("r"), F("r//pwned")],
    "trailing-slash": [D("r"), F("r/pwned/")],
    "absolute-path": [D("r"), F("/tmp/liferaft-hostile-pwned")],
    "absolute-into-outside": [D("r"), F("{outside}/pwned")],
    "drive-letter": [D("r"), F("c:/pwned")],
    "nul-in-path": [D("r"), F("r/pw\x00ned")],
    "backslash-in-path": [D("r"), F("r\\..\\..\\outside\\pwned")],
    "backslash-component": [D("r"), F("r/..\\pwned")],
    "duplicate-file": [D("r"), F("r/x"), F("r/x", b"other")],
    "duplicate-file-and-dir": [D("r"), F("r/x"), D("r/x"), F("r/x/pwned")],
    "duplicate-root": [D("r"), D("r"), F("r/x")],
    "entry-under-a-file": [D("r"), F("r/f"), F("r/f/pwned")],
    "entry-under-a-link": [D("r"), L("r/l", "sub"), F("r/l/pwned")],
    "write-through-abs-link": [D("r"), L("r/a", "{outside}"), F("r/a/evil")],
    "write-through-rel-link": [D("r"), L("r/a", "../../outside"), F("r/a/evil")],
    "write-through-link-dir": [D("r"), L("r/a", "{outside}/dir"), D("r/a/sub"), F("r/a/sub/evil")],
    "parent-not-listed": [D("r"), F("r/sub/pwned")],
    "parent-listed-after": [D("r"), F("r/sub/pwned"), D("r/sub")],
    "entry-outside-the-roots": [D("r"), D("other"), F("other/pwned")],
    "file-outside-the-roots": [D("r"), F("pwned")],
}


def _expand(entries: list[fmt.Entry], outside: Path) -> list[fmt.Entry]:
    out = []
    for e in entries:
        e = fmt.Entry(e.path.replace("{outside}", str(outside)), e.type, e.mode, e.mtime_ns, e.size, list(e.blobs), e.target)
        e.target = e.target.replace("{outside}", str(outside))
        out.append(e)
    return out


@pytest.mark.parametrize("case", sorted(HOSTILE_TREES))
def test_hostile_tree_is_refused_to_a_folder(scene: Scene, case: str) -> None:
    sid = scene.craft(_expand(HOSTILE_TREES[case], scene.outside))
    watch = scene.watch(scene.to)
    refused(lambda: scene.fresh().restore(sid, to=scene.to))
    watch.check()
    assert files_in(scene.to) == set(), "a refused tree must not put files in the target"
    assert not os.path.lexists("/tmp/liferaft-hostile-pwned")


@pytest.mark.parametrize(
    "case", ["dotdot-in-path", "absolute-into-outside", "write-through-rel-link", "entry-under-a-file", "duplicate-file"]
)
def test_hostile_tree_is_refused_in_place(scene: Scene, case: str) -> None:
    sid = scene.craft(_expand(HOSTILE_TREES[case], scene.outside))
    (scene.work / "a.txt").write_bytes(b"edited since the snapshot\n")
    before = listing(scene.work)
    watch = scene.watch(scene.work)
    refused(lambda: scene.fresh().restore(sid))
    watch.check()
    assert listing(scene.work) == before  # refused while parsing: not even a temp file, "a refused restore must leave the folder as it was"


def test_restore_by_run_falls_back_past_a_hostile_tree(scene: Scene) -> None:
    scene.craft(_expand(HOSTILE_TREES["write-through-rel-link"], scene.outside))
    watch = scene.watch(scene.to)
    with pytest.warns(UserWarning, match="failed verification"):
        result = scene.fresh().restore(run=RUN, to=scene.to)
    watch.check()
    assert result is not None and result.snapshot.id == scene.good.id
    assert len(result.fallbacks) == 1
    assert tree_state(scene.to / "r") == tree_state(scene.work)


def test_restore_by_run_refuses_when_every_snapshot_is_hostile(scene: Scene) -> None:
    scene.vault.repository().forget([scene.good.id])
    scene.craft(_expand(HOSTILE_TREES["dotdot-in-path"], scene.outside))
    watch = scene.watch(scene.to)
    with pytest.warns(UserWarning):
        err = refused(lambda: scene.fresh().restore(run=RUN, to=scene.to))
    assert isinstance(err, VaultCorrupt)
    watch.check()


RAW_TREES = {
    "not-json": b'{"p":"r","t":"d","m":493,"n":0}\nnot json at all\n',
    "not-an-object": b'{"p":"r","t":"d","m":493,"n":0}\n["r/x","f"]\n',
    "not-utf8": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/\xff","t":"d","m":493,"n":0}\n',
    "unknown-type": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/dev","t":"c","m":420,"n":0}\n',
    "path-not-a-string": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":["r","x"],"t":"d","m":493,"n":0}\n',
    "mode-too-big": b'{"p":"r","t":"d","m":4294967295,"n":0}\n',
    "mode-a-string": b'{"p":"r","t":"d","m":"0755","n":0}\n',
    "mtime-missing": b'{"p":"r","t":"d","m":493}\n',
    "size-negative": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/x","t":"f","m":420,"n":0,"s":-1,"b":[]}\n',
    "bytes-without-blobs": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/x","t":"f","m":420,"n":0,"s":5,"b":[]}\n',
    "blob-id-not-hex": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/x","t":"f","m":420,"n":0,"s":5,"b":["' + b"z" * 64 + b'"]}\n',
    "blob-id-short": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/x","t":"f","m":420,"n":0,"s":5,"b":["abcd"]}\n',
    "link-without-target": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/l","t":"l","m":511,"n":0}\n',
    "link-empty-target": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/l","t":"l","m":511,"n":0,"l":""}\n',
    "link-nul-target": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/l","t":"l","m":511,"n":0,"l":"a\\u0000b"}\n',
    # A lone surrogate that is no escaped byte, an escaped ASCII byte ("/"), and escaped
    # bytes that spell a UTF-8 name (a second spelling of r/\u00e9, listed beside it).
    "lone-surrogate": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/\\ud800","t":"d","m":493,"n":0}\n',
    "escaped-slash": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/a\\udc2f..","t":"d","m":493,"n":0}\n',
    "second-spelling": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/\\u00e9","t":"d","m":493,"n":0}\n{"p":"r/\\udcc3\\udca9","t":"d","m":493,"n":0}\n',
    "link-target-lone-surrogate": b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/l","t":"l","m":511,"n":0,"l":"\\udfff"}\n',
    "nan-mtime": b'{"p":"r","t":"d","m":493,"n":NaN}\n',
    "deep-nesting": b'{"p":"r","t":"d","m":493,"n":0,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
}


@pytest.mark.parametrize("case", sorted(RAW_TREES))
def test_malformed_tree_is_refused(scene: Scene, case: str) -> None:
    sid = scene.craft(tree=RAW_TREES[case])
    watch = scene.watch(scene.to)
    err = refused(lambda: scene.fresh().restore(sid, to=scene.to))
    assert isinstance(err, VaultCorrupt)
    watch.check()
    assert not scene.to.exists() or files_in(scene.to) == set()


def test_file_whose_blobs_do_not_add_up_is_refused(scene: Scene) -> None:
    lie = F("r/x")
    lie.size = 10 * len(EVIL)
    sid = scene.craft([D("r"), lie])
    watch = scene.watch(scene.to)
    refused(lambda: scene.fresh().restore(sid, to=scene.to))
    watch.check()
    assert files_in(scene.to) == set()


def test_file_needing_a_blob_the_vault_lacks_is_refused(scene: Scene) -> None:
    sid = scene.craft([D("r"), F("r/x", b"never stored")])
    watch = scene.watch(scene.to)
    refused(lambda: scene.fresh().restore(sid, to=scene.to))
    watch.check()
    assert files_in(scene.to) == set()


def test_huge_sparse_size_claim_is_refused_before_allocating(scene: Scene) -> None:
    """A file claiming 2**62 bytes made of one small blob: refused before any ftruncate."""
    lie = F("r/x")
    lie.size = 1 << 62
    sid = scene.craft([D("r"), lie])
    refused(lambda: scene.fresh().restore(sid, to=scene.to))
    assert files_in(scene.to) == set()


# ---------------------------------------------------------------- links


ESCAPING_TARGETS = [  # for a link at r/sub/esc: two folders above it inside the target
    "../../../x",
    "../../../outside/secret.txt",
    "../../../../../../../../etc/passwd",
    "/etc/passwd",
    "{outside}/secret.txt",
    "sub/../../../../outside",
    "..\\..\\outside",
    "c:/windows",
    "//server/share",
]


@pytest.mark.parametrize("target", ESCAPING_TARGETS)
def test_escaping_link_is_skipped_and_reported(scene: Scene, target: str) -> None:
    target = target.replace("{outside}", str(scene.outside))
    sid = scene.craft([D("r"), D("r/sub"), L("r/sub/esc", target), L("r/ok", "sub/inner.txt"), F("r/sub/inner.txt")])
    watch = scene.watch(scene.to)
    result = scene.fresh().restore(sid, to=scene.to)
    watch.check()
    assert result is not None
    assert result.skipped_links == [f"r/sub/esc -> {target}"]
    assert not os.path.lexists(scene.to / "r/sub/esc")
    assert os.readlink(scene.to / "r/ok") == "sub/inner.txt"
    assert (scene.to / "r/sub/inner.txt").read_bytes() == EVIL


def test_links_that_stay_inside_are_created(scene: Scene) -> None:
    inside = {"r/sub/up": "..", "r/sub/sib": "../ok.txt", "r/sub/root": "../../r", "r/dot": ".", "r/sub/self": "./../sub"}
    sid = scene.craft([D("r"), D("r/sub"), F("r/ok.txt"), *(L(p, t) for p, t in inside.items())])
    result = scene.fresh().restore(sid, to=scene.to)
    assert result is not None and result.skipped_links == []
    for p, t in inside.items():
        assert os.readlink(scene.to / p) == t


def test_root_that_is_a_link_is_not_created(scene: Scene) -> None:
    sid = scene.craft([L("r", str(scene.outside))], roots=[{"name": "r", "source": str(scene.work), "type": "l"}])
    watch = scene.watch(scene.to)
    result = scene.fresh().restore(sid, to=scene.to)
    watch.check()
    assert result is not None and result.skipped_links == [f"r -> {scene.outside}"]
    assert not os.path.lexists(scene.to / "r")


def test_chained_links_do_not_resolve_outside_the_target(scene: Scene) -> None:
    """r/b -> '..' lands on the target itself (allowed), but r/c -> 'b/../outside' then
    resolves through b to tmp/outside, outside the target, while each link alone looks inside."""
    sid = scene.craft([D("r"), L("r/b", ".."), L("r/c", "b/../outside"), L("r/d", "b/../../..")])
    result = scene.fresh().restore(sid, to=scene.to)
    assert result is not None
    root = scene.to.resolve()
    for name in ("b", "c", "d"):
        p = scene.to / "r" / name
        if os.path.lexists(p):
            real = Path(os.path.realpath(p))
            assert real == root or root in real.parents, f"r/{name} -> {os.readlink(p)} resolves to {real}"


def test_restore_replaces_a_link_in_the_target_instead_of_writing_through_it(scene: Scene) -> None:
    """A link already in the target (to a file or a folder outside) is never written through."""
    sid = scene.craft([D("r"), F("r/f"), D("r/sub"), F("r/sub/x")])
    (scene.to / "r").mkdir(parents=True)
    os.symlink(scene.outside / "secret.txt", scene.to / "r/f")
    watch = scene.watch(scene.to)
    result = scene.fresh().restore(sid, to=scene.to)
    watch.check()
    assert result is not None
    assert not (scene.to / "r/f").is_symlink() and (scene.to / "r/f").read_bytes() == EVIL


def test_restore_refuses_a_folder_that_is_a_link_in_the_target(scene: Scene) -> None:
    sid = scene.craft([D("r"), D("r/sub"), F("r/sub/evil")])
    (scene.to / "r").mkdir(parents=True)
    os.symlink(scene.outside / "dir", scene.to / "r/sub")
    watch = scene.watch(scene.to)
    refused(lambda: scene.fresh().restore(sid, to=scene.to))
    watch.check()
    assert sorted(os.listdir(scene.outside / "dir")) == ["keep.txt"]


# ---------------------------------------------------------------- modes and times


def test_setuid_and_setgid_bits_are_not_restored(scene: Scene) -> None:
    sid = scene.craft([D("r", 0o6777), F("r/suid", mode=0o6755)])
    result = scene.fresh().restore(sid, to=scene.to)
    assert result is not None
    assert (scene.to / "r/suid").stat().st_mode & 0o6000 == 0
    assert (scene.to / "r").stat().st_mode & 0o6000 == 0


@pytest.mark.parametrize("mtime_ns", [-(1 << 62), 1 << 62, -1])
def test_extreme_mtimes_restore_or_are_refused(scene: Scene, mtime_ns: int) -> None:
    sid = scene.craft([D("r"), F("r/x", mtime_ns=mtime_ns)])
    watch = scene.watch(scene.to)
    try:
        result = scene.fresh().restore(sid, to=scene.to)
    except LiferaftError as err:
        assert "\n" not in str(err)
    else:
        assert result is not None and (scene.to / "r/x").read_bytes() == EVIL
    watch.check()


# ---------------------------------------------------------------- hostile roots and sources

BAD_ROOTS: dict[str, list[Any]] = {
    "empty-name": [{"name": "", "source": "/x", "type": "d"}],
    "dot": [{"name": ".", "source": "/x", "type": "d"}],
    "dotdot": [{"name": "..", "source": "/x", "type": "d"}],
    "slash-in-name": [{"name": "a/b", "source": "/x", "type": "d"}],
    "dotdot-in-name": [{"name": "../r", "source": "/x", "type": "d"}],
    "absolute-name": [{"name": "/r", "source": "/x", "type": "d"}],
    "nul-in-name": [{"name": "r\x00", "source": "/x", "type": "d"}],
    "backslash-in-name": [{"name": "..\\r", "source": "/x", "type": "d"}],
    "drive-name": [{"name": "c:", "source": "/x", "type": "d"}],
    "name-not-a-string": [{"name": 7, "source": "/x", "type": "d"}],
    "duplicate-names": [{"name": "r", "source": "/x", "type": "d"}, {"name": "r", "source": "/y", "type": "d"}],
    "bad-type": [{"name": "r", "source": "/x", "type": "h"}],
    "root-not-an-object": ["r"],
    "roots-not-a-list": {"r": "/x"},  # type: ignore[dict-item]
    "source-not-a-string": [{"name": "r", "source": ["/x"], "type": "d"}],
}


@pytest.mark.parametrize("case", sorted(BAD_ROOTS))
def test_manifest_with_bad_roots_is_refused(scene: Scene, case: str) -> None:
    sid = scene.craft([D("r"), F("r/x")], roots=BAD_ROOTS[case])
    watch = scene.watch(scene.to)
    victim = scene.fresh()
    err = refused(lambda: victim.restore(sid, to=scene.to))
    assert isinstance(err, SnapshotNotFound)  # a manifest that does not parse is no snapshot
    refused(lambda: victim.restore(sid))
    assert [s.id for s in victim.snapshots()] == [scene.good.id]
    report = victim.verify()
    assert not report.ok and any(sid[:12] in d for d in report.damage)
    watch.check()
    assert not scene.to.exists()


BAD_SOURCES = ["work/r", "r", "", "./r", "/tmp/../etc", "{tmp}/work/../outside", "{tmp}/work/r/..", "/a\x00b", "~/r"]


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_in_place_restore_refuses_unsafe_sources(scene: Scene, source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    source = source.replace("{tmp}", str(scene.tmp))
    roots = [{"name": "r", "source": source, "type": "d"}]
    sid = scene.craft([D("r"), F("r/pwned")], roots=roots)
    cwd = scene.tmp / "cwd" / "deeper"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # a relative source would land here (or, with '..', above it)
    watch = scene.watch()
    err = refused(lambda: scene.fresh().restore(sid))
    assert isinstance(err, VaultCorrupt)
    watch.check()
    # With --to the recorded source does not matter: the same snapshot restores there.
    result = scene.fresh().restore(sid, to=scene.to)
    assert result is not None and (scene.to / "r/pwned").read_bytes() == EVIL


# ---------------------------------------------------------------- damaged or forged manifests


def test_truncated_manifest_is_not_a_snapshot(scene: Scene) -> None:
    raw = scene.vault.backend.get(f"snapshots/{scene.good.id}.json")
    names = [scene.put_manifest(raw[:cut]) for cut in (1, len(raw) // 2, len(raw) - 1)]  # named by their own hash
    names.append(scene.put_manifest(raw[: len(raw) // 3], name=scene.good.id))  # truncated in place
    watch = scene.watch(scene.to)
    victim = scene.fresh()
    refused(lambda: victim.restore(scene.good.id, to=scene.to))
    assert victim.snapshots() == []
    assert victim.restore(run=RUN, to=scene.to) is None
    damage = victim.verify().damage
    for sid in names:
        assert any(sid[:12] in d for d in damage), (sid, damage)
    watch.check()
    assert not scene.to.exists()


def test_manifest_under_a_wrong_name_is_refused(scene: Scene) -> None:
    raw = scene.vault.backend.get(f"snapshots/{scene.good.id}.json")
    forged = "f" * 64
    scene.put_manifest(raw, name=forged)
    scene.vault.backend.delete(f"snapshots/{scene.good.id}.json")
    watch = scene.watch(scene.to)
    victim = scene.fresh()
    refused(lambda: victim.restore(forged, to=scene.to))
    refused(lambda: victim.restore("ffff", to=scene.to))
    assert victim.snapshots() == []
    assert any("does not match its hash" in d for d in victim.verify().damage)
    watch.check()
    assert not scene.to.exists()


def test_manifest_swapped_for_another_run_is_refused(scene: Scene) -> None:
    """An attacker overwrites the good manifest with a valid one of theirs: the name no longer matches."""
    sid = scene.craft([D("r"), F("r/x")], run="attacker")
    data = scene.vault.backend.get(f"snapshots/{sid}.json")
    scene.put_manifest(data, name=scene.good.id)
    victim = scene.fresh()
    assert [s.id for s in victim.snapshots()] == [sid]
    refused(lambda: victim.restore(scene.good.id, to=scene.to))
    assert not scene.to.exists()


BAD_MANIFEST_DOCS: dict[str, Any] = {
    "not-an-object": [1, 2, 3],
    "wrong-version": {"v": 99},
    "run-missing": {"run": None},
    "time-negative": {"time_ns": -5},
    "time-a-float": {"time_ns": 1.5},
    "tree-not-ids": {"tree": ["../../etc/passwd"]},
    "tree-not-a-list": {"tree": "abc"},
    "parent-not-an-id": {"parent": "../x"},
    "metrics-not-numbers": {"metrics": {"loss": "low"}},
    "tags-not-an-object": {"tags": ["a"]},
    "step-a-string": {"step": "12"},
    "step-a-bool": {"step": True},
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFEST_DOCS))
def test_manifest_with_bad_fields_is_refused(scene: Scene, case: str) -> None:
    change = BAD_MANIFEST_DOCS[case]
    if isinstance(change, dict):
        doc: Any = dict(scene.base)
        doc.update(change)
        doc = {k: v for k, v in doc.items() if v is not None or k in ("step", "parent")}
    else:
        doc = change
    sid = scene.put_manifest(fmt.encode_doc(doc, compressed=False))
    victim = scene.fresh()
    refused(lambda: victim.restore(sid, to=scene.to))
    assert [s.id for s in victim.snapshots()] == [scene.good.id]
    assert not scene.to.exists()


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 64, b"\x28\xb5\x2f\xfd" + b"\xff" * 20, b"[" * 200_000, b'{"v":1,"run":"' + b"x" * 10 + b"\xff\xfe" + b'"}'],
    ids=["empty", "zeros", "bad-zstd", "deep-nesting", "bad-utf8"],
)
def test_garbage_manifest_is_refused(scene: Scene, data: bytes) -> None:
    sid = scene.put_manifest(data)
    victim = scene.fresh()
    refused(lambda: victim.restore(sid, to=scene.to))
    assert [s.id for s in victim.snapshots()] == [scene.good.id]
    assert any(sid[:12] in d for d in victim.verify().damage)


# ---------------------------------------------------------------- damaged or forged index fragments


def _index_names(scene: Scene) -> list[str]:
    return [o.name for o in scene.vault.backend.list("index/")]


def _replace_index(scene: Scene, mutate: Any) -> None:
    """Rewrite every index fragment through ``mutate(doc)`` and store it under its new hash."""
    backend = scene.vault.backend
    for name in _index_names(scene):
        doc = fmt.decode_doc(backend.get(name), "index")
        mutate(doc)
        data = fmt.encode_doc(doc)
        backend.delete(name)
        backend.put(f"index/{fmt.hexdigest(data)}", data)


def _data_blob(scene: Scene) -> tuple[str, str]:
    """(pack id, blob id) of the stored bytes of sub/b.bin."""
    blob = fmt.hexdigest(ORIGINAL["sub/b.bin"])  # type: ignore[arg-type]
    for name in _index_names(scene):
        doc = fmt.decode_doc(scene.vault.backend.get(name), "index")
        for pid, pack in doc["packs"].items():
            if any(b[0] == blob for b in pack["blobs"]):
                return pid, blob
    raise AssertionError("blob not found")


def _mutate_blob(blob: str, change: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        for pack in doc["packs"].values():
            for item in pack["blobs"]:
                if item[0] == blob:
                    change(pack, item)

    return mutate


def _lie_offset_past_the_pack(pack: dict[str, Any], item: list[Any]) -> None:
    """The index claims a bigger pack, and puts the blob beyond the real pack's end."""
    real = pack["size"]
    pack["size"] = real + 10**6
    item[2] = real + 100


def _lie_length_past_the_pack(pack: dict[str, Any], item: list[Any]) -> None:
    real = pack["size"]
    pack["size"] = real * 4
    item[3] = real * 2


def _set(pos: int, value: Any) -> Any:
    def change(pack: dict[str, Any], item: list[Any]) -> None:
        item[pos] = value(item) if callable(value) else value

    return change


INDEX_LIES = {
    "offset-past-the-pack": _lie_offset_past_the_pack,
    "length-past-the-pack": _lie_length_past_the_pack,
    "offset-past-the-claimed-size": lambda pack, item: item.__setitem__(2, pack["size"] + 1),
    "shifted-offset": _set(2, lambda item: item[2] + 1),
    "short-length": _set(3, lambda item: item[3] - 1),
    "wrong-raw-length": _set(4, lambda item: item[4] + 1),
    "wrong-codec": _set(1, lambda item: 1 - item[1]),
    "unknown-codec": _set(1, 7),
    "negative-offset": _set(2, -1),
    "raw-length-absurd": _set(4, 1 << 40),
}


@pytest.mark.parametrize("case", sorted(INDEX_LIES))
def test_lying_index_is_refused(scene: Scene, case: str) -> None:
    """Either the lie is caught (nothing changes) or what is restored is exactly the original:
    a wrong length can still cover the whole stored blob, whose hash then checks out."""
    _pid, blob = _data_blob(scene)
    _replace_index(scene, _mutate_blob(blob, INDEX_LIES[case]))
    (scene.to / "r").mkdir(parents=True)
    (scene.to / "r" / "a.txt").write_bytes(b"mine\n")
    watch = scene.watch(scene.to)
    try:
        scene.fresh().restore(scene.good.id, to=scene.to)
    except LiferaftError as err:
        assert isinstance(err, VaultCorrupt) and "\n" not in str(err)
        assert files_in(scene.to) == {"r/a.txt"} and (scene.to / "r/a.txt").read_bytes() == b"mine\n"
    else:
        assert case in ("length-past-the-pack",), f"{case}: a lie that cannot yield the right bytes was not caught"
        assert tree_state(scene.to / "r") == tree_state(scene.work)
    watch.check()


def test_index_pointing_a_blob_at_another_blobs_bytes_is_refused(scene: Scene) -> None:
    _pid, blob = _data_blob(scene)
    other = fmt.hexdigest(ORIGINAL["a.txt"])  # type: ignore[arg-type]
    spots: dict[str, list[Any]] = {}

    def find(doc: dict[str, Any]) -> None:
        for pack in doc["packs"].values():
            for item in pack["blobs"]:
                if item[0] in (blob, other):
                    spots[item[0]] = [*item[1:]]

    _replace_index(scene, find)
    assert set(spots) == {blob, other}

    def swap(doc: dict[str, Any]) -> None:
        for pack in doc["packs"].values():
            for item in pack["blobs"]:
                if item[0] == blob:
                    item[1:] = spots[other]
                elif item[0] == other:
                    item[1:] = spots[blob]

    _replace_index(scene, swap)
    refused(lambda: scene.fresh().restore(scene.good.id, to=scene.to))
    assert files_in(scene.to) == set()


def test_index_fragment_under_a_wrong_name_is_ignored(scene: Scene) -> None:
    backend = scene.vault.backend
    for i, name in enumerate(_index_names(scene)):
        data = backend.get(name)
        backend.delete(name)
        backend.put(f"index/{i:064x}", data)
    victim = scene.fresh()
    refused(lambda: victim.restore(scene.good.id, to=scene.to))
    with pytest.raises(VaultCorrupt):
        victim.repository().index(reload=True, strict=True)
    assert files_in(scene.to) == set()


@pytest.mark.parametrize("data", [b"", b"garbage", fmt.encode_doc({"v": 1, "packs": {"zz": {}}}), fmt.encode_doc([1])])
def test_garbage_index_fragment_is_refused(scene: Scene, data: bytes) -> None:
    backend = scene.vault.backend
    for name in _index_names(scene):
        backend.delete(name)
    backend.put(f"index/{fmt.hexdigest(data)}", data)
    victim = scene.fresh()
    err = refused(lambda: victim.restore(scene.good.id, to=scene.to))
    assert isinstance(err, VaultCorrupt)
    assert any("index fragment" in d for d in victim.verify().damage)


# ---------------------------------------------------------------- damaged packs


def _packs(scene: Scene) -> list[str]:
    return [o.name for o in scene.vault.backend.list("packs/")]


def _damage_pack(scene: Scene, how: str) -> None:
    pid, blob = _data_blob(scene)
    name = pack_name(pid)
    backend = scene.vault.backend
    data = bytearray(backend.get(name))
    if how == "flip-data":  # one bit in the middle of sub/b.bin's stored bytes
        _pack, _codec, offset, length, _raw = scene.fresh().repository().index()[bytes.fromhex(blob)]
        data[offset + length // 2] ^= 0x01
    elif how == "flip-every-data-byte":
        end = len(data) - 200
        data[:end] = bytes(b ^ 0xFF for b in data[:end])
    elif how == "truncate":
        data = data[: len(data) // 3]
    elif how == "zero":
        data = bytearray(len(data))
    elif how == "delete":
        backend.delete(name)
        return
    elif how == "replace-with-other-pack":
        others = [p for p in _packs(scene) if p != name]
        data = bytearray(backend.get(others[0])) if others else bytearray(b"x" * len(data))
    backend.put(name, bytes(data), overwrite=True)


PACK_DAMAGE = ["flip-data", "flip-every-data-byte", "truncate", "zero", "delete", "replace-with-other-pack"]


@pytest.mark.parametrize("how", PACK_DAMAGE)
def test_damaged_pack_is_refused_and_changes_no_file(scene: Scene, how: str) -> None:
    _damage_pack(scene, how)
    (scene.to / "r" / "sub").mkdir(parents=True)
    (scene.to / "r" / "sub" / "b.bin").write_bytes(b"my own version\n")
    before = files_in(scene.to)
    watch = scene.watch(scene.to)
    err = refused(lambda: scene.fresh().restore(scene.good.id, to=scene.to))
    assert isinstance(err, VaultCorrupt)
    watch.check()
    assert files_in(scene.to) == before, "no file may appear before the snapshot is verified"
    assert (scene.to / "r/sub/b.bin").read_bytes() == b"my own version\n"
    assert not scene.fresh().verify(read_data=True).ok


def test_damaged_pack_in_place_changes_no_file(scene: Scene) -> None:
    _damage_pack(scene, "flip-data")
    (scene.work / "sub/b.bin").write_bytes(b"newer work\n")
    (scene.work / "a.txt").unlink()
    before = listing(scene.work, dir_mtimes=False)
    watch = scene.watch(scene.work)
    refused(lambda: scene.fresh().restore(scene.good.id))
    watch.check()
    assert listing(scene.work, dir_mtimes=False) == before


def test_damaged_newest_snapshot_falls_back_to_the_one_before(scene: Scene) -> None:
    (scene.work / "new.txt").write_bytes(b"only in the second snapshot " * 100)
    second = scene.vault.snapshot([scene.work], run=RUN, step=2)
    name = pack_name(scene.fresh().repository().index()[bytes.fromhex(fmt.hexdigest((scene.work / "new.txt").read_bytes()))][0])
    data = bytearray(scene.vault.backend.get(name))
    data[0] ^= 0xFF
    scene.vault.backend.put(name, bytes(data), overwrite=True)
    with pytest.warns(UserWarning, match=second.short_id):
        result = scene.fresh().restore(run=RUN, to=scene.to)
    assert result is not None and result.snapshot.id == scene.good.id and len(result.fallbacks) == 1
    assert not (scene.to / "r/new.txt").exists()
    assert (scene.to / "r/a.txt").read_bytes() == ORIGINAL["a.txt"]


def test_damaged_pack_leaves_no_new_folders(scene: Scene) -> None:
    """README: 'a damaged snapshot changes nothing on disk'."""
    _damage_pack(scene, "flip-data")
    refused(lambda: scene.fresh().restore(scene.good.id, to=scene.to))
    assert not scene.to.exists() or listing(scene.to) == {}


# ---------------------------------------------------------------- zstd frames that claim a petabyte

# 16 bytes: a zstd frame header declaring 2**50 bytes of content, and one RLE block.
BOMB = fmt.ZSTD_MAGIC + bytes([0xE0]) + (1 << 50).to_bytes(8, "little") + ((1 << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\0"


def test_tree_blob_that_is_a_zstd_bomb_is_refused(scene: Scene) -> None:
    bomb_id = fmt.digest(b"the tree the attacker claims")
    scene.put_blob(BOMB, fmt.CODEC_ZSTD, 100, bomb_id)
    sid = scene.craft(tree_ids=[bomb_id.hex()])
    victim = scene.fresh()
    err = refused(lambda: victim.restore(sid, to=scene.to))
    assert isinstance(err, VaultCorrupt)
    assert not victim.verify().ok


def test_index_fragment_that_is_a_zstd_bomb_is_skipped(scene: Scene) -> None:
    scene.vault.backend.put(f"index/{fmt.hexdigest(BOMB)}", BOMB)
    victim = scene.fresh()
    result = victim.restore(scene.good.id, to=scene.to)
    assert result is not None and tree_state(scene.to / "r") == tree_state(scene.work)
    assert any("index fragment" in d for d in victim.verify().damage)


def test_manifest_that_is_a_zstd_bomb_is_skipped(scene: Scene) -> None:
    sid = scene.put_manifest(BOMB)
    victim = scene.fresh()
    assert [s.id for s in victim.snapshots()] == [scene.good.id]
    refused(lambda: victim.restore(sid, to=scene.to))
    assert victim.restore(run=RUN, to=scene.to) is not None


def test_cli_survives_a_zstd_bomb_manifest(local_scene: Scene) -> None:
    local_scene.put_manifest(BOMB)
    proc = cli("snapshots", "--vault", local_scene.url)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert local_scene.good.short_id in proc.stdout


# ---------------------------------------------------------------- ids that look hex but are not


@pytest.mark.parametrize("bad", ["0x" + "a" * 62, "+" + "a" * 63, " " + "a" * 63, "a" + "_a" * 31 + "a", "٣" * 64])
def test_tree_blob_id_that_only_int_accepts_is_refused(scene: Scene, bad: str) -> None:
    sid = scene.craft(tree=b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/x","t":"f","m":420,"n":0,"s":5,"b":["' + bad.encode() + b'"]}\n')
    refused(lambda: scene.fresh().restore(sid, to=scene.to))


def test_manifest_tree_id_that_only_int_accepts_is_refused(scene: Scene) -> None:
    sid = scene.craft(tree_ids=["0x" + "a" * 62])
    victim = scene.fresh()
    refused(lambda: victim.restore(sid, to=scene.to))
    assert not victim.verify().ok


# ---------------------------------------------------------------- names the tree format must carry


@pytest.mark.parametrize("name", ["a\u2028b", "a\u2029b", "a\x85b"])
def test_file_names_with_unicode_line_breaks_round_trip(tmp_path: Path, local_vault: str, name: str) -> None:
    work = make_tree(tmp_path / "w", {name: b"x", "plain": b"y"})
    vault = liferaft.Vault(local_vault)
    snap = vault.snapshot([work], run="names")
    result = liferaft.Vault(local_vault).restore(snap.id, to=tmp_path / "to")
    assert result is not None
    assert tree_state(tmp_path / "to" / "w") == tree_state(work)


# ---------------------------------------------------------------- the CLI: one line, non-zero exit


def _one_error_line(proc: Any) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("liferaft: error:"), proc.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["write-through-rel-link", "dotdot-in-path", "absolute-into-outside"])
def test_cli_refuses_a_hostile_tree_in_one_line(local_scene: Scene, case: str) -> None:
    scene = local_scene
    scene.vault.repository().forget([scene.good.id])
    sid = scene.craft(_expand(HOSTILE_TREES[case], scene.outside))
    watch = scene.watch(scene.to)
    _one_error_line(cli("restore", sid[:12], "--to", str(scene.to), "--vault", scene.url))
    _one_error_line(cli("restore", "--run", RUN, "--to", str(scene.to), "--vault", scene.url))
    _one_error_line(cli("restore", sid[:12], "--vault", scene.url))
    watch.check()
    assert files_in(scene.to) == set()


def test_cli_refuses_a_damaged_pack_and_a_forged_source_in_one_line(local_scene: Scene) -> None:
    scene = local_scene
    forged = scene.craft([D("r"), F("r/x")], roots=[{"name": "r", "source": "../../outside", "type": "d"}])
    watch = scene.watch(scene.to)
    line = _one_error_line(cli("restore", forged[:12], "--vault", scene.url))
    assert "unsafe" in line
    _damage_pack(scene, "flip-data")
    _one_error_line(cli("restore", scene.good.short_id, "--to", str(scene.to), "--vault", scene.url))
    watch.check()


def test_cli_reports_a_skipped_link(local_scene: Scene) -> None:
    scene = local_scene
    sid = scene.craft([D("r"), L("r/esc", "../../outside/secret.txt"), F("r/x")])
    proc = cli("restore", sid[:12], "--to", str(scene.to), "--vault", scene.url)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "r/esc -> ../../outside/secret.txt" in proc.stderr
    assert not os.path.lexists(scene.to / "r/esc")


def test_cli_refuses_a_hex_looking_blob_id_in_one_line(local_scene: Scene) -> None:
    scene = local_scene
    sid = scene.craft(tree=b'{"p":"r","t":"d","m":493,"n":0}\n{"p":"r/x","t":"f","m":420,"n":0,"s":5,"b":["0x' + b"a" * 62 + b'"]}\n')
    _one_error_line(cli("restore", sid[:12], "--to", str(scene.to), "--vault", scene.url))
    proc = cli("verify", "--vault", scene.url)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the CLI shows what a manifest says, safely

HOSTILE_LISTINGS: dict[str, Any] = {
    "plain": {"run": "attacker", "host": "elsewhere"},
    "huge-metric": {"metrics": {"loss": 10**400}},
    "stats-not-numbers": {"stats": {"bytes": "lots", "files": [1]}},
    "markup-in-run": {"run": "[/bold]"},
    "markup-in-tag": {"tags": {"k": "[/]"}},
    "escape-in-run": {"run": "\x1b]0;pwned\x07\x1b[2J"},
    "escape-in-host": {"host": "\x1b[2J\x1b[31m"},
}


@pytest.mark.parametrize("case", list(HOSTILE_LISTINGS))
def test_cli_lists_a_hostile_manifest_safely(local_scene: Scene, case: str) -> None:
    """Listing must neither die nor let the vault drive the terminal: the hostile snapshot is
    shown with its odd fields neutralised, or left out as damaged; the good one is listed."""
    scene = local_scene
    scene.craft([D("r"), F("r/x")], **HOSTILE_LISTINGS[case])
    proc = cli("snapshots", "--vault", scene.url, env={"COLUMNS": "250"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert scene.good.short_id in proc.stdout
    assert "\x1b" not in proc.stdout + proc.stderr
    listed = cli("snapshots", "--json", "--vault", scene.url)
    assert listed.returncode == 0 and scene.good.id in {s["id"] for s in json.loads(listed.stdout)}


def test_cli_skipped_link_warning_cannot_drive_the_terminal(local_scene: Scene) -> None:
    scene = local_scene
    sid = scene.craft([D("r"), L("r/esc", "/\x1b]0;pwned\x07\x1b[2J"), F("r/x")])
    proc = cli("restore", sid[:12], "--to", str(scene.to), "--vault", scene.url)
    assert proc.returncode == 0, proc.stderr
    assert "r/esc" in proc.stderr and "\x1b" not in proc.stderr
