"""Damaged vaults: verify names the damage, restore falls back, nothing on disk is harmed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import liferaft
from conftest import cli, make_tree, tree_state
from liferaft.errors import LiferaftError, VaultCorrupt
from liferaft.vault import format as fmt
from liferaft.vault.repository import pack_name


def _two_snapshots(tmp_path: Path) -> tuple[liferaft.Vault, Path, dict, dict, list]:
    vault = liferaft.Vault(tmp_path / "vault")
    work = make_tree(tmp_path / "work" / "ckpt", {"model.bin": os.urandom(300_000), "notes.txt": "v1"})
    s1 = vault.snapshot([work], run="r", step=1)
    state1 = tree_state(work)
    (work / "model.bin").write_bytes(os.urandom(300_000))
    (work / "notes.txt").write_text("v2")
    s2 = vault.snapshot([work], run="r", step=2)
    state2 = tree_state(work)
    return vault, work, state1, state2, [s1, s2]


def _blob_location(vault: liferaft.Vault, snap, path: str) -> tuple[str, int, int]:
    repo = vault.repository()
    entry = next(e for e in repo.read_tree(snap) if e.path == path)
    pack_id, _codec, offset, length, _raw = repo.index()[bytes.fromhex(entry.blobs[0])]
    return pack_id, offset, length


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_is_named_and_restore_falls_back(tmp_path: Path) -> None:
    vault, _work, state1, _state2, (s1, s2) = _two_snapshots(tmp_path)
    pack_id, offset, length = _blob_location(vault, s2, "ckpt/model.bin")
    assert pack_id not in {_blob_location(vault, s1, "ckpt/model.bin")[0]}
    _flip(Path(vault.url) / pack_name(pack_id), offset + length // 2)

    assert vault.verify().ok  # structure is intact: only reading the data can tell
    report = vault.verify(read_data=True)
    assert not report.ok
    assert any(pack_id in d and s2.short_id in d for d in report.damage), report.damage
    assert report.damaged_snapshots == {s2.id}
    r = cli("--vault", vault.url, "verify", "--read-data")
    assert r.returncode == 1 and pack_id in r.stderr and s2.short_id in r.stderr

    with pytest.warns(UserWarning, match=f"snapshot {s2.short_id}.*failed verification"):
        result = vault.restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == s1.id and result.fallbacks
    assert tree_state(tmp_path / "back" / "ckpt") == state1

    r = cli("--vault", vault.url, "restore", "--run", "r", "--to", str(tmp_path / "cli-back"))
    assert r.returncode == 0
    assert "warning:" in r.stderr and s2.short_id in r.stderr and "used the one before" in r.stderr
    assert tree_state(tmp_path / "cli-back" / "ckpt") == state1


def test_damaged_snapshot_by_id_changes_nothing_on_disk(tmp_path: Path) -> None:
    vault, work, _state1, state2, (_s1, s2) = _two_snapshots(tmp_path)
    pack_id, offset, _length = _blob_location(vault, s2, "ckpt/model.bin")
    _flip(Path(vault.url) / pack_name(pack_id), offset)
    (work / "notes.txt").write_text("local edit")
    before = tree_state(work)
    with pytest.raises(VaultCorrupt, match="does not match its hash"):
        vault.restore(s2.id)  # in place: all or nothing
    assert tree_state(work) == before
    assert not list(work.rglob(".liferaft-*"))
    del state2


def test_missing_and_truncated_packs_are_found_without_reading_data(tmp_path: Path) -> None:
    vault, _work, state1, _state2, (s1, s2) = _two_snapshots(tmp_path)
    pack_id, _offset, _length = _blob_location(vault, s2, "ckpt/model.bin")
    path = Path(vault.url) / pack_name(pack_id)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    report = vault.verify()
    assert any("truncated" in d and s2.short_id in d for d in report.damage), report.damage
    path.unlink()
    report = vault.verify()
    assert any("missing" in d and s2.short_id in d for d in report.damage), report.damage
    with pytest.warns(UserWarning):
        result = vault.restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == s1.id
    assert tree_state(tmp_path / "back" / "ckpt") == state1


def test_corrupt_manifest_is_reported_and_skipped(tmp_path: Path) -> None:
    vault, _work, state1, _state2, (s1, s2) = _two_snapshots(tmp_path)
    manifest = Path(vault.url) / "snapshots" / f"{s2.id}.json"
    doc = json.loads(manifest.read_text())
    doc["step"] = 999  # tampered: the name no longer matches the bytes
    manifest.write_text(json.dumps(doc))
    assert [s.id for s in liferaft.Vault(vault.url).snapshots()] == [s1.id]
    report = liferaft.Vault(vault.url).verify()
    assert any(s2.short_id in d and "hash" in d for d in report.damage)
    result = liferaft.Vault(vault.url).restore(run="r", to=tmp_path / "back")
    assert result is not None and tree_state(tmp_path / "back" / "ckpt") == state1
    # prune refuses to guess what a damaged manifest referenced, and says how to proceed
    with pytest.raises(LiferaftError, match="forget"):
        liferaft.Vault(vault.url).prune()
    r = cli("--vault", vault.url, "forget", s2.id[:10])
    assert r.returncode == 0 and r.stdout.strip() == f"forgot 1 snapshot: {s2.short_id} (damaged)", r.stdout + r.stderr
    assert liferaft.Vault(vault.url).verify(read_data=True).ok
    assert [s.id for s in liferaft.Vault(vault.url).snapshots()] == [s1.id]


def test_corrupt_index_fragment_is_named(tmp_path: Path) -> None:
    vault, *_ = _two_snapshots(tmp_path)
    frag = next((Path(vault.url) / "index").iterdir())
    _flip(frag, 10)
    report = liferaft.Vault(vault.url).verify()
    assert not report.ok
    assert any(frag.name in d for d in report.damage)


def test_corrupt_config_is_one_clear_line(tmp_path: Path) -> None:
    vault, *_ = _two_snapshots(tmp_path)
    (Path(vault.url) / "config.json").write_text("{not json")
    r = cli("--vault", vault.url, "snapshots")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "config.json is not valid JSON" in r.stderr


def test_garbage_pack_damage_is_a_warning_not_an_error(tmp_path: Path) -> None:
    vault, _work, _s1state, _s2state, (s1, s2) = _two_snapshots(tmp_path)
    vault.forget_ids([s1.id])
    pack_id, offset, _ = _blob_location(liferaft.Vault(vault.url), s2, "ckpt/model.bin")
    packs = [p for p in (Path(vault.url) / "packs").rglob("*") if p.is_file() and p.name != pack_id]
    for p in packs:
        _flip(p, 0)
    assert packs  # s1's pack, which only the forgotten snapshot used
    report = liferaft.Vault(vault.url).verify(read_data=True)
    assert report.ok, report.damage
    assert any("no snapshot needs it" in w for w in report.warnings)
    del offset


def test_pack_ids_name_the_header_and_any_flipped_header_byte_is_damage(tmp_path: Path) -> None:
    # A pack's id is the hash of its header (which names every blob by hash), so a
    # flipped byte anywhere in the pack is still caught: in a blob by the blob's id, in
    # the header (here) by the pack's id or the header's own checks.
    vault, _work, _state1, _state2, (_s1, s2) = _two_snapshots(tmp_path)
    pack_id, _offset, _length = _blob_location(vault, s2, "ckpt/model.bin")
    path = Path(vault.url) / pack_name(pack_id)
    data = path.read_bytes()
    hlen = int.from_bytes(data[-12:-8], "little")
    header = data[-(hlen + 12) :]
    assert fmt.pack_id(header) == pack_id and fmt.pack_matches_id(data, pack_id)
    for spot in (len(data) - hlen - 12 + 4, len(data) - hlen - 12 + 40, len(data) - 20):  # nonce, first entry, last entry
        _flip(path, spot)
        report = vault.verify(read_data=True)
        assert not report.ok and any(pack_id in d for d in report.damage), (spot, report.damage)
        _flip(path, spot)  # back
    assert vault.verify(read_data=True).ok


def test_packs_named_by_the_hash_of_all_their_bytes_still_verify(tmp_path: Path) -> None:
    # Vaults written before pack ids named the header: their packs carry the hash of all
    # their bytes, and stay readable and clean.
    vault, _work, _state1, state2, (_s1, s2) = _two_snapshots(tmp_path)
    repo = vault.repository()
    index = repo.index()
    old_names = {}
    for pid in {e[0] for e in index.values()}:
        data = (Path(vault.url) / pack_name(pid)).read_bytes()
        old_names[pid] = fmt.hexdigest(data)
        assert fmt.pack_matches_id(data, old_names[pid])
        (Path(vault.url) / pack_name(old_names[pid])).parent.mkdir(parents=True, exist_ok=True)
        (Path(vault.url) / pack_name(pid)).rename(Path(vault.url) / pack_name(old_names[pid]))
    fragments = {}
    for name in [o.name for o in repo.backend.list("index/")]:
        doc = fmt.decode_doc(repo.backend.get(name), name)
        fragments[name] = doc
    for name, doc in fragments.items():
        text = json.dumps(doc)
        for new, old in old_names.items():
            text = text.replace(new, old)
        data = fmt.encode_doc(json.loads(text))
        repo.backend.delete(name)
        repo.backend.put(f"index/{fmt.hexdigest(data)}", data)
    fresh = liferaft.Vault(vault.url)
    assert fresh.verify(read_data=True).ok, fresh.verify(read_data=True).damage
    fresh.restore(s2.id, to=tmp_path / "back")
    assert tree_state(tmp_path / "back" / "ckpt") == state2
