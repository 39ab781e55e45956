"""The background syncer against a real local vault: what it commits, retries and says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import liferaft
from conftest import make_tree, popen_where_file_modes_hold
from liferaft.keep.keeper import resolve_keeps
from liferaft.keep.syncer import Syncer, error_kind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/mem is Linux's")
def test_a_file_failing_with_an_io_error_is_not_busy_and_commits_nothing_again(local_vault: str, tmp_path: Path) -> None:
    # A file on a flaky Drive mount that fails with EIO was taken for one being written: a
    # commit of the same tree on every pass, and quick retries (24 commits in 10 s).
    # /proc/self/mem is a regular file whose read at offset 0 fails with a real EIO.
    make_tree(tmp_path / "ckpt", {"model.pt": "w"})
    keeps = resolve_keeps(["ckpt", "/proc/self/mem"], cwd=tmp_path)
    warnings: list[str] = []
    syncer = Syncer(liferaft.Vault(local_vault), "r", keeps, 3600, on_error=warnings.append, low_priority=False)
    syncer.start()
    try:
        passes = [syncer.sync(timeout=30) for _ in range(3)]
    finally:
        syncer.stop(None, timeout=30)
    assert all(p is not None and p.error is None for p in passes), passes
    assert [p.committed for p in passes if p] == [True, False, False]
    assert not any(p.busy for p in passes if p)  # no quick retry
    snap = passes[-1].snapshot if passes[-1] else None
    assert snap is not None
    assert snap.stats["skipped"] == ["/proc/self/mem: Input/output error"] and snap.stats["changed_during_read"] == []
    # said once a session, not on every pass
    assert warnings == [
        "1 path could not be taken into the snapshots, e.g. /proc/self/mem: Input/output error; "
        "make it readable (permissions, the mount it is on) to keep it"
    ]


def test_a_file_written_during_an_otherwise_idle_pass_commits_nothing_and_is_retried(local_vault: str, tmp_path: Path) -> None:
    # A log or checkpoint being appended to: its previous version goes in, which leaves the
    # tree as it was. That pass used to commit a copy of the previous snapshot.
    src = make_tree(tmp_path / "d", {"keep": "k", "growing": os.urandom(16 << 20)})
    keeps = resolve_keeps(["d"], cwd=tmp_path)
    syncer = Syncer(liferaft.Vault(local_vault), "r", keeps, 3600, low_priority=False)
    syncer.start()
    stop = threading.Event()
    growing = src / "growing"

    def appender() -> None:
        with open(growing, "ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()

    try:
        first = syncer.sync(timeout=30)
        t = threading.Thread(target=appender)
        t.start()
        try:
            time.sleep(0.02)
            busy = syncer.sync(timeout=30)
        finally:
            stop.set()
            t.join()
    finally:
        syncer.stop(None, timeout=30)
    assert first is not None and first.snapshot is not None and busy is not None and busy.snapshot is not None
    assert busy.snapshot.stats["changed_during_read"] == ["d/growing"]
    assert not busy.committed and busy.snapshot.id == first.snapshot.id  # the same tree: nothing committed
    assert busy.busy  # ... and the loop tries again soon


def test_the_same_outage_warns_once_and_its_end_is_said(tmp_path: Path) -> None:
    # Every pass of one outage failed with another session id in its text, and each
    # printed the warning again; when the vault came back nothing said so.
    liferaft.Vault(tmp_path / "vault").repository(create=True)
    make_tree(tmp_path / "ckpt", {"model.pt": "w"})
    locks = tmp_path / "vault" / "locks"
    locks.mkdir()
    os.chmod(locks, 0o555)  # no session lock can be written: every pass fails
    script = """
import json, sys
from pathlib import Path
import liferaft
from liferaft.keep.keeper import resolve_keeps
from liferaft.keep.syncer import Syncer

base = Path(sys.argv[1])
warnings, notices = [], []
syncer = Syncer(liferaft.Vault(base / "vault"), "r", resolve_keeps(["ckpt"], cwd=base), 3600,
                on_error=warnings.append, on_notice=notices.append, low_priority=False)
syncer.start()
errors = []
for step in range(3):
    (base / "ckpt" / "step.txt").write_text(str(step))
    errors.append(syncer.sync(timeout=30).error)
print(json.dumps(errors), flush=True)
sys.stdin.readline()  # the vault is writable again
results = [syncer.sync(timeout=30) for _ in range(2)]
syncer.stop(None, timeout=30)
print(json.dumps({"warnings": warnings, "notices": notices, "committed": [r.committed for r in results]}))
"""
    child = popen_where_file_modes_hold([sys.executable, "-c", script, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        errors = json.loads(child.stdout.readline())
        assert len(set(errors)) == 3 and "Permission denied" in errors[0]  # three texts, one failure
        os.chmod(locks, 0o777)
        child.stdin.write("go\n")
        child.stdin.flush()
        out = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("snapshot (sync) failed: ")
    assert out["committed"] == [True, False]
    assert len(out["notices"]) == 1
    assert re.fullmatch(r"snapshots work again after 3 failed attempts in \S+: snapshot [0-9a-f]{12} holds 2 files", out["notices"][0])


def test_error_kind_drops_ids_counts_and_times() -> None:
    one = error_kind(OSError("locks/session-8261083886fa41e184f5d223135ccb77.json: still failing after 3 tries in 12s"))
    two = error_kind(OSError("locks/session-4ec4e6fb32f244ae878b9be8ed6a1ddb.json: still failing after 5 tries in 31s"))
    assert one == two
    assert error_kind(OSError("x")) != error_kind(ValueError("x"))


def test_credential_files_left_out_are_noted_once_a_session_and_kept_when_asked(local_vault: str, tmp_path: Path) -> None:
    # `liferaft snapshot` said so; `liferaft run` and attach() dropped them silently.
    src = make_tree(tmp_path / "ckpt", {"model.pt": "w", "kaggle.json": '{"key": "k"}', ".env": "TOKEN=x"})
    keeps = resolve_keeps(["ckpt"], cwd=tmp_path)
    vault = liferaft.Vault(local_vault)

    def session(**kw: bool) -> list[str]:
        notes: list[str] = []
        syncer = Syncer(vault, "r", keeps, 3600, on_notice=notes.append, low_priority=False, **kw)
        syncer.start()
        try:
            for step in range(2):
                (src / "model.pt").write_text(f"w{step}")
                assert syncer.sync(timeout=30) is not None
            (src / "model.pt").write_text("w1")  # then an idle pass
            assert syncer.sync(timeout=30) is not None
        finally:
            syncer.stop(None, timeout=30)
        return notes

    note = (
        "note: 2 credential files left out of the snapshots (ckpt/.env, ckpt/kaggle.json); "
        "pass --include-secrets (attach(include_secrets=True)) to keep them"
    )
    assert session() == [note]
    # A new session whose first pass commits nothing (the vault already holds that tree) says it too.
    notes: list[str] = []
    syncer = Syncer(vault, "r", keeps, 3600, on_notice=notes.append, low_priority=False)
    syncer.start()
    idle = syncer.sync(timeout=30)
    syncer.stop(None, timeout=30)
    assert idle is not None and not idle.committed and notes == [note]

    assert session(include_secrets=True) == []
    vault.restore(run="r", to=tmp_path / "back")
    assert sorted(os.listdir(tmp_path / "back" / "ckpt")) == [".env", "kaggle.json", "model.pt"]
