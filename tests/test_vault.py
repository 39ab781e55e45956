"""Round trips, dedup and change detection, on every backend the vault runs on."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import liferaft
from conftest import make_tree, tree_state
from liferaft.errors import LiferaftError, RestoreRefused
from liferaft.keep.units import plural
from liferaft.vault import format as fmt


def _stored_bytes(vault: liferaft.Vault) -> int:
    return sum(o.size for o in vault.backend.list("packs/"))


def test_round_trip_keeps_everything(vault_url: str, tmp_path: Path) -> None:
    src = make_tree(
        tmp_path / "work" / "ckpt",
        {
            "weights.bin": os.urandom(3 << 20),  # chunked
            "empty": b"",
            "empty-dir": None,
            "nested/deeper/a.txt": "alpha",
            "ünïcødé — 名前.txt": "unicode names survive",
            "latest": "->nested/deeper/a.txt",
            "dangling": "->does-not-exist",
            "run.sh": "#!/bin/sh\necho hi\n",
        },
    )
    os.chmod(src / "run.sh", 0o750)
    os.chmod(src / "nested", 0o700)
    os.utime(src / "empty", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    vault = liferaft.Vault(vault_url)
    snap = vault.snapshot([src], run="r", step=7, tags={"lr": "3e-4"}, metrics={"loss": 0.5})
    assert snap.step == 7 and snap.tags == {"lr": "3e-4"} and snap.metrics == {"loss": 0.5}
    result = vault.restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == snap.id
    assert tree_state(tmp_path / "back" / "ckpt") == tree_state(src)
    assert vault.verify(read_data=True).ok


def test_restore_in_place_and_single_file(vault_url: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "w", {"model.pt": os.urandom(100_000), "logs/events": "x" * 5000})
    vault = liferaft.Vault(vault_url)
    vault.snapshot([work / "model.pt", work / "logs"], run="r")
    before = tree_state(work)
    (work / "model.pt").unlink()
    (work / "logs" / "events").write_text("clobbered")
    vault.restore(run="r")
    assert tree_state(work) == before


def test_first_run_has_nothing_to_restore(vault_url: str, tmp_path: Path) -> None:
    vault = liferaft.Vault(vault_url)
    assert vault.restore(run="never") is None
    vault.snapshot([make_tree(tmp_path / "a", {"f": "1"})], run="other")
    assert vault.restore(run="never") is None


def test_newest_of_the_run_is_restored(vault_url: str, tmp_path: Path) -> None:
    vault = liferaft.Vault(vault_url)
    d = make_tree(tmp_path / "d", {"f": "one"})
    vault.snapshot([d], run="r", step=1)
    (d / "f").write_text("two")
    vault.snapshot([d], run="r", step=2)
    vault.snapshot([make_tree(tmp_path / "x" / "d", {"f": "other run"})], run="s", step=3)
    vault.restore(run="r", to=tmp_path / "out")
    assert (tmp_path / "out" / "d" / "f").read_text() == "two"
    assert [s.step for s in vault.snapshots(run="r")] == [1, 2]


def test_big_file_and_many_small_files(local_vault: str, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    big = src / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    small = src / "small"
    small.mkdir()
    for i in range(10_000):
        (small / f"{i:05d}.txt").write_bytes(b"%d\n" % i * (i % 7))
    vault = liferaft.Vault(local_vault)
    snap = vault.snapshot([src], run="big")
    assert snap.stats["files"] == 10_001
    packs = list(vault.backend.list("packs/"))
    assert 2 <= len(packs) <= 10  # many files become few large packs
    vault.restore(run="big", to=tmp_path / "back")
    assert (tmp_path / "back" / "data" / "big.bin").read_bytes() == big.read_bytes()
    assert tree_state(tmp_path / "back" / "data" / "small") == tree_state(small)


def test_unchanged_tree_adds_almost_nothing(vault_url: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {f"f{i}": os.urandom(50_000) for i in range(40)})
    time.sleep(1.1)  # files changed within a second of a scan are re-read (racily clean)
    vault = liferaft.Vault(vault_url)
    first = vault.snapshot([src], run="r")
    size = _stored_bytes(vault)
    second = vault.snapshot([src], run="r")
    assert second.id != first.id
    assert second.stats["files_read"] == 0  # the stat cache spared every read
    assert _stored_bytes(vault) - size < 1024
    same = vault.snapshot([src], run="r", skip_unchanged=True)
    assert same.unchanged and same.id == second.id


def test_dedup_without_stat_cache(vault_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tree(tmp_path / "d", {"a": os.urandom(2 << 20), "b": os.urandom(10_000)})
    vault = liferaft.Vault(vault_url)
    vault.snapshot([src], run="r")
    size = _stored_bytes(vault)
    monkeypatch.setenv("LIFERAFT_CACHE_DIR", str(tmp_path / "fresh-cache"))  # a new machine
    snap = vault.snapshot([src], run="r")
    assert snap.stats["files_read"] == 2
    assert _stored_bytes(vault) - size < 1024


def test_append_to_big_file_adds_a_few_mib(vault_url: str, tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.mkdir()
    big = src / "events.tfevents"
    big.write_bytes(os.urandom(16 << 20))
    vault = liferaft.Vault(vault_url)
    vault.snapshot([src], run="r")
    size = _stored_bytes(vault)
    with open(big, "ab") as f:
        f.write(os.urandom(64 << 10))
    snap = vault.snapshot([src], run="r")
    added = _stored_bytes(vault) - size
    assert added <= 5 << 20, f"append of 64 KiB stored {added} bytes"
    assert snap.stats["added_bytes"] <= 5 << 20
    vault.restore(run="r", to=tmp_path / "back")
    assert (tmp_path / "back" / "d" / big.name).read_bytes() == big.read_bytes()


def test_modified_file_in_middle_keeps_most_chunks(vault_url: str, tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.mkdir()
    data = bytearray(os.urandom(24 << 20))
    (src / "model.safetensors").write_bytes(data)
    vault = liferaft.Vault(vault_url)
    vault.snapshot([src], run="r")
    size = _stored_bytes(vault)
    data[12 << 20 : (12 << 20) + 4096] = os.urandom(4096)  # a fine-tune touched one layer
    (src / "model.safetensors").write_bytes(data)
    vault.snapshot([src], run="r")
    assert _stored_bytes(vault) - size <= 9 << 20


def test_compressible_data_is_compressed_random_is_not(vault_url: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {"log.txt": "step 1 loss 0.5\n" * 200_000, "rand": os.urandom(3_000_000)})
    vault = liferaft.Vault(vault_url)
    snap = vault.snapshot([src], run="r")
    assert snap.stats["stored_bytes"] < 3_000_000 + 200_000  # text shrank, random stayed ~raw
    codecs = {e[1] for e in vault.repository().index().values()}
    assert codecs == {fmt.CODEC_RAW, fmt.CODEC_ZSTD}


def _snapshot_while_rewritten(vault: liferaft.Vault, src: Path, path: Path, new: bytes, step: int) -> liferaft.api.SnapshotInfo:
    """Snapshot ``src`` while ``path`` is rewritten in place, the way a careless save does."""
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            with open(path, "r+b") as f:
                for off in range(0, len(new), 1 << 20):
                    f.write(new[off : off + (1 << 20)])
                    if stop.is_set():
                        return

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.05)
        return vault.snapshot([src], run="r", step=step)
    finally:
        stop.set()
        t.join()


def test_file_changing_while_read_keeps_previous_version(local_vault: str, tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.mkdir()
    ckpt = src / "ckpt.bin"
    old = os.urandom(40 << 20)
    ckpt.write_bytes(old)
    vault = liferaft.Vault(local_vault)
    vault.snapshot([src], run="r", step=1)
    new = os.urandom(40 << 20)
    snap = _snapshot_while_rewritten(vault, src, ckpt, new, step=2)
    assert snap.stats["changed_during_read"] == ["d/ckpt.bin"]
    vault.restore(snap.id, to=tmp_path / "back")
    assert (tmp_path / "back" / "d" / "ckpt.bin").read_bytes() == old  # never a torn file
    # The next pass takes the settled file.
    ckpt.write_bytes(new)
    vault.snapshot([src], run="r", step=3)
    vault.restore(run="r", to=tmp_path / "back2")
    assert (tmp_path / "back2" / "d" / "ckpt.bin").read_bytes() == new


def test_large_files_read_side_by_side_commit_whole_and_dedup(local_vault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Several readers at once (forced to 3, whatever this machine's cores): every file is
    # whole, equal big files are stored once, small files beside them are kept, and one
    # big file rewritten during the read keeps its previous version while the rest commit.
    from liferaft.vault import snapshot as snapshot_mod

    monkeypatch.setattr(snapshot_mod, "_readers", lambda: 3)
    src = tmp_path / "d"
    same = os.urandom(3 << 20)
    files = {f"big{i}.bin": os.urandom((2 << 20) + i * 4097) for i in range(5)}
    files |= {"copy-a.bin": same, "copy-b.bin": same, "copy-c.bin": same, "hot.bin": os.urandom(24 << 20)}
    files |= {f"small/{i}.txt": f"small {i}" for i in range(40)}
    make_tree(src, files)
    vault = liferaft.Vault(local_vault)
    first = vault.snapshot([src], run="r", step=1)
    assert first.stats["added_bytes"] < sum(len(v) for v in files.values() if isinstance(v, bytes)) - 2 * len(same) + (1 << 20)
    vault.restore(first.id, to=tmp_path / "back")
    assert tree_state(tmp_path / "back" / "d") == tree_state(src)

    old_hot = (src / "hot.bin").read_bytes()
    for i in range(5):
        (src / f"big{i}.bin").write_bytes(os.urandom(2 << 20))
    second = _snapshot_while_rewritten(vault, src, src / "hot.bin", os.urandom(24 << 20), step=2)
    assert second.stats["changed_during_read"] == ["d/hot.bin"]
    vault.restore(second.id, to=tmp_path / "back2")
    back = tmp_path / "back2" / "d"
    assert (back / "hot.bin").read_bytes() == old_hot
    for i in range(5):
        assert (back / f"big{i}.bin").read_bytes() == (src / f"big{i}.bin").read_bytes()
    assert (back / "small" / "7.txt").read_text() == "small 7"
    assert vault.verify(read_data=True).ok


def test_new_file_changing_while_read_is_left_out(local_vault: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {"keep": "k"})
    target = src / "growing"
    target.write_bytes(os.urandom(30 << 20))
    stop = threading.Event()

    def appender() -> None:
        with open(target, "ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()

    t = threading.Thread(target=appender)
    t.start()
    try:
        time.sleep(0.02)
        snap = liferaft.Vault(local_vault).snapshot([src], run="r")
    finally:
        stop.set()
        t.join()
    assert snap.stats["changed_during_read"] == ["d/growing"]
    liferaft.Vault(local_vault).restore(snap.id, to=tmp_path / "back")
    assert sorted(os.listdir(tmp_path / "back" / "d")) == ["keep"]


def test_unreadable_file_is_skipped_with_its_reason_not_taken_as_busy(local_vault: str, tmp_path: Path) -> None:
    # It was reported as "changed while read", so the background syncer committed the same
    # tree again on every pass and retried at once. Root reads any file: the snapshots run
    # in a child for which the mode-000 files are really unreadable (EACCES).
    from conftest import popen_where_file_modes_hold

    src = make_tree(tmp_path / "ckpt", {"model.pt": "weights", "notes.txt": "n", "locked.bin": "never readable"})
    os.chmod(src / "locked.bin", 0)
    script = """
import json, os, sys
import liferaft

src, vault = sys.argv[1], liferaft.Vault(sys.argv[2])
first = vault.snapshot([src], run="r")
os.chmod(os.path.join(src, "model.pt"), 0)  # read once, unreadable since
idle = vault.snapshot([src], run="r", skip_unchanged=True)
forced = vault.snapshot([src], run="r")
print(json.dumps([[s.id, s.unchanged, s.stats] for s in (first, idle, forced)]))
"""
    child = popen_where_file_modes_hold([sys.executable, "-c", script, str(src), local_vault], stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    (first_id, _, first), (idle_id, idle_unchanged, idle), (forced_id, _, forced) = json.loads(out)
    assert first["skipped"] == [f"{src}/locked.bin: Permission denied"] and first["changed_during_read"] == []
    assert idle_unchanged and idle_id == first_id  # the same tree: nothing committed
    assert idle["changed_during_read"] == [] and idle["skipped"] == [
        f"{src}/locked.bin: Permission denied",
        f"{src}/model.pt: Permission denied; its previous version is kept",
    ]
    assert forced["changed_during_read"] == [] and len(forced["skipped"]) == 2
    liferaft.Vault(local_vault).restore(forced_id, to=tmp_path / "back")
    assert sorted(os.listdir(tmp_path / "back" / "ckpt")) == ["model.pt", "notes.txt"]
    assert (tmp_path / "back" / "ckpt" / "model.pt").read_text() == "weights"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/mem is Linux's")
def test_file_failing_with_an_io_error_is_skipped_not_taken_as_busy(local_vault: str, tmp_path: Path) -> None:
    # What a flaky Drive mount gives ("[Errno 5] Input/output error"): /proc/self/mem is a
    # regular file whose read at offset 0 fails with a real EIO.
    src = make_tree(tmp_path / "ckpt", {"model.pt": "w"})
    vault = liferaft.Vault(local_vault)
    first = vault.snapshot([src, "/proc/self/mem"], run="r")
    assert first.stats["skipped"] == ["/proc/self/mem: Input/output error"] and first.stats["changed_during_read"] == []
    again = vault.snapshot([src, "/proc/self/mem"], run="r", skip_unchanged=True)
    assert again.unchanged and again.id == first.id and again.stats["skipped"] == first.stats["skipped"]


def test_first_pass_after_restoring_into_another_folder_commits_nothing(local_vault: str, tmp_path: Path) -> None:
    # A fresh machine restores the run into another working folder: the same tree, at
    # another absolute path. Its first pass committed a copy of the restored snapshot.
    a = make_tree(tmp_path / "machine-a" / "ckpt", {"model.pt": os.urandom(3 << 20), "logs/events": "e", "latest": "->model.pt"})
    vault = liferaft.Vault(local_vault)
    first = vault.snapshot([a], run="r")
    b = tmp_path / "machine-b" / "ckpt"
    vault.restore(run="r", targets={"ckpt": b})
    again = vault.snapshot([b], run="r", skip_unchanged=True)
    assert again.unchanged and again.id == first.id
    assert [s.id for s in vault.snapshots(run="r")] == [first.id]
    # The first real change is committed, and records the new place.
    (b / "logs" / "events").write_text("e2")
    changed = vault.snapshot([b], run="r", skip_unchanged=True)
    assert not changed.unchanged and changed.roots[0]["source"] == str(b)


def test_secrets_left_out_by_default(vault_url: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "proj", {"model.pt": "w", ".netrc": "machine x password y", "kaggle.json": "{}", "keys/id_rsa": "PRIVATE"})
    vault = liferaft.Vault(vault_url)
    snap = vault.snapshot([src], run="r")
    assert snap.stats["secrets_excluded"] == 3
    vault.restore(run="r", to=tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back" / "proj").rglob("*") if p.is_file()) == ["model.pt"]
    snap = vault.snapshot([src], run="r", include_secrets=True)
    assert snap.stats["secrets_excluded"] == 0


@given(
    st.lists(
        st.sampled_from([".env", ".pem", "token", "kaggle", ".json", "-sa-key", "service-account", "\n", "x", ".", "*", "["]), max_size=6
    )
)
@settings(max_examples=300, deadline=None)
def test_secret_names_match_exactly_what_the_shell_patterns_say(parts: list[str]) -> None:
    # The patterns are matched as one compiled expression; it must agree with fnmatch
    # pattern by pattern, newline and bracket characters included.
    import fnmatch

    from liferaft.vault.snapshot import SECRET_PATTERNS, is_secret

    name = "".join(parts)
    assert is_secret(name) == any(fnmatch.fnmatchcase(name, p) for p in SECRET_PATTERNS)


def test_secret_names_by_example() -> None:
    from liferaft.vault.snapshot import is_secret

    for plain in (".netrc", "x.pem", ".env.local", "my.token", "service-account-prod.json", "a-sa-key.json"):
        assert is_secret(plain)
    for other in ("tokens", "x.pem.bak", "kaggle.json\n", "env", "model.pt"):
        assert not is_secret(other)
    assert not is_secret(".netrc", ())  # no patterns: nothing is a secret (an empty expression would match all)
    assert is_secret("x.key", ["*.key"]) and not is_secret("x.pem", ["*.key"])


def test_credentials_in_json_files_are_left_out_whatever_their_name(vault_url: str, tmp_path: Path) -> None:
    # Keys keep the name the console gave them: my-project-1234-0123abcd.json for a GCP
    # service account, client_secret_....json or credentials.json for OAuth clients.
    sa = b'{\n  "type": "service_account",\n  "project_id": "p",\n  "private_key_id": "ab12",\n  "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIE\\n"\n}\n'
    oauth = b'{"installed":{"client_id":"x.apps.googleusercontent.com","client_secret":"GOCSPX-abc"}}'
    adc = b'{"client_id": "x", "client_secret": "y", "refresh_token": "1//0g", "type": "authorized_user"}'
    plain = b'{"model": "bert", "private_key_path": "~/.keys/k.pem", "lr": 0.001}'
    src = make_tree(tmp_path / "proj", {"my-project-1234-0123abcdef.json": sa, "sub/credentials.json": oauth, "adc-copy.json": adc})
    (src / "config.json").write_bytes(plain)
    (src / "notes.txt").write_bytes(b"# " + sa)  # judged by name only: not JSON by its name
    vault = liferaft.Vault(vault_url)
    snap = vault.snapshot([src], run="r")
    assert snap.stats["secrets_excluded"] == 3 and snap.stats["files"] == 2
    index = vault.repository().index(reload=True)
    for secret in (sa, oauth, adc):
        assert fmt.digest(secret) not in index  # not even stored unreferenced
    vault.restore(run="r", to=tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back" / "proj").rglob("*") if p.is_file()) == ["config.json", "notes.txt"]
    snap = vault.snapshot([src], run="r", include_secrets=True)
    assert snap.stats["secrets_excluded"] == 0 and snap.stats["files"] == 5


def test_a_credential_file_left_out_keeps_an_idle_pass_idle(local_vault: str, tmp_path: Path) -> None:
    # A service-account key beside the checkpoints (it is where the notebook put it) was
    # judged again on every pass: read, a session lock written and deleted, each interval.
    sa = b'{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIE\\n"}'
    src = make_tree(tmp_path / "ckpt", {"model.pt": os.urandom(1 << 20), "sa-key-copy.json": sa})
    time.sleep(1.1)  # older than the racily-clean second
    vault = liferaft.Vault(local_vault)
    first = vault.snapshot([src], run="r")
    assert first.stats["secrets_excluded"] == 1
    mtimes = {p: p.stat().st_mtime_ns for p in Path(local_vault).rglob("*")}
    same = vault.snapshot([src], run="r", skip_unchanged=True)
    assert same.unchanged and same.id == first.id
    assert {p: p.stat().st_mtime_ns for p in Path(local_vault).rglob("*")} == mtimes  # no lock written
    (src / "model.pt").write_bytes(os.urandom(1 << 20))
    second = vault.snapshot([src], run="r", skip_unchanged=True)
    assert second.stats["files_read"] == 1 and second.stats["secrets_excluded"] == 1  # the key: not read again
    # the key file replaced by plain JSON (same size, one second on) is read, and kept
    time.sleep(1.1)
    plain = b'{"type": "service_account", "private_kez": "-----BEGIN PRIVATE KEY-----\\nMIIE\\n"}'
    assert len(plain) == len(sa)
    (src / "sa-key-copy.json").write_bytes(plain)
    third = vault.snapshot([src], run="r", skip_unchanged=True)
    assert not third.unchanged and third.stats["secrets_excluded"] == 0 and third.stats["files"] == 2
    vault.restore(third.id, to=tmp_path / "back")
    assert (tmp_path / "back" / "ckpt" / "sa-key-copy.json").read_bytes() == plain


def _bytes_state(root: bytes) -> dict[bytes, tuple]:
    """Like tree_state, by the names' own bytes."""
    out: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), os.stat(p).st_mtime_ns)
    return out


@pytest.mark.skipif(os.name != "posix" or sys.platform == "darwin", reason="file names are bytes only on Linux and the BSDs")
def test_file_names_that_are_not_utf8_round_trip_byte_for_byte(vault_url: str, tmp_path: Path) -> None:
    # Latin-1 names from an old archive, a Windows share, a badly unpacked zip: one such
    # name used to fail every snapshot (so a whole `liferaft run` went unprotected).
    root = os.fsencode(tmp_path) + b"/caf\xe9"  # the root folder's own name too
    os.makedirs(root + b"/d\xff\xfe")
    for name, data in ((b"/latin1-\xe9.txt", b"one"), (b"/d\xff\xfe/f", b"two"), (b"/ok-\xc3\xa9-\xe9", b"three")):
        with open(root + name, "wb") as f:
            f.write(data)
    os.symlink(b"d\xff\xfe/f", root + b"/link-\xfa")
    before = _bytes_state(root)
    vault = liferaft.Vault(vault_url)
    snap = vault.snapshot([os.fsdecode(root)], run="r")
    assert snap.stats["files"] == 3
    again = vault.snapshot([os.fsdecode(root)], run="r")
    assert again.unchanged or again.stats["added_blobs"] == 0  # and dedups like any other
    vault.restore(run="r", to=tmp_path / "back")
    back = os.fsencode(tmp_path) + b"/back/caf\xe9"
    assert _bytes_state(back) == before


def test_vault_inside_snapshotted_folder_is_skipped(tmp_path: Path) -> None:
    work = make_tree(tmp_path / "work", {"a": "1"})
    vault = liferaft.Vault(work / ".vault")
    vault.snapshot([work], run="r")
    snap = vault.snapshot([work], run="r")
    assert snap.stats["files"] == 1


def test_two_roots_with_the_same_name(vault_url: str, tmp_path: Path) -> None:
    a = make_tree(tmp_path / "x" / "ckpt", {"f": "x"})
    b = make_tree(tmp_path / "y" / "ckpt", {"f": "y"})
    vault = liferaft.Vault(vault_url)
    snap = vault.snapshot([a, b], run="r")
    assert [r["name"] for r in snap.roots] == ["ckpt", "ckpt-2"]
    vault.restore(run="r", targets={"ckpt": tmp_path / "A", "ckpt-2": tmp_path / "B"})
    assert (tmp_path / "A" / "f").read_text() == "x" and (tmp_path / "B" / "f").read_text() == "y"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"metrics": {"loss": float("nan")}}, "finite"),
        ({"metrics": {"loss": "low"}}, "finite"),
        ({"run": ""}, "run name"),
        ({"step": "ten"}, "step"),
    ],
)
def test_bad_snapshot_arguments_are_refused_before_writing(tmp_path: Path, kwargs: dict, needle: str) -> None:
    vault = liferaft.Vault(tmp_path / "vault")
    src = make_tree(tmp_path / "d", {"f": "1"})
    with pytest.raises(LiferaftError, match=needle):
        vault.snapshot([src], **{"run": "r", **kwargs})
    assert vault.snapshots(missing_ok=True) == []


@pytest.mark.skipif(os.name != "posix" or sys.platform == "darwin", reason="file names are bytes only on Linux and the BSDs")
def test_the_cli_shows_names_that_are_not_utf8_without_crashing(tmp_path: Path) -> None:
    from conftest import cli

    root = os.fsencode(tmp_path) + b"/run-\xe9"
    os.makedirs(root + b"/sub")
    with open(root + b"/sub/fifo-\xfa.bin", "wb") as f:
        f.write(b"x")
    os.mkfifo(root + b"/sub/pipe-\xfb")  # skipped, with a note naming it
    vault = str(tmp_path / "vault")
    strict = {"PYTHONIOENCODING": "utf-8:strict", "PYTHONUTF8": "0"}  # a terminal that refuses what is not UTF-8
    r = cli("--vault", vault, "snapshot", os.fsdecode(root), "--run", "r", env=strict)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "pipe-\\udcfb" in r.stdout
    r = cli("--vault", vault, "--json", "snapshots", env=strict)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["paths"] == ["run-\udce9"]  # the escape reads back as the name
    r = cli("--vault", vault, "restore", "--run", "r", "--to", str(tmp_path / "back"), env=strict)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    with open(os.fsencode(tmp_path) + b"/back/run-\xe9/sub/fifo-\xfa.bin", "rb") as f:
        assert f.read() == b"x"


@pytest.mark.parametrize(
    ("paths", "needle"),
    [
        (["a", "a"], "a is given twice"),
        (["a", "./a"], "./a is given twice"),
        (["a", "a/b"], "a/b is inside a, which is snapshotted too"),
        (["a/b", "a"], "a/b is inside a, which is snapshotted too"),
        (["/"], "refusing to snapshot / (the whole file system)"),
    ],
)
def test_paths_that_would_store_the_same_files_twice_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, paths: list[str], needle: str
) -> None:
    # They used to be stored as roots a and a-2, and restored twice.
    make_tree(tmp_path / "a", {"b/f": "1"})
    monkeypatch.chdir(tmp_path)
    vault = liferaft.Vault(tmp_path / "vault")
    with pytest.raises(LiferaftError, match=re.escape(needle)):
        vault.snapshot(paths, run="r")
    assert vault.snapshots() == []


def test_missing_path_is_one_clear_error(tmp_path: Path) -> None:
    vault = liferaft.Vault(tmp_path / "vault")
    with pytest.raises(LiferaftError, match="does not exist"):
        vault.snapshot([tmp_path / "nope"], run="r")


def test_restore_refuses_to_replace_a_folder_with_a_file(vault_url: str, tmp_path: Path) -> None:
    work = make_tree(tmp_path / "w", {"thing": "file"})
    vault = liferaft.Vault(vault_url)
    vault.snapshot([work], run="r")
    (work / "thing").unlink()
    make_tree(work / "thing", {"precious": "data"})
    with pytest.raises(LiferaftError, match="folder where the snapshot has a file"):
        vault.restore(run="r")
    assert (work / "thing" / "precious").read_text() == "data"
    assert not [p for p in work.rglob(".liferaft-*")]


@pytest.mark.parametrize("what", ["folder", "file", "below"])
def test_restore_in_place_refuses_a_dangling_link_in_the_way(local_vault: str, tmp_path: Path, what: str) -> None:
    # checkpoints -> /content/drive/... before Drive is mounted: replacing the link (a file)
    # or failing on it with "File exists" (a folder) were both wrong.
    work = tmp_path / "w"
    make_tree(work / "nest" / "ckpt", {"state": "1"})
    (work / "model.pt").write_text("weights")
    vault = liferaft.Vault(local_vault)
    vault.snapshot([work / "nest" / "ckpt", work / "model.pt"], run="r")
    shutil.rmtree(work / "nest" / "ckpt")
    (work / "model.pt").unlink()
    gone = tmp_path / "drive" / "MyDrive"
    link, root = {"folder": (work / "nest" / "ckpt", "ckpt"), "file": (work / "model.pt", "model.pt"), "below": (work / "nest", "ckpt")}[
        what
    ]
    if what == "below":
        (work / "nest").rmdir()
    link.symlink_to(gone / link.name)
    with pytest.raises(RestoreRefused, match=rf"{link} is a link to {gone / link.name}, which does not exist; mount or create"):
        vault.restore(run="r", only=[root])
    assert link.is_symlink() and not link.exists()
    assert not gone.exists()


def test_a_folder_this_restore_makes_in_a_files_place_is_refused_before_anything_is_shown(local_vault: str, tmp_path: Path) -> None:
    # Two saved paths restored to overlapping places: folder "a" holds sub/, and file "b"
    # is to go to a/sub. Every file's place is checked, even in folders this restore just
    # made, so it refuses before a single file appears.
    a = make_tree(tmp_path / "src" / "a", {"sub/x": "1", **{f"f{i:04d}": str(i) for i in range(1200)}})
    b = tmp_path / "src" / "b"
    b.write_text("file")
    vault = liferaft.Vault(local_vault)
    snap = vault.snapshot([a, b], run="r")
    out = tmp_path / "out"
    with pytest.raises(LiferaftError, match="sub is a folder where the snapshot has a file"):
        vault.restore(snap.id, targets={"a": out / "p", "b": out / "p" / "sub"})
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))[:5]


def test_a_rename_that_fails_names_its_target_stops_the_others_and_leaves_no_temp_files(
    local_vault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Renames run in threads once everything is verified. One that fails (here EXDEV,
    # injected: a target folder that became a mount point) stops the rest soon, the error
    # names the file, not its temp name, and no temp file is left behind.
    import errno

    from liferaft.vault import restore as restore_mod

    src = make_tree(tmp_path / "d", {f"f{i:05d}": str(i) for i in range(5000)})
    vault = liferaft.Vault(local_vault)
    snap = vault.snapshot([src], run="r")
    real = os.replace

    def replace(a: str, b: str) -> None:
        if b.endswith("f01500"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), a, None, b)
        real(a, b)

    monkeypatch.setattr(restore_mod.os, "replace", replace)
    out = tmp_path / "out"
    with pytest.raises(LiferaftError, match=r"restore failed writing .*/f01500: "):
        vault.restore(snap.id, to=out)
    shown = sorted(p.name for p in (out / "d").iterdir())
    assert not [n for n in shown if n.startswith(".liferaft-")], "temp files left"
    assert "f01500" not in shown and len(shown) < 5000
    assert len(shown) <= 1500 + 2 * restore_mod._SHOW_BATCH, len(shown)  # the batches in flight, no more


def test_default_vault_when_nothing_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    vault = liferaft.Vault()
    assert vault.choice.is_default
    assert vault.snapshots() == []  # an unwritten default vault is simply empty
    vault.snapshot([make_tree(tmp_path / "d", {"f": "1"})], run="r")
    assert Path(vault.url).joinpath("config.json").is_file()
    assert str(tmp_path) not in vault.url  # it lives in the user's data dir, not here


def test_racily_clean_file_is_read_again(local_vault: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {"ckpt": b"A" * 1000})
    vault = liferaft.Vault(local_vault)
    vault.snapshot([src], run="r")
    st = os.stat(src / "ckpt")
    # Same size, same mtime, new bytes: only a re-read can notice.
    (src / "ckpt").write_bytes(b"B" * 1000)
    os.utime(src / "ckpt", ns=(st.st_atime_ns, st.st_mtime_ns))
    vault.snapshot([src], run="r")
    vault.restore(run="r", to=tmp_path / "back")
    assert (tmp_path / "back" / "d" / "ckpt").read_bytes() == b"B" * 1000


def test_run_level_restore_and_forget_leave_checkpoints_alone(vault_url: str, tmp_path: Path) -> None:
    vault = liferaft.Vault(vault_url)
    work = make_tree(tmp_path / "w" / "runs", {"events": "e1"})
    vault.snapshot([work], run="r", step=1)
    ckpt = make_tree(tmp_path / "c" / "step-5", {"model.safetensors": "weights"})
    vault.snapshot([ckpt], run="r", step=5, tags={"liferaft.kind": "checkpoint"})
    result = vault.restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.step == 1  # not the newer checkpoint
    (work / "events").write_text("e2")
    vault.snapshot([work], run="r", step=2)
    gone, _ = vault.forget(run="r", keep_last=1)
    assert [s.step for s in gone] == [1]
    assert sorted(s.step for s in vault.snapshots(run="r")) == [2, 5]


def test_file_replaced_between_walk_and_read_is_taken_in_its_new_version(
    local_vault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from liferaft.vault import snapshot as snapshot_module

    src = make_tree(tmp_path / "d", {"ckpt.pt": b"old" * 1000})
    real_walk = snapshot_module._walk

    def walk_then_replace(*args, **kwargs):  # the checkpoint is saved (temp + rename) right after the walk
        kind = real_walk(*args, **kwargs)
        (src / "ckpt.tmp").write_bytes(b"new!" * 2000)
        os.replace(src / "ckpt.tmp", src / "ckpt.pt")
        return kind

    monkeypatch.setattr(snapshot_module, "_walk", walk_then_replace)
    vault = liferaft.Vault(local_vault)
    snap = vault.snapshot([src], run="r")
    assert snap.stats["changed_during_read"] == []
    entry = next(e for e in vault.tree(snap) if e.path == "d/ckpt.pt")
    assert entry.size == 8000
    vault.restore(snap.id, to=tmp_path / "back")
    assert (tmp_path / "back" / "d" / "ckpt.pt").read_bytes() == b"new!" * 2000


def test_restore_only_some_paths(vault_url: str, tmp_path: Path) -> None:
    a = make_tree(tmp_path / "w" / "checkpoints", {"c": "1"})
    b = make_tree(tmp_path / "w" / "runs", {"r": "2"})
    vault = liferaft.Vault(vault_url)
    vault.snapshot([a, b], run="r")
    vault.restore(run="r", to=tmp_path / "back", only=["runs"])
    assert sorted(os.listdir(tmp_path / "back")) == ["runs"]
    with pytest.raises(LiferaftError, match="no path named 'nope'"):
        vault.restore(run="r", to=tmp_path / "x", only=["nope"])


def test_idle_pass_writes_nothing(local_vault: str, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {"a": os.urandom(2 << 20), "b": "x"})
    time.sleep(1.1)
    vault = liferaft.Vault(local_vault)
    first = vault.snapshot([src], run="r")
    before = sorted(p.relative_to(local_vault) for p in Path(local_vault).rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in Path(local_vault).rglob("*")}
    same = vault.snapshot([src], run="r", skip_unchanged=True)
    assert same.unchanged and same.id == first.id
    assert sorted(p.relative_to(local_vault) for p in Path(local_vault).rglob("*")) == before
    assert {p: p.stat().st_mtime_ns for p in Path(local_vault).rglob("*")} == mtimes  # no lock written either
    (src / "b").write_text("y")
    changed = vault.snapshot([src], run="r", skip_unchanged=True)
    assert not changed.unchanged and changed.id != first.id


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped, so not even a zombie)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_restore_clears_only_temps_that_killed_restores_left(tmp_path: Path) -> None:
    from liferaft.platform import pid_scope
    from liferaft.vault.restore import is_restore_temp

    scope = pid_scope()
    assert scope, "this test needs /proc (Linux)"
    work = make_tree(tmp_path / "w", {"model.pt": os.urandom(50_000), "logs/events": "e" * 100})
    vault = liferaft.Vault(tmp_path / "vault")
    vault.snapshot([work], run="r")
    dead, other = _dead_pid(), "0badf00d" if scope != "0badf00d" else "0badf00e"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [work / f".liferaft-{scope}-{dead}-{'a' * 12}.tmp", work / "logs" / f".liferaft-{scope}-{dead}-{'b' * 12}.tmp"]
        kept = [
            work / f".liferaft-{scope}-{sleeper.pid}-{'c' * 12}.tmp",  # a restore still running
            work / f".liferaft-{other}-{dead}-{'d' * 12}.tmp",  # another machine's or container's
            work / f".liferaft-{'e' * 12}.tmp",  # unstamped (0.1): whose, nobody knows
            work / ".liferaft-notes.tmp",  # not a name liferaft makes
        ]
        for p in stale + kept:
            p.write_bytes(b"half a file")
        os.symlink("model.pt", work / f".liferaft-{scope}-{dead}-{'f' * 12}.tmp")  # a link's temp
        stale.append(work / f".liferaft-{scope}-{dead}-{'f' * 12}.tmp")
        assert all(is_restore_temp(p.name) for p in stale + kept[:3]) and not is_restore_temp(kept[3].name)

        # A snapshot never takes a restore's temp files, whoever left them.
        snap = vault.snapshot([work], run="r2")
        names = {e.path.rsplit("/", 1)[-1] for e in vault.tree(snap)}
        assert ".liferaft-notes.tmp" in names and not any(is_restore_temp(n) for n in names)

        result = vault.restore(run="r")
        assert result is not None and result.stale_temps_removed == len(stale)
        assert not any(os.path.lexists(p) for p in stale)
        assert all(p.read_bytes() == b"half a file" for p in kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_rerun_after_a_killed_restore_leaves_no_temp_files(tmp_path: Path) -> None:
    """SIGKILL a real ``liferaft restore`` once its temp files exist; the rerun clears them."""
    rng = random.Random(5)
    src = make_tree(tmp_path / "src", {f"d{i % 8}/f{i:03d}.bin": rng.randbytes(200_000) for i in range(300)})
    vault = tmp_path / "vault"
    liferaft.Vault(vault).snapshot([src], run="r")
    target = tmp_path / "target"
    cmd = [sys.executable, "-m", "liferaft", "--vault", str(vault), "restore", "--run", "r", "--to", str(target)]
    left: list[Path] = []
    for _attempt in range(5):  # the kill must land between the first temp and the last rename
        shutil.rmtree(target, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if any(target.rglob(".liferaft-*.tmp")):
                proc.kill()
                break
            time.sleep(0.001)
        proc.wait()
        left = list(target.rglob(".liferaft-*.tmp")) if target.exists() else []
        if proc.returncode == -signal.SIGKILL and left:
            break
    assert left, "no restore was killed while it had temp files"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"removed {plural(len(left), 'temp file')} an interrupted restore had left" in out.stdout
    assert not list(target.rglob(".liferaft-*"))
    assert tree_state(target / "src") == tree_state(src)


def test_refusing_to_replace_newer_work_judges_each_file_by_its_own_version(tmp_path: Path) -> None:
    """A checkpoint rewritten while a snapshot ran is older than the snapshot's commit, yet
    newer than the version the snapshot holds: it is work the snapshot does not have."""
    from liferaft.errors import RestoreRefused
    from liferaft.platform import pid_scope

    t0 = 1_600_000_000 * 10**9
    work = make_tree(tmp_path / "w", {"ckpt.pt": "step 100", "old.txt": "v1", "sub/a": "a"})
    for name in ("ckpt.pt", "old.txt"):
        os.utime(work / name, ns=(t0, t0))
    vault = liferaft.Vault(tmp_path / "vault")
    snap = vault.snapshot([work], run="r")
    (work / "ckpt.pt").write_text("step 200")  # rewritten during the snapshot, so to speak:
    os.utime(work / "ckpt.pt", ns=(t0 + 10**9, t0 + 10**9))  # long before the commit time
    (work / "old.txt").write_text("v0")
    os.utime(work / "old.txt", ns=(t0 - 10**9, t0 - 10**9))  # older than the snapshot's version
    stale = work / "sub" / f".liferaft-{pid_scope()}-{_dead_pid()}-{'a' * 12}.tmp"
    stale.write_bytes(b"left by a killed restore")
    before = tree_state(work)

    with pytest.raises(RestoreRefused, match=r"1 file\(s\) in the way are newer .*ckpt\.pt"):
        vault.restore(snap.id, replace_newer=False)
    assert tree_state(work) == before  # refused: nothing written, nothing removed
    result = vault.restore(snap.id, replace_newer=True)
    assert result is not None and result.stale_temps_removed == 1
    assert (work / "ckpt.pt").read_text() == "step 100" and (work / "old.txt").read_text() == "v1"


def test_a_crafted_temp_name_or_lock_pid_is_no_traceback(tmp_path: Path) -> None:
    from liferaft.platform import pid_alive, pid_scope
    from liferaft.vault.repository import lock_holder_gone

    assert pid_alive(9_999_999_999) and pid_alive(2**70)  # cannot be told: alive
    assert not lock_holder_gone({"scope": pid_scope(), "pid": 2**70})
    work = make_tree(tmp_path / "w", {"f": "1"})
    vault = liferaft.Vault(tmp_path / "vault")
    vault.snapshot([work], run="r")
    odd = work / f".liferaft-{pid_scope()}-9999999999-{'a' * 12}.tmp"
    odd.write_bytes(b"?")
    result = vault.restore(run="r")
    assert result is not None and result.stale_temps_removed == 0 and odd.exists()


def test_a_folder_renamed_while_walked_is_a_change_not_a_skipped_path(
    local_vault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint written as step-100.tmp/ and renamed to step-100/ between the listing of
    # its parent and the walk into it: "No such file or directory" was reported as a path
    # that could not be read ("make it readable"), and the pass was not retried soon.
    from liferaft.vault import snapshot as snapshot_mod

    work = make_tree(tmp_path / "ckpt", {"step-100.tmp/w.bin": "weights", "keep.txt": "k"})
    real_scandir = os.scandir

    def scandir_then_rename(path: Any) -> Any:
        if str(path).endswith("step-100.tmp"):
            os.rename(path, work / "step-100")  # the writer's rename lands just now (a real ENOENT follows)
        return real_scandir(path)

    monkeypatch.setattr(snapshot_mod.os, "scandir", scandir_then_rename)
    snap = liferaft.Vault(local_vault).snapshot([work], run="r")
    assert snap.stats["skipped"] == [], snap.stats
    assert snap.stats["changed_during_read"] == ["ckpt/step-100.tmp"], snap.stats
