"""Cloud vaults on real protocols: corruption through the store's API, create-only races,
and one clear line for a missing bucket, wrong credentials or an unreachable endpoint.

The servers (moto, ``rclone serve s3``, fake-gcs-server) run on 127.0.0.1; see
tests/servers.py. The round-trip and dedup tests of test_vault.py run on them through
the ``vault_url`` fixture; crash and fault tests are in test_cloud_crash.py and
test_cloud_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import liferaft
from conftest import make_tree, tree_state
from liferaft.backends import Backend, BackendError, ObjectExists, open_backend
from liferaft.backends.objectstore import ObjectStoreBackend, _clean, _is_credentials, _is_transient
from liferaft.errors import LiferaftError, VaultCorrupt, VaultUnreachable
from liferaft.vault.repository import SnapshotInfo, pack_name
from servers import ACCESS_KEY, KINDS, SECRET_KEY, StoreServer, free_port, start_server

# ---------------------------------------------------------------- helpers


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> StoreServer:
    """One of the real-protocol servers, with this test's environment pointing at it."""
    srv: StoreServer = request.getfixturevalue(f"{request.param}_server")
    srv.apply(monkeypatch)
    return srv


def _two_snapshots(url: str, tmp_path: Path) -> tuple[liferaft.Vault, Path, dict, list[SnapshotInfo]]:
    vault = liferaft.Vault(url)
    work = make_tree(tmp_path / "work" / "ckpt", {"model.bin": os.urandom(300_000), "notes.txt": "v1"})
    s1 = vault.snapshot([work], run="r", step=1)
    state1 = tree_state(work)
    (work / "model.bin").write_bytes(os.urandom(300_000))
    (work / "notes.txt").write_text("v2")
    s2 = vault.snapshot([work], run="r", step=2)
    return vault, work, state1, [s1, s2]


def _blob_location(vault: liferaft.Vault, snap: SnapshotInfo, path: str) -> tuple[str, int, int]:
    repo = vault.repository()
    entry = next(e for e in repo.read_tree(snap) if e.path == path)
    pack_id, _codec, offset, length, _raw = repo.index()[bytes.fromhex(entry.blobs[0])]
    return pack_id, offset, length


def _rewrite(backend: Backend, name: str, change: object) -> None:
    """Damage an object the way a store can: read it, change it, put it back over itself."""
    data = bytearray(backend.get(name))
    if isinstance(change, int):
        data[change] ^= 0x40
    elif callable(change):
        data = bytearray(change(bytes(data)))
    backend.put(name, bytes(data), overwrite=True)


# ---------------------------------------------------------------- corruption, on every backend


def test_flipped_byte_in_the_store_is_named_and_restore_falls_back(vault_url: str, tmp_path: Path) -> None:
    vault, work, state1, (s1, s2) = _two_snapshots(vault_url, tmp_path)
    pack_id, offset, length = _blob_location(vault, s2, "ckpt/model.bin")
    assert pack_id != _blob_location(vault, s1, "ckpt/model.bin")[0]
    _rewrite(vault.backend, pack_name(pack_id), offset + length // 2)

    fresh = liferaft.Vault(vault_url)
    assert fresh.verify().ok  # the structure is intact: only reading the data can tell
    report = fresh.verify(read_data=True)
    assert not report.ok and report.damaged_snapshots == {s2.id}
    assert any(pack_id in d and s2.short_id in d for d in report.damage), report.damage

    (work / "notes.txt").write_text("local edit")
    before = tree_state(work)
    with pytest.raises(VaultCorrupt, match="does not match its hash"):
        fresh.restore(s2.id)  # in place, all or nothing
    assert tree_state(work) == before

    with pytest.warns(UserWarning, match=f"snapshot {s2.short_id}.*failed verification"):
        result = liferaft.Vault(vault_url).restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == s1.id and result.fallbacks
    assert tree_state(tmp_path / "back" / "ckpt") == state1


def test_truncated_and_missing_packs_are_found_then_forgotten_and_pruned(vault_url: str, tmp_path: Path) -> None:
    vault, _work, state1, (s1, s2) = _two_snapshots(vault_url, tmp_path)
    pack_id, _offset, _length = _blob_location(vault, s2, "ckpt/model.bin")
    name = pack_name(pack_id)
    _rewrite(vault.backend, name, lambda data: data[: len(data) // 3])
    report = liferaft.Vault(vault_url).verify()
    assert any("truncated" in d and s2.short_id in d for d in report.damage), report.damage
    with pytest.warns(UserWarning):
        result = liferaft.Vault(vault_url).restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == s1.id
    assert tree_state(tmp_path / "back" / "ckpt") == state1

    vault.backend.delete(name)
    report = liferaft.Vault(vault_url).verify()
    assert any("missing" in d and s2.short_id in d for d in report.damage), report.damage
    # The way out: forget the damaged snapshot, prune, and the vault is whole again.
    liferaft.Vault(vault_url).forget_ids([s2.id])
    liferaft.Vault(vault_url).prune(wait=0)
    healed = liferaft.Vault(vault_url)
    assert healed.verify(read_data=True).ok
    assert [s.id for s in healed.snapshots()] == [s1.id]


def test_tampered_manifest_and_index_are_reported_and_skipped(vault_url: str, tmp_path: Path) -> None:
    vault, _work, state1, (s1, s2) = _two_snapshots(vault_url, tmp_path)
    manifest = f"snapshots/{s2.id}.json"

    def restep(data: bytes) -> bytes:
        doc = json.loads(data)
        doc["step"] = 999  # the name no longer matches the bytes
        return json.dumps(doc).encode()

    _rewrite(vault.backend, manifest, restep)
    assert [s.id for s in liferaft.Vault(vault_url).snapshots()] == [s1.id]
    report = liferaft.Vault(vault_url).verify()
    assert any(s2.short_id in d and "hash" in d for d in report.damage), report.damage
    result = liferaft.Vault(vault_url).restore(run="r", to=tmp_path / "back")
    assert result is not None and result.snapshot.id == s1.id
    assert tree_state(tmp_path / "back" / "ckpt") == state1

    fragment = next(iter(vault.backend.list("index/"))).name
    _rewrite(vault.backend, fragment, 10)
    report = liferaft.Vault(vault_url).verify()
    assert any(fragment in d for d in report.damage), report.damage


# ---------------------------------------------------------------- create-only races between processes

RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from liferaft.backends import ObjectExists, open_backend
    url, tag, go, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    backend = open_backend(url)
    backend.capabilities  # probe (if any) before the start line
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    won = []
    for i in range(rounds):
        try:
            backend.put(f"snapshots/race-{i}.json", (tag * 40_000).encode() + str(i).encode(), overwrite=False)
            won.append(i)
        except ObjectExists:
            pass
    print(json.dumps(won), flush=True)
    """
)


def _race(url: str, tmp_path: Path, rounds: int) -> tuple[list[int], list[int]]:
    """Two processes put the same names create-only, released by one file at once."""
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, url, tag, str(go), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    try:
        for p in racers:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", (line, p.stderr.read() if p.stderr else "")
        go.touch()
        outs = [p.communicate(timeout=240) for p in racers]
    finally:
        for p in racers:
            if p.poll() is None:
                p.kill()
    for p, (_out, err) in zip(racers, outs, strict=True):
        assert p.returncode == 0, err
    won_a, won_b = (json.loads(out.strip().splitlines()[-1]) for out, _err in outs)
    return won_a, won_b


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["moto", "gcs"])
def test_two_writer_processes_racing_on_names_exactly_one_wins(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    srv: StoreServer = request.getfixturevalue(f"{kind}_server")
    srv.apply(monkeypatch)
    url = srv.vault_url()
    backend = open_backend(url)
    assert backend.capabilities.create_only
    rounds = 20
    won_a, won_b = _race(url, tmp_path, rounds)
    assert not set(won_a) & set(won_b), "both writers were told they created the same name"
    assert sorted(won_a + won_b) == list(range(rounds)), "a name nobody won"
    for i in range(rounds):
        tag = "A" if i in won_a else "B"
        assert backend.get(f"snapshots/race-{i}.json") == (tag * 40_000).encode() + str(i).encode()
    # And within one process, a taken name stays taken.
    with pytest.raises(ObjectExists):
        backend.put("snapshots/race-0.json", b"late", overwrite=False)


@pytest.mark.slow
def test_rclone_has_no_create_only_and_what_still_holds(
    rclone_server: StoreServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """rclone serve s3 ignores If-None-Match. The probe must notice, and then:
    a taken name is refused when it is seen first (not atomic), racing writers each leave
    one whole object (never a mix), and the vault stays correct because its names are
    content hashes (same name, same bytes)."""
    rclone_server.apply(monkeypatch)
    url = rclone_server.vault_url()
    backend = open_backend(url)
    assert backend.capabilities.create_only is False
    backend.put("snapshots/taken.json", b"first", overwrite=False)
    with pytest.raises(ObjectExists):
        backend.put("snapshots/taken.json", b"second", overwrite=False)
    assert backend.get("snapshots/taken.json") == b"first"

    rounds = 20
    won_a, won_b = _race(url, tmp_path, rounds)
    assert set(won_a) | set(won_b) == set(range(rounds)), "a name nobody won"
    for i in range(rounds):
        data = backend.get(f"snapshots/race-{i}.json")
        assert data in ((t * 40_000).encode() + str(i).encode() for t in "AB"), "a torn or mixed object"
    # Two writers creating one vault and committing into it at once: both commit (each may
    # believe it wrote config.json: the last one stays, which costs dedup, not correctness).
    url = rclone_server.vault_url()
    work = [make_tree(tmp_path / f"w{i}", {"f": os.urandom(200_000), "same": "shared"}) for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "liferaft", "--vault", url, "snapshot", str(w), "--run", f"r{i}"], stderr=subprocess.PIPE)
        for i, w in enumerate(work)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    vault = liferaft.Vault(url)
    assert sorted(s.run for s in vault.snapshots()) == ["r0", "r1"]
    assert vault.verify(read_data=True).ok


# ---------------------------------------------------------------- one clear line from the CLI


def _cli_all(cases: dict[str, tuple[dict[str, str], list[str]]], timeout: float = 240) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run CLI cases at once (each waits on the network or a retry deadline, not the CPU)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION"))}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "liferaft", *args],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (env, args) in cases.items()
    }
    out = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=timeout)
            out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return out


def _one_clear_line(r: subprocess.CompletedProcess[str], *needles: str, secrets: tuple[str, ...] = (SECRET_KEY,)) -> None:
    text = r.stdout + r.stderr
    assert r.returncode != 0, text
    assert "Traceback" not in text, text
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("liferaft: error: "), text
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for secret in secrets:
        assert secret not in text, "a secret in the output"


def test_missing_bucket_and_unreachable_endpoint_are_one_clear_line(server: StoreServer, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"f": "1"})
    missing = f"{server.scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/vault"
    dead = server.env(f"http://127.0.0.1:{free_port()}")
    dead["LIFERAFT_RETRY_DEADLINE"] = "1"
    url = server.vault_url()
    started = time.monotonic()
    results = _cli_all(
        {
            "list-missing": (server.env(), ["--vault", missing, "snapshots"]),
            "snapshot-missing": (server.env(), ["--vault", missing, "snapshot", str(src)]),
            "bad-name": (server.env(), ["--vault", f"{server.scheme}://No_Such.Bucket-{uuid.uuid4().hex[:8]}/vault", "snapshots"]),
            "restore-dead": (dead, ["--vault", url, "restore", "--run", "r", "--to", str(tmp_path / "o")]),
        }
    )
    make = "gcloud storage buckets create" if server.kind == "gcs" else "aws s3 mb"
    for name in ("list-missing", "snapshot-missing"):
        _one_clear_line(results[name], "does not exist", f"{make} {missing.rsplit('/', 1)[0]}")
    # A new bucket cannot have that name: the advice names one it can (S3 takes no underscores; GCS does).
    bad = results["bad-name"]
    _one_clear_line(bad, "does not exist", "a new bucket's name is 3-63 lowercase letters")
    assert f"{make} {server.scheme}://no{'_' if server.kind == 'gcs' else '-'}such.bucket-" in bad.stderr, bad.stderr
    _one_clear_line(results["restore-dead"], "still failing", "check the network and the endpoint", "committed snapshots are intact")
    assert time.monotonic() - started < 120, "the retry deadline was not kept"
    assert not (tmp_path / "o").exists(), "a failed restore created its target"


def test_wrong_or_missing_s3_credentials_and_bad_settings_are_one_clear_line(rclone_server: StoreServer, tmp_path: Path) -> None:
    """rclone checks signatures (moto and fake-gcs-server accept anything, so they cannot)."""
    url = rclone_server.vault_url()
    wrong_secret = "wrong-secret-" + uuid.uuid4().hex
    wrong = dict(rclone_server.env(), AWS_SECRET_ACCESS_KEY=wrong_secret)
    none = {
        "AWS_ENDPOINT_URL": rclone_server.endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    src = make_tree(tmp_path / "src", {"f": "1"})
    results = _cli_all(
        {
            "wrong-list": (wrong, ["--vault", url, "snapshots"]),
            "wrong-snapshot": (wrong, ["--vault", url, "snapshot", str(src)]),
            "none": (none, ["--vault", url, "snapshots"]),
            "bad-deadline": ({**rclone_server.env(), "LIFERAFT_RETRY_DEADLINE": "soon"}, ["--vault", url, "snapshots"]),
        }
    )
    for name in ("wrong-list", "wrong-snapshot"):
        _one_clear_line(results[name], "access denied", "AWS_ACCESS_KEY_ID", secrets=(SECRET_KEY, wrong_secret))
    _one_clear_line(results["none"], "found no credentials", "AWS_ACCESS_KEY_ID")
    _one_clear_line(results["bad-deadline"], "LIFERAFT_RETRY_DEADLINE must be a number of seconds")
    assert ACCESS_KEY not in results["none"].stderr


def _iam_moto(users: dict[str, list[str]]) -> tuple[StoreServer, dict[str, dict[str, str]]]:
    """A moto server of its own that enforces IAM, with one user per entry of ``users``
    (allowed those S3 actions) and a bucket; returns it and each user's client env.

    moto lets the first INITIAL_NO_AUTH_ACTION_COUNT requests through unsigned-for: its
    readiness probe, then the setup below; every request after is checked against the
    users' policies (the session's servers stay open, so this one is separate)."""
    import boto3

    setup = 1 + 3 * len(users) + 1  # the probe, user + policy + key each, the bucket
    server = start_server("moto", extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": str(setup)})
    try:
        kw = {"endpoint_url": server.endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **kw)
        envs = {}
        for name, actions in users.items():
            iam.create_user(UserName=name)
            doc = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps(doc))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            envs[name] = dict(server.env(), AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        boto3.client("s3", **kw).create_bucket(Bucket=server.bucket)
    except BaseException:
        server.stop()
        raise
    return server, envs


def test_read_only_bucket_credentials_stop_liferaft_run_before_the_command(tmp_path: Path) -> None:
    # Credentials that may list and read but not write (a teammate's vault, a scoped key):
    # every read passes, so only the start's write probe can tell, on a real S3 server
    # that enforces the users' policies.
    server, env = _iam_moto({"writer": ["s3:*"], "reader": ["s3:GetObject", "s3:ListBucket"]})
    try:
        url = f"s3://{server.bucket}/team"
        work = make_tree(tmp_path / "work" / "ckpt", {"state.json": '{"step": 3}'}).parent
        r = _cli_all({"write": (env["writer"], ["--vault", url, "snapshot", str(work / "ckpt"), "--run", "work"])})["write"]
        assert r.returncode == 0, r.stderr
        (work / "ckpt" / "state.json").unlink()
        (work / "ckpt").rmdir()
        results = _cli_all(
            {
                "list": (env["reader"], ["--vault", url, "snapshots", "--json"]),
                "snapshot": (env["reader"], ["--vault", url, "snapshot", str(tmp_path / "work"), "--run", "other"]),
            }
        )
        assert results["list"].returncode == 0 and [s["run"] for s in json.loads(results["list"].stdout)] == ["work"]
        secret = env["reader"]["AWS_SECRET_ACCESS_KEY"]
        _one_clear_line(results["snapshot"], "access denied", secrets=(secret,))

        def run(*extra: str) -> subprocess.CompletedProcess[str]:
            marker = "import pathlib; pathlib.Path('started').write_text(pathlib.Path('ckpt/state.json').read_text())"
            argv = [sys.executable, "-m", "liferaft", "--vault", url, "run", "--run", "work", "--keep", "ckpt", *extra, "--"]
            base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            return subprocess.run(
                [*argv, sys.executable, "-c", marker], cwd=work, env={**base, **env["reader"]}, capture_output=True, text=True, timeout=240
            )

        r = run()
        _one_clear_line(
            r, f"the vault at {url} can be read but not written", "the command was not started", "--offline-ok", secrets=(secret,)
        )
        assert not (work / "started").exists() and not (work / "ckpt").exists()
        # --offline-ok: restored from the vault it can read, then started
        r = run("--offline-ok")
        assert r.returncode == 0, r.stderr
        assert "can be read but not written" in r.stderr and (work / "started").read_text() == '{"step": 3}', r.stderr
        listing = _cli_all({"list": (env["writer"], ["--vault", url, "snapshots", "--json"])})["list"]
        assert [s["run"] for s in json.loads(listing.stdout)] == ["work"]  # the reader wrote nothing
    finally:
        server.stop()


def test_bad_gcs_key_files_are_one_clear_line(tmp_path: Path) -> None:
    """Credentials are loaded before any request: no server needed, and none reached."""
    broken = tmp_path / "key.json"
    private = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-not-a-real-key"
    broken.write_text(
        json.dumps({"type": "service_account", "private_key": f"-----BEGIN PRIVATE KEY-----\n{private}\n", "client_email": "x@y"})
    )
    results = _cli_all(
        {
            "absent": ({"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "absent.json")}, ["--vault", "gs://bucket/v", "snapshots"]),
            "broken": ({"GOOGLE_APPLICATION_CREDENTIALS": str(broken)}, ["--vault", "gs://bucket/v", "snapshots"]),
        }
    )
    _one_clear_line(results["absent"], "absent.json", "not a file", secrets=(private,))
    _one_clear_line(results["broken"], "cannot be loaded", "key.json", "GOOGLE_APPLICATION_CREDENTIALS", secrets=(private,))


def test_errors_in_the_api_are_liferaft_errors(server: StoreServer) -> None:
    """What the CLI prints is what the API raises: a LiferaftError (one line), never a raw client error."""
    missing = f"{server.scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/vault"
    with pytest.raises(LiferaftError, match="does not exist") as info:
        liferaft.Vault(missing).snapshots()
    assert "\n" not in str(info.value)
    backend = open_backend(server.vault_url())
    backend.put("x", b"0123456789")
    assert backend.get("x", 4, 100) == b"456789"
    assert backend.get("x", 10, 5) == b"" and backend.get("x", 50, 5) == b""  # past the end: a short read


def test_objects_another_machine_wrote_after_a_listing_are_seen(server: StoreServer) -> None:
    """A long-lived vault must see what other writers added: fsspec's listings cache would
    answer a whole-object read from a stale listing ("not found": a missing pack)."""
    backend = open_backend(server.vault_url())
    backend.put("packs/ab/first", b"1")
    assert [o.name for o in backend.list("packs/")] == ["packs/ab/first"]
    assert backend.exists("packs/ab/first") and not backend.exists("packs/ab/second")
    other = server.raw_fs()  # another machine: its own client
    other.pipe_file(f"{backend.root}/packs/ab/second", b"2" * 100)  # type: ignore[attr-defined]
    assert backend.get("packs/ab/second") == b"2" * 100
    assert backend.exists("packs/ab/second") and backend.stat("packs/ab/second").size == 100
    assert [o.name for o in backend.list("packs/")] == ["packs/ab/first", "packs/ab/second"]
    other.rm_file(f"{backend.root}/packs/ab/first")  # type: ignore[attr-defined]
    assert not backend.exists("packs/ab/first")
    assert [o.name for o in backend.list("packs/")] == ["packs/ab/second"]


# ---------------------------------------------------------------- the retry loop itself (no server)


def _offline_backend(deadline: float) -> ObjectStoreBackend:
    return ObjectStoreBackend("s3://bucket/vault", retry_deadline=deadline, create_only=True, endpoint_url="http://127.0.0.1:9")


def test_transient_failures_are_retried_until_they_pass() -> None:
    backend = _offline_backend(30)
    failures = [ConnectionResetError(104, "reset by peer"), TimeoutError("read timed out")]

    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    assert backend._retry("testing", flaky) == "done" and not failures


def test_a_failure_that_persists_gives_up_at_the_deadline_with_one_line() -> None:
    backend = _offline_backend(1.5)
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")

    started = time.monotonic()
    with pytest.raises(VaultUnreachable) as info:
        backend._retry("reading config.json", down)
    assert time.monotonic() - started <= 1.5 + 0.5
    assert len(calls) >= 2, "no retry before giving up"
    assert "still failing after" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, BackendError)  # the repository's handlers see it too


def test_permanent_failures_are_not_retried() -> None:
    backend = _offline_backend(30)
    calls = []

    def refused() -> None:
        calls.append(1)
        raise ValueError("Bad Request: invalid argument")

    with pytest.raises(LiferaftError, match="the store refused testing"):
        backend._retry("testing", refused)
    assert calls == [1]

    def bug() -> None:
        raise TypeError("a bug, not the store")

    with pytest.raises(TypeError):  # never disguised as a store error
        backend._retry("testing", bug)


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (ConnectionResetError(104, "reset"), True),
        (OSError("An error occurred (SlowDown) when calling the PutObject operation"), True),
        (OSError("An error occurred (ServiceUnavailable)"), True),
        (FileNotFoundError("x"), False),
        (PermissionError("Forbidden"), False),
        (OSError(22, "The requested range is not satisfiable"), False),
        (ValueError("Bad Request"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(err: BaseException, transient: bool) -> None:
    assert _is_transient(err) is transient


def test_client_library_errors_are_classified() -> None:
    from aiohttp import ClientPayloadError
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    from gcsfs.retry import HttpError

    assert _is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert _is_transient(ClientPayloadError("Response payload is not completed"))
    assert _is_transient(HttpError({"code": 503, "message": "backend error"}))
    assert _is_transient(HttpError({"code": 429, "message": "rate"}))
    assert not _is_transient(HttpError({"code": 404, "message": "nope"}))
    throttled = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    assert _is_transient(throttled)
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert not _is_transient(denied) and _is_credentials(denied)
    assert _is_credentials(NoCredentialsError())
    assert not _is_credentials(HttpError({"code": 401, "message": "Invalid Credentials"}))  # an expired token: refreshed


def test_secrets_are_cut_from_quoted_errors() -> None:
    text = _clean(OSError("GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeefcafe failed"))
    assert "deadbeefcafe" not in text and "X-Amz-Signature=…" in text
    assert "ya29.secret" not in _clean(ValueError("refresh failed: access_token=ya29.secret"))


def test_a_probe_left_by_a_killed_writer_does_not_spoil_the_location(
    rclone_server: StoreServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The create-only probe writes locks/.probe-*; a writer killed mid-probe leaves it behind.
    The location must still count as empty (a new vault goes there) and the probe stays unlisted."""
    rclone_server.apply(monkeypatch)
    url = rclone_server.vault_url()
    rclone_server.raw_fs().pipe_file(f"{url.split('://', 1)[1]}/locks/.probe-0123abcd", b"1")
    backend = open_backend(url)
    assert backend.is_empty() and list(backend.list("locks/")) == []
    snap = liferaft.Vault(url).snapshot([make_tree(tmp_path / "d", {"f": "x"})], run="r")
    assert [s.id for s in liferaft.Vault(url).snapshots()] == [snap.id]
