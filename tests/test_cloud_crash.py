"""Guarantee 1 on object stores, proved by SIGKILL: real ``liferaft snapshot`` processes
writing to a loopback moto / rclone / fake-gcs-server, killed mid-commit.

Kills are aimed three ways: as soon as the parent sees the first new pack in the
store, as soon as it sees the new index fragment, and after a random delay from the
moment the writer registered its session. The vault uses 256 KiB packs here, so a
snapshot is a dozen pack uploads and the kills land between them. After every kill the
vault verifies with every byte read, every committed snapshot is still listed, at most
the one snapshot being written appeared, and it restores to the exact tree of its step.
At the end the dead writers' sessions expire and ``prune`` must leave no orphan pack.
(The local folder has its own, longer campaign: tests/test_crash.py.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import liferaft
from conftest import make_tree, tree_state
from liferaft.backends import Backend, open_backend
from liferaft.vault import repository
from liferaft.vault.repository import Repository
from servers import KINDS, Fault, FaultProxy, StoreServer

SEED = int(os.environ.get("LIFERAFT_CRASH_SEED", "5071"))
KILL_PLAN = ("pack", "index", "random", "random")
RUN = "crash"


def small_pack_vault(url: str, pack_size: int = 256 << 10) -> None:
    """Create the vault with small packs and chunks, so that one snapshot is many uploads."""
    backend = open_backend(url)
    repo = Repository.open(backend, create=True)
    chunker = dict(repo.config["chunker"], min=64 << 10, avg=256 << 10, max=1 << 20)
    backend.put("config.json", json.dumps(dict(repo.config, pack_size=pack_size, chunker=chunker)).encode(), overwrite=True)


def _names(backend: Backend, prefix: str) -> set[str]:
    return {o.name for o in backend.list(prefix)}


def _mutate(work: Path, rng: random.Random, step: int) -> None:
    (work / f"data-{step}.bin").write_bytes(rng.randbytes(3 << 20))  # a dozen new packs
    (work / "step.txt").write_text(f"{step}\n")
    for i in rng.sample(range(30), 5):
        (work / "small" / f"f{i:02d}.txt").write_bytes(rng.randbytes(rng.randint(0, 4000)))
    old = sorted(work.glob("data-*.bin"))
    if len(old) > 2:
        old[0].unlink()


def _kill_when(proc: subprocess.Popen[bytes], backend: Backend, plan: str, before: dict[str, set[str]], rng: random.Random) -> bool:
    """SIGKILL ``proc`` at the planned point; False if it finished first."""
    deadline = time.monotonic() + 180
    delay = rng.uniform(0.0, 0.8)
    armed_at: float | None = None
    while time.monotonic() < deadline and proc.poll() is None:
        if plan == "pack":
            hit = bool(_names(backend, "packs/") - before["packs/"])
        elif plan == "index":
            hit = bool(_names(backend, "index/") - before["index/"])
        else:
            if armed_at is None and any(n.startswith("locks/session-") for n in _names(backend, "locks/")):
                armed_at = time.monotonic()
            hit = armed_at is not None and time.monotonic() - armed_at >= delay
        if hit:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            proc.wait(timeout=60)
            return proc.returncode == -signal.SIGKILL
        time.sleep(0.01)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_killed_mid_commit_leaves_the_last_commit_and_prunable_garbage(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server: StoreServer = request.getfixturevalue(f"{kind}_server")
    server.apply(monkeypatch)
    url = server.vault_url()
    small_pack_vault(url)
    backend = open_backend(url)
    rng = random.Random(f"{SEED}-{kind}")
    work = make_tree(tmp_path / "work", {f"small/f{i:02d}.txt": rng.randbytes(100) for i in range(30)})
    committed: dict[str, dict] = {}
    stages: Counter[str] = Counter()
    for step, plan in enumerate(KILL_PLAN):
        _mutate(work, rng, step)
        state = tree_state(work)
        before = {p: _names(backend, p) for p in ("packs/", "index/", "snapshots/")}
        # The writer goes through a slow uplink (20 ms per 64 KiB), so that its uploads
        # last long enough for the kill to land between the first pack and the manifest
        # whatever the machine's speed; this test process watches the store directly.
        with FaultProxy(server.port, lambda _i: Fault("slow", 0, 0.02), lifetime=240) as proxy:
            proc = subprocess.Popen(
                [sys.executable, "-m", "liferaft", "--vault", url, "snapshot", str(work), "--run", RUN, "--step", str(step)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, **server.env(proxy.endpoint)},
            )
            try:
                killed = _kill_when(proc, backend, plan, before, rng)
                _out, err = proc.communicate(timeout=180)
            finally:
                if proc.poll() is None:
                    proc.kill()
        if not killed:
            assert proc.returncode == 0, err
        new = {p: _names(backend, p) - before[p] for p in before}
        stage = (
            "committed"
            if new["snapshots/"]
            else "index written, no manifest"
            if new["index/"]
            else "packs written, no index"
            if new["packs/"]
            else "nothing written"
        )
        stages[stage if killed else "finished"] += 1

        vault = liferaft.Vault(url)
        report = vault.verify(read_data=True)
        assert report.ok, (step, plan, stage, report.damage)
        snaps = {s.id: s for s in vault.snapshots()}
        assert set(committed) <= set(snaps), f"a committed snapshot vanished after a kill at {plan} ({stage})"
        appeared = set(snaps) - set(committed)
        assert len(appeared) <= 1, f"more than one snapshot appeared: {appeared}"
        for sid in appeared:
            assert snaps[sid].step == step
            committed[sid] = state
        if appeared or not killed:
            assert appeared, "a writer that finished left no snapshot"

    assert stages["packs written, no index"] + stages["index written, no manifest"] >= 1, stages
    assert sum(stages.values()) - stages["finished"] >= 2, f"too few kills landed: {stages}"

    # Every committed snapshot restores, without fallback, to its step's exact tree.
    vault = liferaft.Vault(url)
    for i, (sid, state) in enumerate(committed.items()):
        result = vault.restore(sid, to=tmp_path / f"back-{i}")
        assert result is not None and not result.fallbacks
        assert tree_state(tmp_path / f"back-{i}" / "work") == state

    # Prune removes the killed writers' orphan packs once their sessions count as dead:
    # what 5 minutes without a refresh (by their clock and the store's) does, in 1 s.
    dead = [o.name for o in backend.list("locks/") if o.name.startswith("locks/session-")]
    assert dead, "killed writers leave their sessions"
    monkeypatch.setattr(repository, "STALE_AFTER", 1.0)
    time.sleep(1.1)
    report = liferaft.Vault(url).prune(wait=0)
    assert not report.waiting_on, report
    repo = liferaft.Vault(url).repository()
    referenced = {entry[0] for entry in repo.index(reload=True).values()}
    stored = {o.name.rsplit("/", 1)[-1] for o in backend.list("packs/")}
    assert stored == referenced, f"orphans left: {len(stored - referenced)}, missing: {len(referenced - stored)}"
    if stages["packs written, no index"]:
        assert report.packs_deleted >= 1, report
    assert liferaft.Vault(url).verify(read_data=True).ok
    assert not [o.name for o in backend.list("locks/")], "dead sessions or the prune lock left behind"
