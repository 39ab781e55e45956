"""A faulty network between liferaft and each real-protocol server.

``servers.FaultProxy`` (a TCP proxy written for these tests, on 127.0.0.1 only) drops
connections mid-upload, truncates them mid-download, stalls them and refuses them, on a
seeded plan. Through it, a snapshot either commits after retries or fails with one clear
LiferaftError; a restore returns the exact bytes or fails clearly (never wrong bytes,
never a fallback to an older snapshot because of the network); and afterwards, reached
directly, the vault verifies with every byte read.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import liferaft
from conftest import make_tree, tree_state
from liferaft.backends import objectstore
from liferaft.backends.objectstore import ObjectStoreBackend
from liferaft.errors import LiferaftError, VaultUnreachable
from servers import KINDS, Fault, FaultPlan, FaultProxy, StoreServer, start_server
from test_cloud_crash import small_pack_vault

SEED = int(os.environ.get("LIFERAFT_FAULT_SEED", "2029"))


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> StoreServer:
    srv: StoreServer = request.getfixturevalue(f"{request.param}_server")
    srv.apply(monkeypatch)
    return srv


def _clear(err: LiferaftError) -> str:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.slow
def test_snapshot_and_restore_through_a_faulty_network(server: StoreServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = server.vault_url()
    small_pack_vault(url)  # ~300 KiB packs: every snapshot is several uploads to break
    monkeypatch.setenv("LIFERAFT_RETRY_DEADLINE", "30")
    rng = random.Random(f"{SEED}-{server.kind}")
    work = make_tree(tmp_path / "work", {f"small/{i}.txt": rng.randbytes(2000) for i in range(20)})
    committed: dict[str, dict] = {}
    failures: list[str] = []
    # Clients keep connections alive (gcsfs few, for long), so most connections are planned
    # to break somewhere in their first 4 MiB; one that carries less passes unharmed.
    plan = FaultPlan(SEED, p=0.7, max_faults=14, max_after=4 << 20, stall=1.0)
    with FaultProxy(server.port, plan, lifetime=240) as proxy:
        server.apply(monkeypatch, proxy.endpoint)
        vault = liferaft.Vault(url)
        for step in range(4):
            (work / f"ckpt-{step}.bin").write_bytes(rng.randbytes(3 << 20))
            (work / "small" / f"{step}.txt").write_text(f"step {step}")
            state = tree_state(work)
            try:
                snap = vault.snapshot([work], run="r", step=step)
            except LiferaftError as err:  # allowed: one clear line, previous state intact
                failures.append(_clear(err))
                continue
            committed[snap.id] = state
        struck_writing = sum(proxy.struck.values())
    assert struck_writing >= 3, f"the proxy broke too little to prove anything: {proxy.struck}"
    assert committed, f"no snapshot got through: {failures}"

    # Restores through a network that drops and truncates downloads, each as on a fresh
    # machine (an empty cache folder: manifests and index fragments come through it too).
    plan = FaultPlan(SEED + 1, p=0.7, max_faults=10, kinds=("truncate", "drop", "stall_down", "refuse"), max_after=2 << 20, stall=1.0)
    with FaultProxy(server.port, plan, lifetime=240) as proxy:
        server.apply(monkeypatch, proxy.endpoint)
        for i, (sid, state) in enumerate(committed.items()):
            target = tmp_path / f"via-proxy-{i}"
            monkeypatch.setenv("LIFERAFT_CACHE_DIR", str(tmp_path / f"fresh-machine-{i}"))
            try:
                result = liferaft.Vault(url).restore(sid, to=target)
            except LiferaftError as err:
                _clear(err)
                assert not any(p.is_file() for p in target.rglob("*")), "a failed restore left files"
                continue
            assert result is not None and not result.fallbacks
            assert tree_state(target / "work") == state, "restore through faults returned wrong bytes"
        newest = list(committed)[-1]
        monkeypatch.setenv("LIFERAFT_CACHE_DIR", str(tmp_path / "fresh-machine-newest"))
        result = liferaft.Vault(url).restore(run="r", to=tmp_path / "newest")
        assert result is not None and result.snapshot.id == newest and not result.fallbacks
        assert tree_state(tmp_path / "newest" / "work") == committed[newest]
    assert sum(proxy.struck.values()) >= 2, f"restores were not disturbed: {proxy.struck}"

    # Reached directly: whole, every committed snapshot there, every byte verified.
    server.apply(monkeypatch)
    vault = liferaft.Vault(url)
    assert set(committed) <= {s.id for s in vault.snapshots()}
    report = vault.verify(read_data=True)
    assert report.ok, report.damage


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "mode"), [("moto", "drop"), ("rclone", "stall"), ("gcs", "drop"), ("gcs", "stall")])
def test_a_network_that_never_recovers_fails_clearly_within_the_deadline(
    kind: str, mode: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Options from liferaft.toml: a 3 s retry deadline and 2 s client timeouts."""
    server: StoreServer = request.getfixturevalue(f"{kind}_server")
    server.apply(monkeypatch)
    url = server.vault_url()
    small_pack_vault(url)
    work = make_tree(tmp_path / "work", {"model.bin": os.urandom(2 << 20), "notes.txt": "v1"})
    first = liferaft.Vault(url).snapshot([work], run="r", step=1)
    state = tree_state(work)
    (work / "model.bin").write_bytes(os.urandom(2 << 20))
    timeouts = "requests_timeout = 2" if server.kind == "gcs" else "config_kwargs = { read_timeout = 2, connect_timeout = 2 }"
    (tmp_path / "liferaft.toml").write_text(f'[vault]\nurl = "{url}"\n\n[vault.options]\nretry_deadline = 3\n{timeouts}\n')
    monkeypatch.chdir(tmp_path)
    # drop: every connection is cut once 64 KiB went up (small requests pass, packs never);
    # stall: every response is withheld for 30 s (the proxy's bound), so only timeouts help.
    fault = Fault("drop", after=64 << 10) if mode == "drop" else Fault("stall_down", after=0, stall=30.0)
    with FaultProxy(server.port, lambda _conn: fault, lifetime=120) as proxy:
        server.apply(monkeypatch, proxy.endpoint)
        started = time.monotonic()
        with pytest.raises(VaultUnreachable) as info:
            vault = liferaft.Vault()
            assert vault.url == url and vault.choice.options["retry_deadline"] == 3
            vault.snapshot([work], run="r", step=2)
        elapsed = time.monotonic() - started
        assert sum(proxy.struck.values()) >= 1
    text = _clear(info.value)
    assert "still failing" in text and "committed snapshots are intact" in text
    assert elapsed < 25, f"gave up after {elapsed:.0f}s, not within the 3 s deadline (plus one attempt)"

    server.apply(monkeypatch)
    vault = liferaft.Vault(url)
    assert [s.id for s in vault.snapshots()] == [first.id]
    assert vault.verify(read_data=True).ok
    vault.restore(first.id, to=tmp_path / "back")
    assert tree_state(tmp_path / "back" / "work") == state


def test_a_store_that_dies_mid_snapshot_fails_within_one_deadline(
    moto_server: StoreServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The endpoint goes away after some packs are up. Cleaning up after the failure must
    not retry a delete per pack, each for a whole deadline (20 minutes for a real one)."""
    server = moto_server
    server.apply(monkeypatch)
    url = server.vault_url()
    small_pack_vault(url)  # 256 KiB packs: 24 MiB is ~24 uploads (packs close at a chunk past 256 KiB)
    first = liferaft.Vault(url).snapshot([make_tree(tmp_path / "first", {"a": "1"})], run="r")
    work = make_tree(tmp_path / "work", {"model.bin": os.urandom(24 << 20)})
    opts = "retry_deadline = 3\nconfig_kwargs = { read_timeout = 2, connect_timeout = 2 }"
    (tmp_path / "liferaft.toml").write_text(f'[vault]\nurl = "{url}"\n\n[vault.options]\n{opts}\n')
    monkeypatch.chdir(tmp_path)
    packs = url.removeprefix("s3://") + "/packs"
    raw = server.raw_fs()
    with FaultProxy(server.port, lifetime=120) as proxy:
        server.apply(monkeypatch, proxy.endpoint)

        def cut_when_packs_are_up() -> None:
            end = time.monotonic() + 60
            while time.monotonic() < end and len(raw.find(packs)) < 1 + 12:  # the first snapshot's, then 12 more
                time.sleep(0.02)
            proxy.close()  # every connection cut, every new one refused

        cutter = threading.Thread(target=cut_when_packs_are_up)
        cutter.start()
        started = time.monotonic()
        try:
            with pytest.raises(VaultUnreachable) as info:
                liferaft.Vault().snapshot([work], run="r")
            elapsed = time.monotonic() - started
        finally:
            cutter.join()
    assert "still failing" in _clear(info.value)
    assert len(raw.find(packs)) >= 13, "the store died before any pack was up: nothing to clean"
    assert elapsed < 25, f"failed after {elapsed:.0f}s with a 3 s deadline: the cleanup waited a deadline per pack"
    server.apply(monkeypatch)
    vault = liferaft.Vault(url)
    assert [s.id for s in vault.snapshots()] == [first.id]
    assert vault.verify().ok


FROZEN_BOUND = 20.0  # s from the freeze to the error: a 3 s deadline, one call (two tries of 2 s, or the call limit), margin
THAW_AFTER = 60.0  # unbounded, the snapshot would wait for ever: the server is thawed then, and the test fails on the time


@pytest.fixture
def own_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreServer]:
    """A server of this test's own (the test freezes it): a free loopback port, stopped by process id."""
    server = start_server(request.param)
    try:
        server.apply(monkeypatch)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("own_server", "guard"),
    [("moto", "no progress"), ("moto", "call limit"), ("gcs", "no progress"), ("gcs", "call limit")],
    indirect=["own_server"],
)
def test_a_frozen_store_fails_the_snapshot_within_the_deadline_and_the_next_one_works(
    own_server: StoreServer, guard: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The store's process is SIGSTOPped as a pack starts going up: connections are still
    accepted, nothing is read or answered. The clients' read timeouts start only once a
    body is sent, so a 16 MiB pack waited for ever with the socket buffers full (a 5 s
    deadline, 300+ s blocked). Now the snapshot fails within the deadline plus one call,
    with one clear line; the vault is as it was; once the store is back, the same Vault
    (same client, same session, as the run supervisor keeps it) commits the next one.

    guard "no progress": the kernel drops a connection whose bytes go unacknowledged for
    the read timeout (TCP_USER_TIMEOUT, Linux). "call limit": as on a platform without
    it, the whole-call limit cancels the upload in fsspec's loop, and the client's
    session must still work afterwards."""
    server = own_server
    # The defaults, scaled down: 2 s to connect, 2 s without progress, a 3 s retry deadline.
    monkeypatch.setattr(objectstore, "CONNECT_TIMEOUT", 2)
    monkeypatch.setattr(objectstore, "READ_TIMEOUT", 2)
    monkeypatch.setenv("LIFERAFT_RETRY_DEADLINE", "3")
    if guard == "call limit":  # (raising=False: without the bounds, the test is to fail on the time alone)
        monkeypatch.setattr(objectstore, "_no_progress_sockets", lambda _seconds: None, raising=False)
        monkeypatch.setattr(objectstore, "MIN_TRANSFER_RATE", 8 << 20, raising=False)  # a 16 MiB pack: 2 s of the 11 s limit
        monkeypatch.setattr(objectstore, "CALL_SLACK", 1.0, raising=False)
    url = server.vault_url()
    small_pack_vault(url, pack_size=16 << 20)  # packs far larger than the socket buffers take in
    work = make_tree(tmp_path / "work", {"notes.txt": "v1", "model.bin": os.urandom(1 << 20)})
    vault = liferaft.Vault(url)
    first = vault.snapshot([work], run="r", step=1)
    state = tree_state(work)
    (work / "model.bin").write_bytes(os.urandom(48 << 20))  # three 16 MiB packs
    (work / "notes.txt").write_text("v2")

    frozen_at: list[float] = []
    packs_started = [0]
    lock = threading.Lock()
    put = ObjectStoreBackend.put

    def freeze_at_the_second_pack(
        self: ObjectStoreBackend, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False
    ) -> None:
        with lock:
            if name.startswith("packs/") and not frozen_at:
                packs_started[0] += 1
                if packs_started[0] == 2:  # the first one is up or going up
                    server.freeze()
                    frozen_at.append(time.monotonic())
        put(self, name, data, overwrite=overwrite)

    monkeypatch.setattr(ObjectStoreBackend, "put", freeze_at_the_second_pack)
    thaw = threading.Timer(THAW_AFTER, server.thaw)
    thaw.start()
    error: LiferaftError | None = None
    try:
        try:
            vault.snapshot([work], run="r", step=2)
        except VaultUnreachable as err:
            error = err
        ended = time.monotonic()
    finally:
        thaw.cancel()
        server.thaw()
    monkeypatch.setattr(ObjectStoreBackend, "put", put)
    assert frozen_at, "no second pack went up: the store was never frozen"
    held = ended - frozen_at[0]
    assert held < FROZEN_BOUND, f"a frozen store held the snapshot for {held:.0f}s with a 3 s deadline and 2 s timeouts"
    assert error is not None, f"the snapshot did not fail while the store was frozen ({held:.0f}s)"
    text = _clear(error)
    assert "still failing" in text and "committed snapshots are intact" in text, text

    # The store is back: the supervisor's next snapshot, through the same client, commits.
    second = vault.snapshot([work], run="r", step=3)
    fresh = liferaft.Vault(url)
    assert [s.id for s in fresh.snapshots()] == [first.id, second.id]
    report = fresh.verify(read_data=True)  # every byte of both, against its hash
    assert report.ok, report.damage
    fresh.restore(first.id, to=tmp_path / "first")
    assert tree_state(tmp_path / "first" / "work") == state


def test_a_bad_key_file_in_google_application_credentials_is_named_not_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable is set: the advice was "... or set GOOGLE_APPLICATION_CREDENTIALS".
    It now says what is wrong with the file it names. No server: keys load before any request."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    key = tmp_path / "key.json"
    key.write_text('{"type": "authorized_user", "client_id": "x"}')  # JSON, but not a usable key
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    with pytest.raises(LiferaftError) as info:
        liferaft.Vault("gs://bucket/vault").snapshots()
    text = _clear(info.value)
    assert "cannot be loaded" in text and f"{key}, which GOOGLE_APPLICATION_CREDENTIALS names, is not a usable service-account key" in text
    assert "or set GOOGLE_APPLICATION_CREDENTIALS" not in text and "unset it" in text
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(LiferaftError) as info:
        liferaft.Vault("gs://bucket/vault").snapshots()
    text = _clear(info.value)
    assert "absent.json', which is not a file" in text and "set GOOGLE_APPLICATION_CREDENTIALS" not in text
