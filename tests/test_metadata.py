"""A vault's metadata on a fresh start: the local cache of manifests and index fragments
(remote vaults, on the real loopback servers of tests/servers.py) and prune's merging of
small index fragments (on a local folder, where every object is an inode to look at)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import liferaft
from conftest import make_tree, tree_state
from liferaft.backends import Backend, LocalBackend, ObjectInfo
from liferaft.vault import maintenance
from liferaft.vault.metacache import MetaCache
from liferaft.vault.repository import Repository
from servers import KINDS, StoreServer
from test_cloud_crash import small_pack_vault


@pytest.fixture(params=KINDS)
def remote_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    server: StoreServer = request.getfixturevalue(f"{request.param}_server")
    server.apply(monkeypatch)
    return server.vault_url()


def _counting(vault: liferaft.Vault) -> list[str]:
    """Record the names the vault's backend is asked to read (the real backend reads them)."""
    got: list[str] = []
    real = vault.backend.get

    def get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        got.append(name)
        return real(name, offset, length)

    vault.backend.get = get  # type: ignore[method-assign]
    return got


def _metadata_reads(got: list[str]) -> list[str]:
    return [n for n in got if n.startswith(("snapshots/", "index/"))]


def _snapshots(vault: liferaft.Vault, work: Path, count: int) -> dict[str, dict]:
    states = {}
    for step in range(count):
        (work / f"ckpt-{step}.bin").write_bytes(os.urandom(50_000 + step))
        snap = vault.snapshot([work], run="r", step=step)
        states[snap.id] = tree_state(work)
    return states


def _cache(vault: liferaft.Vault) -> MetaCache:
    meta = vault.repository().meta
    assert meta is not None, "a remote vault keeps a metadata cache"
    return meta


# ---------------------------------------------------------------- the cache


def test_a_second_start_reads_no_manifest_or_fragment_from_the_vault(
    remote_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    states = _snapshots(liferaft.Vault(remote_url), work, 3)
    monkeypatch.setenv("LIFERAFT_CACHE_DIR", str(tmp_path / "machine-2"))  # a fresh machine

    first = liferaft.Vault(remote_url)
    got = _counting(first)
    assert [s.id for s in first.snapshots()] == list(states)
    index = dict(first.repository().index())
    fragments = len(first.repository().fragments())
    assert len(_metadata_reads(got)) == 3 + fragments  # everything, once

    second = liferaft.Vault(remote_url)  # the next command on that machine
    got = _counting(second)
    assert [s.id for s in second.snapshots()] == list(states)
    assert second.repository().index() == index
    newest = list(states)[-1]
    result = second.restore(newest, to=tmp_path / "back")
    assert result is not None and tree_state(tmp_path / "back" / "work") == states[newest]
    assert _metadata_reads(got) == []

    # verify reads the vault's own bytes, never the copies.
    got = _counting(second)
    assert second.verify().ok
    assert len(_metadata_reads(got)) == 3 + fragments


def test_a_forgotten_snapshot_leaves_the_cache_and_a_bad_copy_is_fetched_again(remote_url: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    states = _snapshots(liferaft.Vault(remote_url), work, 3)
    ids = list(states)
    warm = liferaft.Vault(remote_url)
    warm.snapshots()
    folder = _cache(warm).root / "snapshots"
    assert sorted(os.listdir(folder)) == sorted(ids)

    liferaft.Vault(remote_url).forget_ids([ids[0]])  # as from another machine
    later = liferaft.Vault(remote_url)
    assert [s.id for s in later.snapshots()] == ids[1:]
    assert sorted(os.listdir(folder)) == sorted(ids[1:])

    # A copy damaged on local disk, same size and time: its hash gives it away.
    copy = folder / ids[1]
    st = copy.stat()
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = liferaft.Vault(remote_url)
    got = _counting(again)
    assert [s.id for s in again.snapshots()] == ids[1:]
    assert _metadata_reads(got) == [f"snapshots/{ids[1]}.json"]
    assert copy.read_bytes().endswith(again.backend.get(f"snapshots/{ids[1]}.json"))  # repaired


def test_a_manifest_damaged_in_the_vault_is_reported_even_with_a_good_copy_cached(remote_url: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    states = _snapshots(liferaft.Vault(remote_url), work, 2)
    s1, s2 = list(states)
    liferaft.Vault(remote_url).snapshots()  # both copies cached
    time.sleep(1.1)  # stores keep times to the second: the rewrite gets a new one
    vault = liferaft.Vault(remote_url)
    name = f"snapshots/{s2}.json"
    data = bytearray(vault.backend.get(name))
    data[len(data) // 2] ^= 0x01  # same size
    vault.backend.put(name, bytes(data), overwrite=True)

    fresh = liferaft.Vault(remote_url)
    assert [s.id for s in fresh.snapshots()] == [s1]  # as without a cache: skipped
    report = fresh.verify()
    assert any(s2[:12] in d and "hash" in d for d in report.damage), report.damage
    result = liferaft.Vault(remote_url).restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == s1
    assert tree_state(tmp_path / "back" / "work") == states[s1]


@pytest.mark.parametrize("how", ["a file in the way", "read-only"])
def test_a_cache_folder_that_cannot_be_written_costs_reads_not_errors(
    remote_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    states = _snapshots(liferaft.Vault(remote_url), work, 2)
    blocked = tmp_path / "blocked"
    if how == "a file in the way":
        blocked.write_text("a file where the cache folder would go")
    elif os.geteuid() != 0:
        blocked.mkdir(mode=0o500)
    elif Path("/proc/self").is_dir():
        blocked = Path("/proc/self/liferaft-cache")  # root writes into read-only folders, not into /proc
    else:
        pytest.skip("root writes into read-only folders and there is no /proc")
    monkeypatch.setenv("LIFERAFT_CACHE_DIR", str(blocked))
    try:
        for _ in range(2):  # nothing kept: the second start reads everything again
            vault = liferaft.Vault(remote_url)
            got = _counting(vault)
            assert [s.id for s in vault.snapshots()] == list(states)
            vault.repository().index()
            assert len(_metadata_reads(got)) == 2 + len(vault.repository().fragments())
        (work / "notes.txt").write_text("v1")
        assert vault.snapshot([work], run="r").id not in states
    finally:
        if blocked.is_dir() and blocked.is_relative_to(tmp_path):
            blocked.chmod(0o700)


def test_copies_do_not_depend_on_the_cache_file_system_keeping_times(remote_url: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    states = _snapshots(liferaft.Vault(remote_url), work, 2)
    warm = liferaft.Vault(remote_url)
    warm.snapshots()
    for copy in _cache(warm).root.rglob("*"):
        if copy.is_file():
            os.utime(copy, (1, 1))  # as FAT or a copy tool would leave them
    again = liferaft.Vault(remote_url)
    got = _counting(again)
    assert [s.id for s in again.snapshots()] == list(states)
    assert _metadata_reads(got) == []


def test_local_and_memory_vaults_keep_no_copies(tmp_path: Path) -> None:
    for url in (str(tmp_path / "vault"), "memory://liferaft-tests/no-cache"):
        vault = liferaft.Vault(url)
        vault.snapshot([make_tree(tmp_path / "work", {"a": "1"})], run="r")
        assert vault.repository().meta is None
    assert not (Path(os.environ["LIFERAFT_CACHE_DIR"]) / "meta").exists()


# ---------------------------------------------------------------- merging fragments


def _fragment_names(vault: str) -> list[str]:
    return sorted(os.listdir(Path(vault) / "index"))


def test_prune_merges_many_small_fragments_into_one(local_vault: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    vault = liferaft.Vault(local_vault)
    count = maintenance.COMPACT_COUNT + 4
    states = _snapshots(vault, work, count)
    assert len(_fragment_names(local_vault)) == count
    index = dict(liferaft.Vault(local_vault).repository().index())

    report = liferaft.Vault(local_vault).prune(wait=0)
    assert report.packs_deleted == 0 and report.index_rewritten == count
    assert len(_fragment_names(local_vault)) == 1
    fresh = liferaft.Vault(local_vault)
    assert fresh.repository().index() == index
    assert fresh.verify(read_data=True).ok
    for i in (0, count - 1):
        sid = list(states)[i]
        result = fresh.restore(sid, to=tmp_path / f"back-{i}")
        assert result is not None and tree_state(tmp_path / f"back-{i}" / "work") == states[sid]

    # Few fragments: prune leaves them alone.
    _snapshots(fresh, work, 3)
    before = _fragment_names(local_vault)
    assert liferaft.Vault(local_vault).prune(wait=0).index_rewritten == 0
    assert _fragment_names(local_vault) == before


def test_merging_while_packs_are_deleted_keeps_exactly_the_live_entries(
    local_vault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "FRAGMENT_ENTRIES", 4)  # several output fragments
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    vault = liferaft.Vault(local_vault)
    states = _snapshots(vault, work, maintenance.COMPACT_COUNT + 6)
    for step in range(3):
        (work / f"ckpt-{step}.bin").unlink()
    vault.snapshot([work], run="r", step=99)
    before = dict(liferaft.Vault(local_vault).repository().index())
    forgotten, report = liferaft.Vault(local_vault).forget(run="r", keep_last=1, prune=True)
    assert report is not None and report.packs_deleted > 0
    fresh = liferaft.Vault(local_vault)
    sizes = sorted(len(frag) for frag in fresh.repository().fragments().values())
    assert len(sizes) > 1 and all(n >= 4 for n in sizes[1:]), sizes  # merged, in pieces of at least 4
    index = fresh.repository().index()
    packs = {p.name.rsplit("/", 1)[-1] for p in fresh.backend.list("packs/")}
    assert {entry[0] for entry in index.values()} == packs  # no entry of a deleted pack, no pack unindexed
    kept = {b: e for b, e in before.items() if e[0] in packs}  # blobs in packs neither deleted nor repacked
    assert kept and all(index[b] == e for b, e in kept.items())  # entry for entry
    assert all(e[0] not in {old[0] for old in before.values()} for b, e in index.items() if b not in kept)  # the rest: repacked
    assert fresh.verify(read_data=True).ok
    assert len(forgotten) == len(states)
    (last,) = fresh.snapshots()
    result = fresh.restore(last.id, to=tmp_path / "back")
    assert result is not None and tree_state(tmp_path / "back" / "work") == tree_state(work)


class _PruneMidList(LocalBackend):
    """A local vault whose first listing of index/ is answered, then merged away by a real
    prune before the reader gets to read the fragments it named."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.armed = True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        listing = list(super().list(prefix))
        if prefix == "index/" and self.armed:
            self.armed = False
            report = liferaft.Vault(str(self.root)).prune(wait=0)
            assert report.index_rewritten == len(listing)
        return iter(listing)


def test_a_reader_listing_fragments_just_before_a_merge_still_finds_every_blob(local_vault: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    _snapshots(liferaft.Vault(local_vault), work, maintenance.COMPACT_COUNT + 2)
    index = dict(liferaft.Vault(local_vault).repository().index())
    backend: Backend = _PruneMidList(local_vault)
    reader = Repository.open(backend)
    assert reader.index() == index
    assert not backend.armed  # type: ignore[attr-defined]


def test_stray_objects_and_odd_listings_are_read_from_the_vault_not_cached(remote_url: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    states = _snapshots(liferaft.Vault(remote_url), work, 2)
    vault = liferaft.Vault(remote_url)
    vault.backend.put("index/README.txt", b"not a fragment", overwrite=True)
    assert [s.id for s in vault.snapshots()] == list(states)
    newest = list(states)[-1]
    result = vault.restore(newest, to=tmp_path / "back")
    assert result is not None and tree_state(tmp_path / "back" / "work") == states[newest]
    assert any("README.txt" in d for d in liferaft.Vault(remote_url).verify().damage)
    cached = {p.name for p in _cache(vault).root.rglob("*") if p.is_file()}
    assert cached and all(len(name) == 64 for name in cached)


@pytest.mark.parametrize("mtime", [float("nan"), float("inf"), -1.0, 1e30])
def test_a_listing_time_that_is_no_time_is_never_cached(tmp_path: Path, mtime: float) -> None:
    meta = MetaCache("id", "s3://b/v", tmp_path)
    listed = ObjectInfo("index/" + "a" * 64, 3, mtime)
    meta.put("index", listed, b"abc")
    assert meta.get("index", listed) is None
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    good = ObjectInfo("index/" + "a" * 64, 3, 1_700_000_000.25)
    meta.put("index", good, b"abc")
    assert meta.get("index", good) == b"abc"
    assert meta.get("index", ObjectInfo(good.name, 3, good.mtime + 1)) is None  # rewritten since
    assert meta.get("index", ObjectInfo(good.name, 4, good.mtime)) is None


def test_a_truncated_pack_does_not_cost_the_merged_index(local_vault: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    small_pack_vault(local_vault, 1 << 20)  # the file's packs are sealed apart from the tree's
    vault = liferaft.Vault(local_vault)
    states = {}
    for step in range(maintenance.COMPACT_COUNT + 2):
        for old in work.iterdir():
            old.unlink()
        (work / f"c{step}.bin").write_bytes(os.urandom(2_000_000))  # a pack of its own, no tree blob in it
        snap = vault.snapshot([work], run="r", step=step)
        states[snap.id] = tree_state(work)
    repo = liferaft.Vault(local_vault).repository()
    index = dict(repo.index())
    first = next(iter(states))
    victim = index[bytes.fromhex(next(e for e in repo.read_tree(repo.find(first)) if e.path.endswith(".bin")).blobs[0])][0]
    pack = next(p for p in (Path(local_vault) / "packs").rglob(victim))
    os.truncate(pack, pack.stat().st_size // 2)  # a lazily uploaded file cut short

    report = liferaft.Vault(local_vault).prune(wait=0)
    assert report.index_rewritten == len(states) and len(_fragment_names(local_vault)) == 1
    fresh = liferaft.Vault(local_vault)
    assert fresh.repository().index() == index  # every entry kept
    damage = fresh.verify().damage
    assert len(damage) == 1 and "truncated" in damage[0] and first[:12] in damage[0]
    newest = list(states)[-1]
    result = fresh.restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == newest
    assert tree_state(tmp_path / "back" / "work") == states[newest]


class _PagedListing(LocalBackend):
    """A local vault listed the way a paged store (or a directory read) can list it while
    a prune merges: page one is read, then the prune writes the merged fragment and deletes
    the fragments of page two before page two is read, and those of page one only after the
    reader has read them. So nothing the reader listed vanished, yet it saw neither the
    fragments of page two nor the merged one."""

    def __init__(self, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(root)
        self.armed = True
        self.monkeypatch = monkeypatch

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        listing = list(super().list(prefix))
        if prefix != "index/" or not self.armed:
            return iter(listing)
        self.armed = False
        page_one = {o.name for o in listing[: len(listing) // 2]}
        real_delete = LocalBackend.delete

        def delete(backend: LocalBackend, name: str) -> None:
            if name not in page_one:  # page one's go later, after they were read
                real_delete(backend, name)

        with self.monkeypatch.context() as m:
            m.setattr(LocalBackend, "delete", delete)
            assert liferaft.Vault(str(self.root)).prune(wait=0).index_rewritten == len(listing)
        return iter(o for o in super().list(prefix) if o.name in page_one)


def test_verify_racing_a_merge_reports_no_damage(local_vault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = make_tree(tmp_path / "work", {"notes.txt": "v0"})
    _snapshots(liferaft.Vault(local_vault), work, maintenance.COMPACT_COUNT + 2)
    backend = _PagedListing(local_vault, monkeypatch)
    report = maintenance.verify(Repository.open(backend))
    assert not backend.armed
    assert report.ok, report.damage


def test_an_entry_in_two_fragments_counts_once_towards_its_packs_use(local_vault: str, tmp_path: Path) -> None:
    """A prune killed after writing its replacement fragment leaves entries twice; the next
    prune must judge packs as it would without the copy (it used to count them twice, keep
    a mostly-dead pack, and leave the work to the prune after it)."""
    from liferaft.vault import format as fmt

    work = make_tree(tmp_path / "work", {"keep.bin": os.urandom(1_500_000), "drop.bin": os.urandom(2_500_000)})
    vault = liferaft.Vault(local_vault)
    first = vault.snapshot([work], run="r")
    (work / "drop.bin").unlink()
    vault.snapshot([work], run="r")
    vault.forget_ids([first.id])
    repo = liferaft.Vault(local_vault).repository()
    for frag in list(repo.fragments().values()):  # every fragment twice, as a killed prune leaves them
        packs: dict[str, tuple[int, list[fmt.PackEntry]]] = {}
        for bid, (pid, codec, off, length, raw) in frag.items():
            size = repo.backend.stat(f"packs/{pid[:2]}/{pid}").size
            packs.setdefault(pid, (size, []))[1].append(fmt.PackEntry(bid, codec, off, length, raw))
        data = fmt.build_index(packs, "copy")
        repo.backend.put(f"index/{fmt.hexdigest(data)}", data)
    report = liferaft.Vault(local_vault).prune(wait=0)
    assert report.packs_repacked == 1  # keep.bin's pack is 37 % live
    again = liferaft.Vault(local_vault).prune(wait=0)
    assert again.packs_deleted == again.packs_repacked == 0
    fresh = liferaft.Vault(local_vault)
    assert fresh.verify(read_data=True).ok
    result = fresh.restore(run="r", to=tmp_path / "back")
    assert result is not None and tree_state(tmp_path / "back" / "work") == tree_state(work)
