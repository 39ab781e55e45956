"""Guarantee 3 and concurrent writers: retention never deletes what a snapshot or a running
writer still needs, and any number of writers can share one vault.

Real processes race where the claim is about processes (two writers; a writer beside
``forget --prune``); a Hypothesis state machine drives random interleavings of snapshots,
forget, prune and a writer session held open across a prune; threads race on create-only
puts. Each bug these tests found has its own minimal regression test below.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import liferaft
from conftest import cli, make_tree
from liferaft.backends import Backend, LocalBackend, ObjectExists, open_backend
from liferaft.errors import LiferaftError
from liferaft.vault import format as fmt
from liferaft.vault import maintenance, repository
from liferaft.vault.repository import PRUNE_LOCK, STALE_AFTER, Repository, WriteSession
from liferaft.vault.restore import restore_snapshot
from liferaft.vault.snapshot import take_snapshot

TESTS = Path(__file__).resolve().parent

# ------------------------------------------------------------------ helpers


def _state(writer: str, k: int) -> dict[str, bytes]:
    """Round ``k`` of a writer's folder: own data, data shared by both writers, and data
    that recurs every third round (so a writer dedups against blobs whose only snapshot
    has just been forgotten: the dangerous case for prune)."""
    mine = random.Random(f"{writer}/{k}")
    pool = random.Random(f"pool/{k % 3}")
    files = {
        "common/pool.bin": pool.randbytes(300_000),
        "common/big.bin": pool.randbytes(1_200_000 + (k % 3) * 4096),  # > 1 MiB: cut by FastCDC
        f"own/{writer}.bin": mine.randbytes(40_000),
        "own/log.txt": (f"{writer} round {k}\n" * 200).encode(),
        "constant.bin": random.Random("constant").randbytes(20_000),  # never rewritten: stat cache hit
    }
    if k % 2:
        files["own/odd.bin"] = mine.randbytes(70_000)
    return files


def _write_state(root: Path, files: dict[str, bytes]) -> None:
    """Make ``root`` hold exactly ``files``; changed files get a new inode (temp + rename)."""
    root.mkdir(parents=True, exist_ok=True)
    for path in [p for p in root.rglob("*") if p.is_file()]:
        if path.relative_to(root).as_posix() not in files:
            path.unlink()
    for rel, data in files.items():
        path = root / rel
        if path.is_file() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _writer_loop(
    vault: str, work: str, writer: str, go: str, log: str, rounds: int, seconds: float, pause: float, peers: tuple[str, ...] = ()
) -> None:
    """Body of a writer process: snapshot ``_state(writer, k)`` for k = 0, 1, ...

    With ``peers`` (their log files), round k starts only once every peer has committed
    k snapshots, so the writers stay in the same round: really concurrent, even on a
    loaded machine."""
    Path(f"{log}.ready").touch()
    start = time.monotonic()
    while not os.path.exists(go):
        if time.monotonic() - start > 120:
            raise SystemExit("never told to start")
        time.sleep(0.002)
    v = liferaft.Vault(vault)
    rng = random.Random(writer)
    end = time.monotonic() + seconds
    with open(log, "a") as out:
        k = 0
        while k < rounds and time.monotonic() < end:
            while any(_lines(p) < k for p in peers):
                if time.monotonic() > end:
                    raise SystemExit("a peer writer stopped")
                time.sleep(0.002)
            _write_state(Path(work), _state(writer, k))
            started = time.time()
            snap = v.snapshot([work], run=writer, step=k)
            out.write(json.dumps({"id": snap.id, "k": k, "s": started, "t": time.time()}) + "\n")
            out.flush()
            k += 1
            if pause:
                time.sleep(rng.uniform(0, pause))


def _lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def _spawn_writer(
    vault: str, tmp: Path, writer: str, go: Path, *, rounds: int, seconds: float, pause: float, peers: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    peer_logs = tuple(str(tmp / f"{p}.log") for p in peers)
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_concurrency as t; "
        f"t._writer_loop({vault!r}, {str(tmp / writer / 'data')!r}, {writer!r}, {str(go)!r}, "
        f"{str(tmp / f'{writer}.log')!r}, {rounds}, {seconds}, {pause}, {peer_logs!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_together(tmp: Path, writers: list[str], go: Path) -> None:
    deadline = time.monotonic() + 120
    while not all((tmp / f"{w}.log.ready").exists() for w in writers):
        assert time.monotonic() < deadline, "writer processes did not start"
        time.sleep(0.01)
    go.touch()


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> None:
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"writer process hung:\n{err[-3000:]}")
    assert proc.returncode == 0, f"writer process failed (rc {proc.returncode}):\n{err[-3000:]}"


def _log(tmp: Path, writer: str) -> list[dict]:
    return [json.loads(line) for line in (tmp / f"{writer}.log").read_text().splitlines()]


def _small_pack_vault(url: str, pack_size: int = 16 << 10) -> Backend:
    """A fresh vault whose packs are tiny, so writers seal and upload packs mid-session."""
    backend = open_backend(url)
    repo = Repository.open(backend, create=True)
    config = dict(repo.config)
    config["pack_size"] = pack_size
    backend.put(repository.CONFIG, json.dumps(config, indent=2).encode(), overwrite=True)
    return backend


def _commit_files(session: WriteSession, files: dict[str, bytes], run: str) -> str:
    """Commit ``files`` (as folder ``t``) through an already open session: what
    ``take_snapshot`` does, but with the session held open as long as the test likes."""
    entries = [fmt.Entry("t", fmt.TYPE_DIR, 0o755, 1_600_000_000_000_000_000)]
    dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
    entries += [fmt.Entry(f"t/{d}", fmt.TYPE_DIR, 0o755, 1_600_000_000_000_000_000) for d in dirs]
    for rel, data in sorted(files.items()):
        blobs = [session.add(data).hex()] if data else []
        entries.append(fmt.Entry(f"t/{rel}", fmt.TYPE_FILE, 0o644, 1_600_000_000_000_000_000, len(data), blobs))
    tree = session.add(fmt.encode_tree(entries), compress=True).hex()
    manifest = {
        "v": fmt.FORMAT_VERSION,
        "run": run,
        "step": None,
        "tags": {},
        "metrics": {},
        "time_ns": time.time_ns(),
        "host": "test",
        "parent": None,
        "roots": [{"name": "t", "source": "/nonexistent/t", "type": fmt.TYPE_DIR}],
        "tree": [tree],
    }
    return session.commit(manifest)


def _restored(repo: Repository, snapshot_id: str, dest: Path) -> dict[str, bytes]:
    snap = repo.find(snapshot_id)
    restore_snapshot(repo, snap, to=dest, update_cache=False)
    (name,) = [r["name"] for r in snap.roots]
    try:
        return _files(dest / name)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _assert_healthy(backend_or_url: object, expected: dict[str, dict[str, bytes]], scratch: Path) -> None:
    """From a fresh reader: verify --read-data is clean and every expected snapshot restores."""
    backend = open_backend(backend_or_url) if isinstance(backend_or_url, (str, Path)) else backend_or_url
    repo = Repository.open(backend)  # type: ignore[arg-type]
    report = maintenance.verify(repo, read_data=True)
    assert report.ok, report.damage
    for sid, content in expected.items():
        assert _restored(repo, sid, scratch / sid[:12]) == content, f"snapshot {sid[:12]} restored different bytes"


# ------------------------------------------------------------------ 1. two writer processes


def test_two_writer_processes_share_one_vault(tmp_path: Path) -> None:
    vault = str(tmp_path / "vault")
    liferaft.Vault(vault).repository(create=True)
    go = tmp_path / "go"
    writers = ["alpha", "beta"]
    procs = [
        _spawn_writer(vault, tmp_path, w, go, rounds=4, seconds=90, pause=0, peers=tuple(p for p in writers if p != w)) for w in writers
    ]
    _start_together(tmp_path, writers, go)
    for p in procs:
        _finish(p)

    logs = {w: _log(tmp_path, w) for w in writers}
    assert all(len(entries) == 4 for entries in logs.values())
    # They really overlapped: in some round both snapshots were being taken at once.
    a, b = (logs[w] for w in writers)
    assert any(a[k]["s"] < b[k]["t"] and b[k]["s"] < a[k]["t"] for k in range(4)), logs

    v = liferaft.Vault(vault)
    listed = {s.id: s for s in v.snapshots()}
    expected = {e["id"]: _state(w, e["k"]) for w in writers for e in logs[w]}
    assert set(listed) == set(expected)
    for w in writers:
        assert [s.step for s in v.snapshots(run=w)] == [0, 1, 2, 3]
    _assert_healthy(vault, expected, tmp_path / "back")
    # The newest snapshot of each run is what a restore by run brings back.
    for w in writers:
        result = v.restore(run=w, to=tmp_path / f"latest-{w}")
        assert result is not None and result.snapshot.id == logs[w][-1]["id"]
        assert _files(tmp_path / f"latest-{w}" / "data") == _state(w, 3)
    # Each writer deduplicated against what was committed before it (two writers in flight
    # at once may both store the same new bytes: neither can see the other's uncommitted data).
    per_writer = sum(sum(map(len, {b for e in logs[w] for b in _state(w, e["k"]).values()})) for w in writers)
    stored = sum(o.size for o in v.backend.list("packs/"))
    assert stored < per_writer * 1.05


# ------------------------------------------------------------------ 2. prune beside a running writer


def test_forget_prune_beside_a_running_writer_process(tmp_path: Path) -> None:
    vault = str(tmp_path / "vault")
    _small_pack_vault(vault, 256 << 10)  # several packs per snapshot, some sealed mid-snapshot
    go = tmp_path / "go"
    writer = _spawn_writer(vault, tmp_path, "w", go, rounds=10_000, seconds=10, pause=0.25)
    _start_together(tmp_path, ["w"], go)

    cycles = deleted_while_writing = 0
    forgotten: set[str] = set()
    try:
        while writer.poll() is None:
            r = cli("forget", "--vault", vault, "--run", "w", "--keep-last", "1", "--prune", "--json", timeout=90)
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            gone = doc["forgotten"]
            forgotten |= {s["id"] for s in gone}
            if writer.poll() is None:
                cycles += 1
                deleted_while_writing += doc["prune"]["packs_deleted"]
            # Retention kept the newest: whatever is listed now is newer than all it forgot.
            left = liferaft.Vault(vault).snapshots(run="w")
            assert left or not gone, "forget --keep-last 1 left the run without a snapshot"
            assert all(s["time_ns"] < left[-1].time_ns for s in gone)
            # Between prunes, with the writer still going, every listed snapshot is whole
            # (checked now: a later forget could otherwise hide the damage).
            report = liferaft.Vault(vault).verify()
            assert report.ok, report.damage
    finally:
        if writer.poll() is None:
            writer.kill()
    _finish(writer)

    log = _log(tmp_path, "w")
    # The race was real: the writer kept committing while prune deleted packs.
    assert len(log) >= 5 and cycles >= 3 and deleted_while_writing > 0, (len(log), cycles, deleted_while_writing)
    # One more pass with nobody writing, then everything listed must be whole.
    r = cli("forget", "--vault", vault, "--run", "w", "--keep-last", "2", "--prune", "--json", timeout=90)
    assert r.returncode == 0, r.stderr
    listed = [s.id for s in liferaft.Vault(vault).snapshots(run="w")]
    assert listed and listed == [e["id"] for e in log][-len(listed) :], "the newest snapshots must survive retention"
    assert not set(listed) & forgotten
    by_id = {e["id"]: e["k"] for e in log}
    _assert_healthy(vault, {sid: _state("w", by_id[sid]) for sid in listed}, tmp_path / "back")
    r = cli("verify", "--vault", vault, "--read-data", timeout=90)
    assert r.returncode == 0, r.stderr + r.stdout


# ------------------------------------------------------------------ 3. random interleavings


FILE_NAMES = ["a.bin", "b.bin", "sub/c.bin", "sub/deeper/d.txt"]
SIZES = [0, 700, 9_000, 20_000, 40_000]  # packs are 16 KiB here: big blobs seal packs mid-session


class RetentionMachine(RuleBasedStateMachine):
    """Snapshots of two runs, forget, prune, and a second writer whose session stays open
    across them. The model is the content recorded for every snapshot that should exist."""

    LONG_LIVED_PRUNER = False  # prune from one Repository object kept for the whole run
    PRUNE_WAITS = False  # let prune wait for the open session and go on when it commits

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="liferaft-sm-"))
        self.url = f"memory://liferaft-tests/{uuid.uuid4().hex}"
        self.backend = _small_pack_vault(self.url)
        self.writer = Repository.open(self.backend)  # a training process, kept open
        self.other = Repository.open(self.backend)  # a second writer, kept open
        self.pruner = Repository.open(self.backend) if self.LONG_LIVED_PRUNER else None
        self.work: dict[str, dict[str, bytes]] = {"a": {}, "b": {}}
        self.history: list[bytes] = []  # every file content ever snapshotted
        self.expected: dict[str, dict[str, bytes]] = {}
        self.session: WriteSession | None = None
        self.session_files: dict[str, bytes] = {}
        self.session_run = "a"
        self.n = 0

    def teardown(self) -> None:
        if self.session is not None:
            self.session.close()
        try:
            self.backend.fs.rm(self.backend.root, recursive=True)  # type: ignore[attr-defined]
        except FileNotFoundError:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers

    def _content(self, seed: int, size_i: int, reuse: bool) -> bytes:
        if reuse and self.history:
            return self.history[seed % len(self.history)]
        return random.Random(seed).randbytes(SIZES[size_i])

    def _prune_repo(self) -> Repository:
        return self.pruner if self.pruner is not None else Repository.open(self.backend)

    # -- rules

    @rule(
        run=st.sampled_from(["a", "b"]),
        edits=st.lists(
            st.tuples(st.sampled_from(FILE_NAMES), st.booleans(), st.integers(0, 2**32), st.integers(0, len(SIZES) - 1), st.booleans()),
            min_size=1,
            max_size=3,
        ),
    )
    def snapshot(self, run: str, edits: list[tuple[str, bool, int, int, bool]]) -> None:
        content = dict(self.work[run])
        for name, delete, seed, size_i, reuse in edits:
            if delete:
                content.pop(name, None)
            else:
                content[name] = self._content(seed, size_i, reuse)
        root = self.tmp / "work" / run / "data"
        _write_state(root, content)
        snap = take_snapshot(self.writer, [root], run=run)
        self.work[run] = content
        self.expected[snap.id] = dict(content)
        self.history.extend(content.values())

    @rule(run=st.sampled_from(["a", "b"]), keep=st.integers(1, 3))
    def forget(self, run: str, keep: int) -> None:
        repo = Repository.open(self.backend)
        mine = [s for s in repo.snapshots() if s.run == run]
        doomed = maintenance.select_forget(repo.snapshots(), run, keep, healthy=lambda s: maintenance.quick_check(repo, s))
        ids = {s.id for s in doomed}
        if mine:
            assert mine[-1].id not in ids, "forget chose the newest snapshot of the run"
        assert {s.id for s in mine[-keep:]}.isdisjoint(ids)
        assert set(repo.forget(sorted(ids))) == ids
        for sid in ids:
            del self.expected[sid]

    @rule()
    def prune(self) -> None:
        report = maintenance.prune(self._prune_repo(), wait=0)
        if self.session is not None:
            assert report.packs_deleted == 0 and report.packs_repacked == 0, "prune deleted while a writer was running"

    @precondition(lambda self: self.session is None)
    @rule(
        run=st.sampled_from(["a", "b"]),
        picks=st.lists(
            st.tuples(st.sampled_from(FILE_NAMES), st.integers(0, 2**32), st.integers(0, len(SIZES) - 1), st.booleans()),
            min_size=1,
            max_size=3,
        ),
    )
    def open_session(self, run: str, picks: list[tuple[str, int, int, bool]]) -> None:
        """A second writer starts: it dedups against whatever the index holds now,
        including blobs whose only snapshot is about to be forgotten."""
        self.session = self.other.session()
        self.session_run = run
        self.session_files = {}
        for name, seed, size_i, reuse in picks:
            data = self._content(seed, size_i, reuse or seed % 2 == 0)
            self.session_files[name] = data
            if data:
                self.session.add(data)

    @precondition(lambda self: self.session is None)
    @rule(run=st.sampled_from(["a", "b"]))
    def writer_reuses_what_retention_drops(self, run: str) -> None:
        """The dangerous case, on purpose: a writer dedups against the blobs of a snapshot,
        that snapshot is forgotten (it was the only one needing them) and prune runs while
        the writer is still going. Commit (or abandon) comes in a later step."""
        repo = Repository.open(self.backend)
        mine = [s for s in repo.snapshots() if s.run == run]
        if len(mine) < 2:
            return
        self.session = self.other.session()
        self.session_run = run
        self.session_files = dict(self.expected[mine[0].id])
        for data in self.session_files.values():
            if data:
                self.session.add(data)
        doomed = maintenance.select_forget(repo.snapshots(), run, 1)
        assert mine[-1].id not in {s.id for s in doomed}
        repo.forget([s.id for s in doomed])
        for s in doomed:
            del self.expected[s.id]
        self.prune()

    @precondition(lambda self: self.session is not None)
    @rule()
    def commit_session(self) -> None:
        self._commit_session()

    def _commit_session(self) -> None:
        assert self.session is not None
        before = {s.id for s in Repository.open(self.backend).snapshots()}
        try:
            sid = _commit_files(self.session, self.session_files, self.session_run)
        except LiferaftError:
            # Refusing is allowed; committing something broken is not.
            assert {s.id for s in Repository.open(self.backend).snapshots()} == before
        else:
            self.expected[sid] = dict(self.session_files)
            self.history.extend(self.session_files.values())
        finally:
            self.session.close()
            self.session = None

    @precondition(lambda self: self.session is not None)
    @rule()
    def abandon_session(self) -> None:
        """The second writer dies before its commit: what it uploaded is garbage."""
        assert self.session is not None
        self.session.close()
        self.session = None

    @precondition(lambda self: self.session is not None and self.PRUNE_WAITS)
    @rule()
    def prune_waiting_for_the_session(self) -> None:
        """Prune waits for the running writer, which commits meanwhile; then prune goes on."""
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["report"] = maintenance.prune(self._prune_repo(), wait=20)
            except BaseException as err:  # surfaced below
                result["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        while thread.is_alive():
            doc = self.writer._read_lock(PRUNE_LOCK)
            if doc and doc.get("doomed"):
                break  # published what it will delete, now waiting for us
            time.sleep(0.002)
        self._commit_session()
        thread.join(60)
        assert not thread.is_alive() and "report" in result, result

    @rule(run=st.sampled_from(["a", "b"]))
    def restore_newest(self, run: str) -> None:
        """A fresh machine restores the run: the newest snapshot, never a fallback."""
        mine = [s for s in Repository.open(self.backend).snapshots() if s.run == run]
        dest = self.tmp / f"restore-{self.n}"
        self.n += 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warns: that would be a failure here
            result = liferaft.Vault(self.url).restore(run=run, to=dest)
        if not mine:
            assert result is None
            return
        assert result is not None and result.snapshot.id == mine[-1].id
        (name,) = [r["name"] for r in result.snapshot.roots]
        assert _files(dest / name) == self.expected[mine[-1].id]
        shutil.rmtree(dest)

    # -- invariants

    @invariant()
    def every_snapshot_is_whole(self) -> None:
        repo = Repository.open(self.backend)
        assert {s.id for s in repo.snapshots()} == set(self.expected)
        report = maintenance.verify(repo, read_data=True)
        assert report.ok, report.damage
        for sid, content in self.expected.items():
            assert _restored(repo, sid, self.tmp / f"check-{sid[:12]}") == content


SM_SETTINGS = settings(
    max_examples=16,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_retention_state_machine() -> None:
    run_state_machine_as_test(RetentionMachine, settings=SM_SETTINGS)


class RacyPathsMachine(RetentionMachine):
    """The same, with the paths the bugs below live on: prune waiting for the open writer
    and going on after it commits, and a prune from a long-lived Repository (a notebook's
    ``Vault``) after other writers committed."""

    LONG_LIVED_PRUNER = True
    PRUNE_WAITS = True


def test_retention_state_machine_racy_paths() -> None:
    run_state_machine_as_test(
        RacyPathsMachine,
        settings=settings(SM_SETTINGS, max_examples=10, phases=[Phase.explicit, Phase.generate]),
    )


# ------------------------------------------------------------------ 4. create-only races


def _contend(backend: Backend, name: str, payloads: list[bytes], i: int, barrier: threading.Barrier, outcome: list[str]) -> None:
    barrier.wait()
    try:
        backend.put(name, payloads[i], overwrite=False)
        outcome[i] = "won"
    except ObjectExists:
        outcome[i] = "exists"
    except BaseException as err:
        outcome[i] = repr(err)


def test_create_only_put_has_exactly_one_winner(vault_url: str) -> None:
    backend = open_backend(vault_url)
    threads = 16
    here = isinstance(backend, LocalBackend) or vault_url.startswith("memory://")
    rounds, size = (12, 200_000) if here else (4, 64_000)  # object stores over loopback are slower
    for round_ in range(rounds):
        name = f"snapshots/race-{round_}.json"
        # Each contender's bytes are distinct everywhere, so a mix would show.
        payloads = [bytes([i]) * (size + i) for i in range(threads)]
        barrier = threading.Barrier(threads)
        outcome: list[str] = [""] * threads
        pool = [threading.Thread(target=_contend, args=(backend, name, payloads, i, barrier, outcome)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert sorted(outcome) == ["exists"] * (threads - 1) + ["won"], outcome
        assert backend.get(name) == payloads[outcome.index("won")]
    if isinstance(backend, LocalBackend):
        assert list(backend.list_temp()) == [], "losers left temp files behind"
    assert sorted(o.name for o in backend.list("snapshots/")) == sorted(f"snapshots/race-{i}.json" for i in range(rounds))


def test_concurrent_commits_of_manifests(vault_url: str, tmp_path: Path) -> None:
    v = liferaft.Vault(vault_url)
    v.snapshot([make_tree(tmp_path / "d", {"f": "x"})], run="r")
    repo = Repository.open(v.backend)
    base = repo.load_manifest(v.snapshots()[0].id)
    n = 12
    barrier = threading.Barrier(n)
    same: list[str] = [""] * n
    distinct: list[str] = [""] * n

    def commit(i: int) -> None:
        barrier.wait()
        same[i] = repo.commit(dict(base, step=1000))  # one manifest, committed by all
        distinct[i] = repo.commit(dict(base, step=i))  # one each

    pool = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(set(same)) == 1 and all(same)
    assert len(set(distinct)) == n
    fresh = Repository.open(open_backend(vault_url))
    steps = sorted(s.step for s in fresh.snapshots() if s.step is not None)
    assert steps == sorted([*range(n), 1000])
    for sid in {*same, *distinct}:
        raw = fresh.backend.get(f"snapshots/{sid}.json")
        assert fmt.hexdigest(raw) == sid  # whole, and exactly the bytes named
    assert maintenance.verify(fresh, read_data=True).ok


# ------------------------------------------------------------------ known bugs, minimal


def test_prune_that_waited_for_a_writer_keeps_what_it_committed(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "vault")
    repo = Repository.open(backend, create=True)
    with repo.session() as s:
        old = _commit_files(s, {"old": os.urandom(5000)}, "r")
    repo.forget([old])  # garbage, so prune has work to do
    writer = Repository.open(backend)
    session = writer.session()
    big = os.urandom(writer.pack_target + (1 << 20))  # a checkpoint bigger than a pack
    session.add(big)  # seals a full pack and uploads it while the snapshot goes on
    for fut in list(session._futures):
        fut.result()
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", maintenance.prune(Repository.open(backend), wait=30)))
    thread.start()
    while thread.is_alive():
        doc = writer._read_lock(PRUNE_LOCK)
        if doc and doc.get("doomed"):
            break  # prune has planned, published and is now waiting for this writer
        time.sleep(0.005)
    sid = _commit_files(session, {"big": big}, "w")
    session.close()
    thread.join(60)
    assert not thread.is_alive() and "r" in result
    _assert_healthy(backend, {sid: {"big": big}}, tmp_path / "back")


def test_prune_rewrites_a_fragment_naming_a_pack_it_did_not_list(tmp_path: Path) -> None:
    """A writer straddles prune's listing of packs: one pack uploaded before it, one after,
    and its index fragment names both; then it dies before its commit. The fragment is
    rewritten together with a live one: the replacement must stay readable, or the live
    snapshot's blobs drop out of the index."""
    backend = _small_pack_vault(str(tmp_path / "vault"))
    repo = Repository.open(backend)
    keep, drop = os.urandom(20_000), os.urandom(3_000)
    with repo.session() as s:
        first = _commit_files(s, {"keep": keep, "drop": drop}, "r")
    with repo.session() as s:
        second = _commit_files(s, {"keep": keep}, "r")  # shares the big blob, not the small one
    repo.forget([first])  # the pack holding "drop" is garbage: its fragment will be rewritten
    writer = Repository.open(backend)
    session = writer.session()
    session.add(os.urandom(20_000))  # sealed and uploaded now, before prune lists packs
    for fut in list(session._futures):
        fut.result()
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["report"] = maintenance.prune(Repository.open(backend), wait=30)
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        doc = writer._read_lock(PRUNE_LOCK)
        if doc and doc.get("doomed"):
            break  # packs listed, plan published: prune now waits for this writer
        time.sleep(0.005)
    session.add(os.urandom(2_000))
    session.add(os.urandom(2_000))  # a second pack, uploaded after prune listed packs
    session.flush()  # its fragment names both packs ...
    session.close()  # ... and then the writer dies without committing
    thread.join(60)
    assert not thread.is_alive() and "report" in result, result
    _assert_healthy(backend, {second: {"keep": keep}}, tmp_path / "back")


def test_prune_from_a_long_lived_vault_keeps_another_processes_snapshot(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a", {"f": os.urandom(5000)})
    b = make_tree(tmp_path / "b", {"g": os.urandom(5000)})
    url = str(tmp_path / "vault")
    notebook = liferaft.Vault(url)
    notebook.snapshot([a], run="a")
    assert notebook.restore(run="a", to=tmp_path / "back-a") is not None  # reads (and caches) the index
    liferaft.Vault(url).snapshot([b], run="b")  # another process commits meanwhile
    notebook.prune(wait=0)
    report = liferaft.Vault(url).verify(read_data=True)
    assert report.ok, report.damage


def test_writer_taken_for_dead_cannot_commit_after_it_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    heartbeat = 2.0
    monkeypatch.setattr(repository, "SESSION_REFRESH", heartbeat)  # instead of waiting 30 s for it
    backend = LocalBackend(tmp_path / "vault")
    repo = Repository.open(backend, create=True)
    data = os.urandom(5000)
    with repo.session() as s:
        old = _commit_files(s, {"x": data}, "r")
    writer = Repository.open(backend)
    session = writer.session()
    t0 = time.monotonic()
    session.add(data)  # deduplicated against the old snapshot's pack
    repo.forget([old])  # now only this writer needs that pack
    # The writer stalls (network down, VM paused) past STALE_AFTER: its lock ages.
    stale = time.time() - STALE_AFTER - 60
    backend.put(session.lock_name, json.dumps({"host": "h", "pid": 1, "started": stale, "refreshed": stale}).encode(), overwrite=True)
    os.utime(backend.root / session.lock_name, (stale, stale))
    report = maintenance.prune(Repository.open(backend), wait=0)
    if time.monotonic() - t0 > heartbeat * 0.8:
        pytest.skip("too slow to stage the stall before the heartbeat")
    assert report.packs_deleted >= 1  # prune took the writer for dead and deleted its pack
    time.sleep(heartbeat * 1.7 - (time.monotonic() - t0))  # the writer resumes: its heartbeat fires
    try:
        sid = _commit_files(session, {"x": data}, "r")
    except LiferaftError:
        return  # refused before committing: correct
    finally:
        session.close()
    _assert_healthy(backend, {sid: {"x": data}}, tmp_path / "back")


def test_prune_waits_for_a_running_writer_whose_clock_is_behind(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "vault")
    repo = Repository.open(backend, create=True)
    data = os.urandom(5000)
    with repo.session() as s:
        old = _commit_files(s, {"x": data}, "r")
    session = Repository.open(backend).session()
    session.add(data)  # deduplicated against the old snapshot's pack
    repo.forget([old])
    # The writer is alive and refreshing (the lock file was written just now, by the
    # store's clock), but its own clock is ten minutes slow: so is its "refreshed".
    skewed = time.time() - 600
    doc = {"host": "laptop", "pid": 1, "started": skewed, "refreshed": skewed}
    backend.put(session.lock_name, json.dumps(doc).encode(), overwrite=True)
    try:
        report = maintenance.prune(Repository.open(backend), wait=0)
        assert report.packs_deleted == 0, "prune deleted what a running writer deduplicated against"
    finally:
        session.close()


def test_long_lived_vault_restores_after_another_process_repacked(tmp_path: Path) -> None:
    work = make_tree(tmp_path / "w", {"big": os.urandom(400_000), "keep": os.urandom(5000)})
    url = str(tmp_path / "vault")
    notebook = liferaft.Vault(url)
    notebook.snapshot([work], run="r")
    (work / "big").unlink()
    newest = notebook.snapshot([work], run="r")
    assert notebook.restore(run="r", to=tmp_path / "first") is not None  # index cached
    _gone, report = liferaft.Vault(url).forget(run="r", keep_last=1, prune=True)  # another process
    assert report is not None and report.packs_repacked >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = notebook.restore(run="r", to=tmp_path / "second")
    assert result is not None and result.snapshot.id == newest.id
    assert _files(tmp_path / "second" / "w") == {"keep": (work / "keep").read_bytes()}


_CREATE = """
import os, sys
from liferaft.backends import open_backend
from liferaft.vault.repository import Repository
go, vault, ready = sys.argv[1:4]
backend = open_backend(vault)
open(ready, "w").close()
while not os.path.exists(go):
    pass
print(Repository.open(backend, create=True).id)
"""


def test_processes_creating_one_vault_at_once(tmp_path: Path) -> None:
    for trial in range(4):
        vault = tmp_path / f"vault-{trial}"
        go = tmp_path / f"go-{trial}"
        procs, ready = [], []
        for i in range(3):
            ready.append(tmp_path / f"ready-{trial}-{i}")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _CREATE, str(go), str(vault), str(ready[-1])],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        while not all(r.exists() for r in ready):
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=60) for p in procs]
        for p, (_out, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err.strip().splitlines()[-1]
        assert len({out.strip() for out, _err in results}) == 1  # all use the one vault


def test_vault_folder_with_only_an_interrupted_create_is_usable(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    (vault / ".tmp-0123456789abcdef").write_bytes(b'{"format": 1')  # config.json being written
    snap = liferaft.Vault(str(vault)).snapshot([make_tree(tmp_path / "d", {"f": "x"})], run="r")
    assert liferaft.Vault(str(vault)).snapshots()[0].id == snap.id


_HOLD_SESSION = """
import sys, time
from liferaft.backends import LocalBackend
from liferaft.vault.repository import Repository
session = Repository.open(LocalBackend(sys.argv[1])).session()
session.add(bytes.fromhex(sys.argv[2]))  # deduplicated against the forgotten snapshot's pack
print(session.lock_name, flush=True)
time.sleep(120)
"""


def test_prune_does_not_wait_for_a_writer_killed_on_this_machine(tmp_path: Path) -> None:
    """A SIGKILLed writer's lock is fresh for 5 minutes; its pid, gone in this pid scope,
    says at once that it is dead. A live writer, and one of another scope (another
    machine or container, whose pids mean nothing here), are still waited for."""
    backend = LocalBackend(tmp_path / "vault")
    repo = Repository.open(backend, create=True)
    data = os.urandom(5000)
    with repo.session() as s:
        old = _commit_files(s, {"x": data}, "r")
    repo.forget([old])

    def hold() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen([sys.executable, "-c", _HOLD_SESSION, str(backend.root), data.hex()], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    live, live_lock = hold()
    killed, killed_lock = hold()
    try:
        killed.kill()
        killed.wait()
        report = maintenance.prune(Repository.open(backend), wait=0)
        assert report.packs_deleted == 0, "prune deleted a pack that a live writer deduplicated against"
        assert len(report.waiting_on) == 1 and str(live.pid) in report.waiting_on[0]
        assert not backend.exists(killed_lock) and backend.exists(live_lock)

        # The same dead pid, stamped with another pid scope: only its age can tell.
        doc = json.loads(backend.get(live_lock))
        doc.update(pid=killed.pid, scope="0badf00d" if doc["scope"] != "0badf00d" else "0badf00e")
        backend.put(killed_lock, json.dumps(doc).encode(), overwrite=True)
    finally:
        live.kill()
        live.wait()
    report = maintenance.prune(Repository.open(backend), wait=0)
    assert report.packs_deleted == 0 and len(report.waiting_on) == 1, report.to_json()
    assert backend.exists(killed_lock) and not backend.exists(live_lock)
    backend.delete(killed_lock)
    report = maintenance.prune(Repository.open(backend), wait=0)
    assert report.packs_deleted == 1 and not report.waiting_on


def test_a_prune_killed_on_this_machine_does_not_hold_the_next_one(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "vault")
    repo = Repository.open(backend, create=True)
    with repo.session() as s:
        old = _commit_files(s, {"x": os.urandom(5000)}, "r")
    repo.forget([old])
    code = (
        "import sys, time\n"
        "from liferaft.backends import LocalBackend\n"
        "from liferaft.vault.repository import Repository\n"
        "from liferaft.vault.maintenance import _PruneLock\n"
        "_PruneLock(Repository.open(LocalBackend(sys.argv[1]))).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(backend.root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    with pytest.raises(LiferaftError, match="a prune is already running"):
        maintenance.prune(Repository.open(backend), wait=0)
    proc.kill()
    proc.wait()
    assert backend.exists(PRUNE_LOCK)  # fresh, and nobody removed it
    report = maintenance.prune(Repository.open(backend), wait=0)
    assert report.packs_deleted == 1
