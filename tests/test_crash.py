"""Guarantee 1, atomic commit, proved by SIGKILL: real ``liferaft`` processes killed at random.

The campaign lives in ``stress/crash_campaign.py`` (run it there with ``--count 200``);
these tests run a short one. Kills are aimed two ways: after a random delay from the
moment the writer registers its session, and the instant the parent sees a chosen
point of the commit (a pack/index/manifest temp file, the pack, the index fragment,
the manifest, the session lock going away) plus a random slack of up to 1.5 ms.
After every kill the vault must verify with every byte read, keep every committed
snapshot, show at most the one snapshot being written, and restore (without
fallback) to the exact tree of the step it was taken at; prune must then remove all
the garbage. ``LIFERAFT_CRASH_SEED`` replays a kill plan (kill timing still varies).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest

from conftest import ROOT, make_tree, tree_state
from liferaft.api import Vault
from liferaft.vault import format as fmt
from liferaft.vault import maintenance

SEED = int(os.environ.get("LIFERAFT_CRASH_SEED", "1861"))


def _load_campaign() -> ModuleType:
    path = ROOT / "stress" / "crash_campaign.py"
    spec = importlib.util.spec_from_file_location("crash_campaign", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_campaign"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


campaign = _load_campaign()


def _explain(report: campaign.Report) -> str:
    return f"\n{report.summary()}\nreplay the kill plan with LIFERAFT_CRASH_SEED={report.seed}"


@pytest.mark.slow
def test_snapshot_killed_anywhere_leaves_the_last_commit_and_prunable_garbage(tmp_path: Path) -> None:
    """24 snapshot attempts, most killed at random; every invariant checked after each."""
    report = campaign.campaign(tmp_path, seed=SEED, count=24, restore_count=0, prune_every=12, prune_kills=True)
    print(report.summary())
    assert not report.violations, _explain(report)
    # The campaign must really have cut writers short, not just watched them finish.
    assert report.kills >= 12, _explain(report)
    assert report.committed >= 3, _explain(report)
    before_commit = report.stages["packs written, no index"] + report.stages["index written, no manifest"]
    assert before_commit >= 1, _explain(report)
    # Prune ran with garbage to remove and left none (checked inside, per prune).
    assert len(report.prunes) == 2, _explain(report)
    assert any(p.get("before_orphan_packs") or p.get("before_temp_files") for p in report.prunes), _explain(report)
    assert report.verify_runs >= 24 and report.restores_checked >= 24, _explain(report)


@pytest.mark.slow
def test_restore_killed_anywhere_leaves_only_whole_files_and_reruns_exactly(tmp_path: Path) -> None:
    """``liferaft restore --to DIR`` killed into fresh, older and half-restored targets."""
    report = campaign.campaign(tmp_path, seed=SEED, count=0, restore_count=8, restore_files=200)
    print(report.summary())
    assert not report.violations, _explain(report)
    assert report.restore_kills >= 4, _explain(report)
    assert report.restore_reruns >= 1, _explain(report)


def test_prune_killed_mid_repack_leaves_no_permanent_duplicate(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "work", {"keep.bin": os.urandom(100_000), "junk.bin": os.urandom(900_000)})
    vault = Vault(str(tmp_path / "vault"))
    vault.snapshot([src], run="r", step=1)
    (src / "junk.bin").unlink()
    vault.snapshot([src], run="r", step=2)
    vault.forget(run="r", keep_last=1)  # the first pack is now 10% live: prune repacks it
    repo = Vault(str(tmp_path / "vault")).repository()
    keep = bytes.fromhex(next(e for e in repo.read_tree(repo.snapshots()[-1]) if e.path == "work/keep.bin").blobs[0])
    # Prune's step 5 up to its first delete: the live blob copied into a new pack and an
    # index fragment naming it. SIGKILL there (stress/crash_campaign.py's prune kills land
    # there) leaves this state: the old fragment and pack are still in place.
    pack_id, codec, offset, length, raw = repo.index()[keep]
    repacker = maintenance._Repacker(repo)
    repacker.add(keep, codec, repo.read_pack_range(pack_id, offset, length), raw)
    data = fmt.build_index(repacker.finish(), secrets.token_hex(8))
    repo.backend.put(f"index/{fmt.hexdigest(data)}", data)

    maintenance.prune(Vault(str(tmp_path / "vault")).repository(), wait=0, temp_age=0)
    maintenance.prune(Vault(str(tmp_path / "vault")).repository(), wait=0, temp_age=0)

    repo = Vault(str(tmp_path / "vault")).repository()
    assert Vault(str(tmp_path / "vault")).verify(read_data=True).ok
    holders = defaultdict(set)
    for frag in repo.fragments().values():
        for bid, entry in frag.items():
            holders[bid].add(entry[0])
    assert len(holders[keep]) == 1, f"keep.bin's blob is stored in {len(holders[keep])} packs after prune"
    restored = Vault(str(tmp_path / "vault")).restore(run="r", to=tmp_path / "out")
    assert restored is not None
    assert tree_state(tmp_path / "out" / "work") == tree_state(src)


def test_interrupted_snapshot_leaves_nothing_for_prune(tmp_path: Path) -> None:
    # Ctrl-C (a real SIGINT to a real `liferaft snapshot`) once packs are on disk: they
    # are referenced by nothing and known to no other writer, so they are deleted, not
    # left for the next prune (an aborted snapshot of / once left 26 GiB).
    import signal
    import subprocess
    import time

    work = tmp_path / "work"
    work.mkdir()
    for i in range(6):
        (work / f"shard-{i}.bin").write_bytes(os.urandom(64 << 20))
    vault = tmp_path / "vault"
    proc = subprocess.Popen(
        [sys.executable, "-m", "liferaft", "--vault", str(vault), "snapshot", str(work), "--run", "r"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not inherited as ignored (a CI's `cmd &`)
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(not p.name.startswith(".") for p in (vault / "packs").rglob("*") if p.is_file()):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the snapshot finished before the interrupt landed")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "aborted" in err
    left = [p for p in (vault / "packs").rglob("*") if p.is_file()]
    assert left == []
    assert not any((vault / "locks").iterdir())
    assert Vault(vault).snapshots() == []
    assert Vault(vault).verify(read_data=True).ok
