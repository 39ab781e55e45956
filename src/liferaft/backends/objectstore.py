"""Vaults in object stores: ``gs://bucket/prefix`` (gcsfs) and ``s3://bucket/prefix`` (s3fs).

The commit point is create-only on both: ``ifGenerationMatch=0`` on GCS and
``If-None-Match: *`` on S3 (fsspec's ``mode="create"``). Some S3-compatible servers
ignore that precondition; such a store is detected by a probe the first time
``capabilities`` is asked for, and the vault then relies on unique names (see the
README's "Cloud vaults" section for exactly what holds there).

Transient failures (reset connections, timeouts, 429, 5xx) are retried with
exponential backoff and full jitter under a total deadline; then one clear error.
Credentials are never printed, logged or stored.

A store that stops answering must not hold a call for longer than its timeouts. The
clients' own timeouts (aiohttp's sock_connect and sock_read, under botocore and gcsfs)
start the read timeout only once a request body is sent: against a frozen server (the
connection accepted by its kernel, nothing read) an S3 PUT waited for ever for the
"100 Continue" botocore asks for, and a GCS upload for socket buffers that never drain.
So:

* S3 bodies go out without ``Expect: 100-continue`` (see ``_without_expect_continue``);
* no progress: every connection is opened with TCP_USER_TIMEOUT set to the read
  timeout (where the platform has it: Linux), so the kernel drops a connection whose
  sent bytes go unacknowledged that long; a slow upload that keeps moving is never cut;
* every call has a whole-call limit, enforced in fsspec's event loop, that grows with
  the bytes it moves (a floor rate of ``MIN_TRANSFER_RATE``): the backstop where the
  kernel cannot help (other platforms, a blocked token refresh, a client that waits
  on something else).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import inspect
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

from ..errors import BadVaultURL, LiferaftError, VaultUnreachable
from .base import Backend, BackendError, Capabilities, ObjectExists, ObjectInfo, ObjectNotFound, StoreError
from .fsspec_backend import _mtime

T = TypeVar("T")

DEFAULT_DEADLINE = 120.0
PART_SIZE = 32 << 20  # S3: objects under 64 MiB (every pack) go up in one PUT; larger ones in 32 MiB parts
GCS_RESUMABLE_FROM = 64 << 20  # GCS: smaller objects (every pack) go up in one request
CONNECT_TIMEOUT = 10
PROBE_PREFIX = "locks/.probe-"  # the create-only probe's objects: never listed
READ_TIMEOUT = 60  # seconds without a byte from the server (or, sending, without an ACK): the attempt fails
CLIENT_TRIES = 2  # tries inside one client call (botocore's total_max_attempts, gcsfs's retries), set below
CALL_SLACK = 5.0  # seconds on top of a call's limit: the client's backoff between its tries, scheduling
MIN_TRANSFER_RATE = 32 << 10  # bytes/s: a call moving N bytes may take N / this on top (256 kbit/s)
CANCEL_GRACE = 5.0  # seconds a cancelled call gets to close its connection before we stop waiting


class CredentialsError(StoreError):
    """The store refused our credentials (or we have none)."""


def new_bucket_name(scheme: str, name: str) -> str:
    """``name`` if a new bucket may have it, else the nearest name one may, or "" if none is near.

    The rules for new buckets (S3: 3-63 lowercase letters, digits, dots and hyphens; GCS
    also takes underscores), which are stricter than for old ones: an old S3 bucket may
    be ``My_Bucket``, so a vault URL is never refused for its name, only the advice to
    create it is kept to names the store accepts.
    """
    allowed = "a-z0-9._-" if scheme == "gcs" else "a-z0-9.-"
    rule = re.compile(f"[a-z0-9][{allowed}]{{1,61}}[a-z0-9]")
    if rule.fullmatch(name):
        return name
    near = re.sub(f"[^{allowed}]", "-", name.lower()).strip(".-_")
    return near if rule.fullmatch(near) else ""


class BucketNotFound(StoreError):
    """The bucket in the vault URL does not exist."""


class StoreUnreachable(StoreError, VaultUnreachable):
    """Transient failures went on past the retry deadline."""


class CallTimeout(TimeoutError):
    """One call to the store ran past its whole-call limit and was cancelled (transient)."""


# Failures worth another try, by class name anywhere in the exception's MRO (so that
# botocore, aiohttp, requests and google-auth need not be imported to classify them).
_TRANSIENT_CLASSES = frozenset(
    {
        # botocore
        "HTTPClientError",
        "ConnectionClosedError",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ProxyConnectionError",
        # aiohttp
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ServerTimeoutError",
        # requests / urllib3 (gcsfs raises requests' ProxyError for a 502)
        "ChunkedEncodingError",
        "ProxyError",
        "ReadTimeout",
        "ConnectTimeout",
        "ProtocolError",
        # gcsfs
        "ChecksumError",
    }
)
_TRANSIENT_CODES = ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "RequestLimitExceeded")


def _status(err: BaseException) -> int | None:
    for attr in ("code", "status"):
        value = getattr(err, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    return None


def _is_transient(err: BaseException) -> bool:
    """Worth another try: connection trouble, timeouts, throttling, server errors."""
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if {c.__name__ for c in type(err).__mro__} & _TRANSIENT_CLASSES:
        return True
    status = _status(err)
    if status is not None and status >= 100:
        return status in (408, 429) or status >= 500
    if type(err).__name__ == "RefreshError":  # google-auth could not refresh a token: network, or bad key
        return not _is_credentials(err)
    if isinstance(err, OSError):
        if err.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return True
        # s3fs and gcsfs wrap server errors into plain OSErrors with the message only.
        text = str(err)
        return any(
            word in text
            for word in (*_TRANSIENT_CODES, "503", "500", "502", "504", "429", "Timeout", "timed out", "reset by peer", "Connection")
        )
    return False


def _from_the_store(err: BaseException) -> bool:
    """An answer from the store or its client library (not a bug such as a TypeError)."""
    if isinstance(err, (OSError, ValueError)):
        return True
    module = type(err).__module__ or ""
    return module.split(".", 1)[0] in ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "requests", "urllib3")


def _is_range_past_end(err: BaseException) -> bool:
    """A ranged read that starts at or past the end of the object (HTTP 416)."""
    return _status(err) == 416 or "InvalidRange" in str(err) or "range is not satisfiable" in str(err)


class ObjectStoreBackend(Backend):
    """Objects under ``bucket/prefix`` of a GCS or S3(-compatible) store."""

    remote = True

    def __init__(self, url: str, *, deadline: float | None = None, **options: Any) -> None:
        parsed = urlparse(url)
        self.scheme = "gcs" if parsed.scheme in ("gs", "gcs") else "s3"
        self.bucket = parsed.netloc
        if not self.bucket:
            raise BadVaultURL(f"no bucket in {url!r}", f"write {parsed.scheme}://BUCKET/prefix")
        self.prefix = parsed.path.strip("/")
        self.root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        self.url = url
        self.deadline = _deadline(deadline if deadline is not None else options.pop("retry_deadline", None))
        self._create_only: bool | None = options.pop("create_only", None)
        self._bucket_seen = False  # a GCS 404 does not say whether the object or the bucket is missing
        self.endpoint: str | None = None
        self.timeouts = (float(CONNECT_TIMEOUT), float(READ_TIMEOUT))  # (connect, no progress), as configured
        self.fs = self._make_fs(options)

    # ------------------------------------------------------------ setup

    def _make_fs(self, options: dict[str, Any]) -> Any:
        if self.scheme == "gcs":
            opts = dict(options)
            emulator = os.environ.get("STORAGE_EMULATOR_HOST")
            if emulator:
                if "://" not in emulator:
                    emulator = f"http://{emulator}"
                self.endpoint = opts.setdefault("endpoint_url", emulator)  # also keys fsspec's instance cache
                opts.setdefault("token", "anon")
            else:
                self.endpoint = opts.get("endpoint_url")
                if "token" not in opts:
                    opts["token"] = gcs_token()
                    if opts["token"] == os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
                        self._key_file = opts["token"]
            opts.setdefault("requests_timeout", _aiohttp_timeout())
            self.timeouts = _gcs_timeouts(opts["requests_timeout"])
            opts.setdefault("use_listings_cache", False)  # see the S3 case below
            _quiet_library_logs("gcsfs")
            try:
                return _gcs_class()(**opts)
            except LiferaftError:
                raise
            except Exception as err:  # a key file that is not one, a bad token
                token = opts.get("token")
                source = f"the key file {token!r}" if isinstance(token, str) and os.path.isfile(token) else "the configured token"
                raise CredentialsError(
                    f"{self.url}: GCS credentials cannot be loaded from {source} ({type(err).__name__}: {_clean(err)})",
                    self._credentials_hint(key_unusable=True),
                ) from None
        import s3fs

        opts = dict(options)
        # No listings cache: other machines write to the vault, and s3fs answers info() (and
        # so a whole-object cat_file) from a cached listing of the folder, which would call
        # an object another writer added since "not found", i.e. a missing pack.
        opts.setdefault("use_listings_cache", False)
        client = dict(opts.pop("client_kwargs", {}) or {})
        endpoint = (
            opts.pop("endpoint_url", None)
            or client.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            client["endpoint_url"] = endpoint
            self.endpoint = endpoint
        if endpoint and "region_name" not in client and not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            client["region_name"] = "us-east-1"  # S3-compatible stores want a region, any region; AWS finds its own
        config = dict(opts.pop("config_kwargs", {}) or {})
        # Our own retry loop owns the deadline; let botocore try only twice per call
        # (its "max_attempts" would count the retries alone: three tries).
        config.setdefault("retries", {"total_max_attempts": CLIENT_TRIES, "mode": "standard"})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT)
        config.setdefault("read_timeout", READ_TIMEOUT)
        self.timeouts = (_seconds(config["connect_timeout"], CONNECT_TIMEOUT), _seconds(config["read_timeout"], READ_TIMEOUT))
        sockets = _no_progress_sockets(self.timeouts[1])
        if sockets is not None and _aiobotocore_takes_socket_factory():
            connector = dict(config.get("connector_args") or {})
            connector.setdefault("socket_factory", sockets)
            config["connector_args"] = connector
        _quiet_library_logs("s3fs")
        if endpoint:
            # S3-compatible servers (R2, MinIO, B2, rclone) often lack the new default
            # checksums; every byte is checked against its BLAKE3 hash anyway.
            config.setdefault("request_checksum_calculation", "when_required")
            config.setdefault("response_checksum_validation", "when_required")
        fs = s3fs.S3FileSystem(client_kwargs=client, config_kwargs=config, **opts)
        fs.retries = 1  # s3fs's own retry loop: ours keeps the deadline
        return fs

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        if self._create_only is None:
            self._create_only = self._probe_create_only()
        return Capabilities(create_only=self._create_only, atomic_overwrite=True, range_reads=True)

    def _probe_create_only(self) -> bool:
        """AWS S3 and GCS honour create-only writes; an unknown S3 endpoint is tested."""
        if self.scheme == "gcs" or not self.endpoint:
            return True
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        self._put_raw(name, b"1", create=True)
        try:
            self._put_raw(name, b"2", create=True)
        except ObjectExists:
            return True
        finally:
            try:
                self.delete(name)
            except BackendError:
                pass
        return False

    # ------------------------------------------------------------ calls and retries

    def _call_limit(self, nbytes: int) -> float:
        """The longest one call moving ``nbytes`` may take: each of the client's tries may
        connect and then wait out one silence, and the bytes may go at the floor rate."""
        connect, stall = self.timeouts
        return CLIENT_TRIES * (connect + stall) + CALL_SLACK + nbytes / MIN_TRANSFER_RATE

    def _run(self, method: str, *args: Any, nbytes: int | None = 0, **kwargs: Any) -> Any:
        """Call the client's coroutine ``_<method>`` in fsspec's event loop (what its sync
        wrappers do), cancelled past the call limit for ``nbytes``; ``None``: a download of
        unknown size, which only aiohttp's no-progress read timeout bounds."""
        fs = self.fs

        async def call() -> Any:
            if self.scheme == "s3":
                # s3fs makes (and after a closed session, remakes) its client here; the
                # hook is registered once per client.
                _without_expect_continue(await fs.set_session())
            return await getattr(fs, f"_{method}")(*args, **kwargs)

        return _run_bounded(fs.loop, call(), None if nbytes is None else self._call_limit(nbytes))

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise BackendError(f"refusing object name {name!r}")
        return f"{self.root}/{name}" if name else self.root

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient failures with full-jitter backoff until the deadline."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except FileNotFoundError as err:
                self._raise_missing_bucket(err)
                raise ObjectNotFound(what) from None
            except FileExistsError:
                raise ObjectExists(what) from None
            except PermissionError as err:
                raise CredentialsError(
                    f"{self.url}: access denied while {what} ({_clean(err)})",
                    self._credentials_hint(),
                ) from None
            except (BackendError, LiferaftError):
                raise
            except Exception as err:
                if _is_credentials(err):
                    verdict = "found no credentials" if "locate credentials" in str(err) else "credentials rejected"
                    raise CredentialsError(f"{self.url}: {verdict} while {what} ({_clean(err)})", self._credentials_hint()) from None
                if _is_missing_bucket_text(str(err)):
                    self._raise_missing_bucket(err)
                if not _is_transient(err):
                    if not _from_the_store(err):
                        raise  # a bug of ours or of a client library: keep its traceback
                    raise StoreError(
                        f"{self.url}: the store refused {what} ({_clean(err)})",
                        "check the vault URL and the store's settings; committed snapshots are intact",
                    ) from None
                attempt += 1
                elapsed = time.monotonic() - start
                delay = random.uniform(0, min(8.0, 0.25 * 2**attempt))  # full jitter
                if elapsed + delay > self.deadline:
                    where = f" at {self.endpoint}" if self.endpoint else ""
                    raise StoreUnreachable(
                        f"{self.url}{where}: {what} still failing after {attempt} tries in {elapsed:.0f}s ({_clean(err)})",
                        "check the network and the endpoint (LIFERAFT_RETRY_DEADLINE sets how long to retry); committed snapshots are intact",
                    ) from None
                time.sleep(delay)

    def _raise_missing_bucket(self, err: BaseException | None = None) -> None:
        """Raise BucketNotFound when ``err`` says so, or (GCS, whose 404 does not) when the bucket is gone."""
        if err is not None and _is_missing_bucket_text(str(err)):
            missing = True
        elif self.scheme == "gcs" and not self._bucket_seen:
            missing = not self._bucket_exists()
        else:
            missing = False
        if missing:
            make = "gcloud storage buckets create gs://" if self.scheme == "gcs" else "aws s3 mb s3://"
            name = new_bucket_name(self.scheme, self.bucket)
            if name == self.bucket:
                fix = f"create it (e.g. {make}{name}) or fix the vault URL"
            else:
                rule = (
                    "lowercase letters, digits, dots, hyphens and underscores"
                    if self.scheme == "gcs"
                    else "lowercase letters, digits, dots and hyphens"
                )
                fix = f"a new bucket's name is 3-63 {rule}: create one (e.g. {make}{name or 'my-vault'}) and put its name in the vault URL"
            raise BucketNotFound(
                f"bucket {self.bucket!r} does not exist" + (f" at {self.endpoint}" if self.endpoint else ""), fix
            ) from None

    def _bucket_exists(self) -> bool:
        def check() -> bool:
            if self.scheme == "gcs":
                try:
                    self._run("call", "GET", "b/{}", self.bucket, json_out=True)
                except FileNotFoundError:
                    return False
                return True
            return bool(self._run("exists", self.bucket))

        start = time.monotonic()
        while True:  # not through _retry: its not-found handling calls us
            try:
                found = check()
                break
            except Exception as err:
                if _is_credentials(err) or isinstance(err, PermissionError):
                    return True  # the bucket may exist; the caller's own error says more
                if not _is_transient(err) or time.monotonic() - start > self.deadline:
                    return True
                time.sleep(random.uniform(0, 0.5))
        self._bucket_seen = found
        return found

    _key_file: str | None = None  # the key file GOOGLE_APPLICATION_CREDENTIALS names, when it is the one in use

    def _credentials_hint(self, *, key_unusable: bool = False) -> str:
        if self.scheme == "gcs":
            key_file = self._key_file
            if key_file:  # the variable is set: telling the user to set it sent them in a circle
                other = "or unset it to use `gcloud auth application-default login` (on Colab, google.colab.auth.authenticate_user())"
                if not os.access(key_file, os.R_OK):
                    return f"GOOGLE_APPLICATION_CREDENTIALS names {key_file}, which cannot be read: make it readable, {other}"
                if key_unusable:
                    return (
                        f"{key_file}, which GOOGLE_APPLICATION_CREDENTIALS names, is not a usable service-account key: "
                        f"point the variable at the JSON key from the Cloud console, {other}"
                    )
                return (
                    f"the credentials are the key file GOOGLE_APPLICATION_CREDENTIALS names ({key_file}): "
                    f"give its service account access to this bucket, or point the variable at another key, {other}"
                )
            return "on Colab run google.colab.auth.authenticate_user(); elsewhere `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        return "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (and AWS_ENDPOINT_URL for S3-compatible stores)"

    # ------------------------------------------------------------ Backend

    def _put_raw(self, name: str, data: bytes, *, create: bool) -> None:
        path = self._path(name)
        mode = "create" if create else "overwrite"
        self._retry(
            f"writing {name}",
            lambda: self._run(
                "pipe_file", path, data, nbytes=len(data), mode=mode, chunksize=PART_SIZE if self.scheme == "s3" else GCS_RESUMABLE_FROM
            ),
        )

    def put(self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
        blob = bytes(data)
        if overwrite:
            self._put_raw(name, blob, create=False)
            return
        if not self.capabilities.create_only and self.exists(name):
            raise ObjectExists(name)  # best effort where the store ignores preconditions
        try:
            self._put_raw(name, blob, create=True)
        except ObjectExists:
            # After a dropped connection our first try may have landed: same bytes = ours.
            try:
                if self.get(name) == blob:
                    return
            except ObjectNotFound:
                pass
            raise

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        end = None if length is None else offset + length
        if length == 0:
            return b""

        def read() -> bytes:
            try:
                return bytes(self._run("cat_file", path, nbytes=length, start=offset or None, end=end))
            except Exception as err:
                if offset and _is_range_past_end(err):
                    return b""  # like a file read at its end: the caller sees a short read
                raise

        data = self._retry(f"reading {name}", read)
        if length is not None and len(data) > length:
            raise StoreError(f"{self.url}: the store returned {len(data)} bytes for a {length}-byte range of {name}", "report this store")
        return data

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        info = self._retry(f"checking {name}", lambda: self._run("info", path))
        if info.get("type") == "directory":
            raise ObjectNotFound(name)
        return ObjectInfo(name, int(info.get("size") or 0), _mtime(info))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root

        def find() -> dict[str, Any]:
            return self._run("find", base, detail=True)

        try:
            found = self._retry(f"listing {prefix or '/'}", find)
        except ObjectNotFound:
            found = {}
        if not found and self.scheme == "gcs" and not self._bucket_seen:
            self._raise_missing_bucket()  # gcsfs lists a missing bucket as empty
        cut = len(self.root) + 1
        for path, info in sorted(found.items()):
            name = path[cut:]
            if info.get("type") == "directory" or name.startswith(PROBE_PREFIX):
                continue  # a probe left by a writer killed while probing is not vault content
            yield ObjectInfo(name, int(info.get("size") or 0), _mtime(info))

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not self.exists(name):
            raise ObjectNotFound(name)
        self._retry(f"deleting {name}", lambda: self._run("rm_file", path))

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    def exists_location(self) -> bool:
        return self._bucket_seen or self._bucket_exists()

    def is_empty(self) -> bool:
        return next(iter(self.list("")), None) is None


def _is_credentials(err: BaseException) -> bool:
    text = str(err)
    status = _status(err)
    if status in (401, 403):
        return "Invalid Credentials" not in text  # an expired GCS token: refreshed on the next try
    if type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return True
    return any(
        w in text
        for w in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "Forbidden",
            "Unable to locate credentials",
            "invalid_grant",
            "invalid_client",
            "Could not automatically determine credentials",
        )
    )


def _is_missing_bucket_text(text: str) -> bool:
    low = text.lower()
    return "nosuchbucket" in low or ("bucket" in low and ("not exist" in low or "not found" in low))


def _deadline(value: Any) -> float:
    """The retry deadline in seconds: an option, else LIFERAFT_RETRY_DEADLINE, else the default."""
    source = "retry_deadline"
    if value is None:
        value, source = os.environ.get("LIFERAFT_RETRY_DEADLINE") or DEFAULT_DEADLINE, "LIFERAFT_RETRY_DEADLINE"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise LiferaftError(f"{source} must be a number of seconds, not {value!r}", f"e.g. {source}=120")
    return seconds


def _seconds(value: Any, default: float) -> float:
    """A configured timeout in seconds; ``None`` (no timeout) counts as the default here."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return float(default)
    return seconds if 0 < seconds < float("inf") else float(default)


def _gcs_timeouts(timeout: Any) -> tuple[float, float]:
    """(connect, no progress) seconds from gcsfs's ``requests_timeout`` (an aiohttp
    ClientTimeout, or a number: aiohttp's total)."""
    connect = getattr(timeout, "sock_connect", None) or getattr(timeout, "connect", None)
    stall = getattr(timeout, "sock_read", None) or getattr(timeout, "total", None)
    if isinstance(timeout, (int, float)):
        connect = stall = timeout
    return _seconds(connect, CONNECT_TIMEOUT), _seconds(stall, READ_TIMEOUT)


@dataclass(frozen=True)
class _NoProgressSockets:
    """aiohttp's ``socket_factory``: TCP sockets the kernel drops when bytes sent go
    unacknowledged for ``seconds`` (TCP_USER_TIMEOUT; a zero receive window counts, so a
    server that stops reading is caught mid-upload). Its repr is its value: fsspec keys
    its instance cache on the options' text, and equal options must share one client."""

    seconds: float

    def __call__(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(family=family, type=type_, proto=proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(self.seconds * 1000)))
        except (OSError, AttributeError):  # not TCP, or not this platform: the call limit still holds
            pass
        return sock


def _no_progress_sockets(seconds: float) -> _NoProgressSockets | None:
    """The socket factory for a no-progress limit, or None where the platform lacks it."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        return None
    try:
        import aiohttp

        accepts = "socket_factory" in inspect.signature(aiohttp.TCPConnector).parameters  # aiohttp >= 3.12
    except (ImportError, TypeError, ValueError):
        return None
    return _NoProgressSockets(seconds) if accepts else None


def _aiobotocore_takes_socket_factory() -> bool:
    """aiobotocore passes ``connector_args`` to aiohttp and checks their names; older
    releases refuse ``socket_factory`` (then only the call limit holds)."""
    try:
        from aiobotocore.config import AioConfig

        AioConfig(connector_args={"socket_factory": _NoProgressSockets(1.0)})
    except Exception:
        return False
    return True


def _without_expect_continue(client: Any) -> None:
    """Send S3 request bodies at once, without ``Expect: 100-continue``. botocore asks for
    it on every PutObject/UploadPart, and aiohttp then waits for the "100 Continue" with no
    timeout at all (its read timeout starts once the body is sent): a frozen server held
    a pack upload for ever. Sent at once, a stalled body is what the no-progress sockets
    catch, and a small one is under the read timeout. The header is not signed (SigV4
    leaves ``expect`` out), so it can go after signing. The cost: a PUT the server
    refuses (a create-only collision) has sent its body in vain."""
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is not None:
        events.register("before-send.s3", _drop_expect_header, unique_id="liferaft-no-expect-continue")


def _drop_expect_header(request: Any = None, **_kwargs: Any) -> None:
    headers = getattr(request, "headers", None)
    if headers is not None and "Expect" in headers:
        del headers["Expect"]


def _run_bounded(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], limit: float | None) -> T:
    """Run ``coro`` in ``loop`` (another thread's) and wait; past ``limit`` seconds cancel it,
    let it close its connection (aiohttp drops a cancelled request's connection, so the
    session stays usable) and raise CallTimeout. A loop too blocked to cancel in time
    does not hold us either: we stop waiting a grace period later."""

    async def guarded() -> T:
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_GRACE)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the cancellation is what counts
            raise CallTimeout(f"no complete answer within {limit:.0f}s")
        return task.result()

    future = asyncio.run_coroutine_threadsafe(guarded(), loop)
    try:
        return future.result(None if limit is None else limit + 2 * CANCEL_GRACE)
    except concurrent.futures.TimeoutError:
        if not future.done():
            future.cancel()
            raise CallTimeout(f"no complete answer within {limit:.0f}s (the client's event loop is blocked)") from None
        raise
    except BaseException:
        future.cancel()  # Ctrl-C while waiting: the call must not go on behind our back
        raise


def _aiohttp_timeout() -> Any:
    """Per-request limits for gcsfs (its default is a 5-minute total): connect, then silence."""
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)


def _quiet_library_logs(name: str) -> None:
    """gcsfs logs every exhausted retry with a traceback; with no handler anywhere, Python's
    last-resort handler would print it. A NullHandler (what libraries should add) stops that
    and still lets an application that configures logging see the records."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


_GCS_CLASS: Any = None


def _gcs_class() -> Any:
    """gcsfs's core client (not its experimental zonal/HNS one, which probes each bucket over
    gRPC first), with its own retry loop cut to one retry: ours keeps the deadline. Its stock
    loop sleeps 1+2+4+8+16 s on a dead endpoint before we would even see the error."""
    global _GCS_CLASS
    if _GCS_CLASS is None:
        from gcsfs.core import GCSFileSystem

        cls = GCSFileSystem
        try:
            from gcsfs.retry import retry_request

            inner = GCSFileSystem._request.__wrapped__

            class BoundedRetryGCSFileSystem(GCSFileSystem):  # type: ignore[misc, valid-type]
                _request = retry_request(retries=CLIENT_TRIES)(inner)  # one retry: an expired token is refreshed

                async def _set_session(self) -> Any:
                    # The no-progress sockets need a connector made in the running loop, where
                    # gcsfs makes its session; a connector or client certificate of the user's wins.
                    kwargs = self.session_kwargs
                    sockets = None
                    if self._session is None and "connector" not in kwargs and not getattr(self, "_use_client_cert", False):
                        sockets = _no_progress_sockets(_gcs_timeouts(self.requests_timeout)[1])
                    if sockets is None:
                        return await super()._set_session()
                    import aiohttp

                    self.session_kwargs = {**kwargs, "connector": aiohttp.TCPConnector(socket_factory=sockets)}
                    try:
                        return await super()._set_session()
                    finally:
                        self.session_kwargs = kwargs  # the session owns that connector: never hand it to a second one

            cls = BoundedRetryGCSFileSystem
        except (ImportError, AttributeError, TypeError):  # pragma: no cover - other gcsfs versions
            pass
        _GCS_CLASS = cls
    return _GCS_CLASS


def _clean(err: BaseException) -> str:
    """An error's text without anything that could be a secret (tokens, signed URLs)."""
    text = " ".join(str(err).split())[:200] or type(err).__name__
    for marker in ("X-Amz-Signature=", "X-Goog-Signature=", "access_token=", "Signature="):
        if marker in text:
            text = text.split(marker, 1)[0] + marker + "…"
    return text


def gcs_token() -> Any:
    """GCS credentials: Colab's user auth, application default credentials, or a key file."""
    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        if not os.path.isfile(key_file):
            # gcsfs would take a path that is not a file for a raw token.
            raise CredentialsError(
                f"GOOGLE_APPLICATION_CREDENTIALS names {key_file!r}, which is not a file",
                "point it at a service-account key file, or unset it to use application default credentials",
            )
        return key_file
    try:
        import google.colab  # type: ignore[import-not-found]
    except ImportError:
        return "google_default"
    try:  # pragma: no cover - only on Colab
        import google.auth

        google.auth.default()
    except Exception:  # pragma: no cover - only on Colab
        from google.colab import auth  # type: ignore[import-not-found]

        auth.authenticate_user()
    return "google_default"  # pragma: no cover


def credentials_source(url: str) -> str:
    """Which credentials a vault URL would use, in words (for ``liferaft doctor``); never the secret."""
    scheme = urlparse(url).scheme
    if scheme in ("gs", "gcs"):
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return f"anonymous, emulator at {os.environ['STORAGE_EMULATOR_HOST']}"
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            return "service-account file from GOOGLE_APPLICATION_CREDENTIALS"
        return "application default credentials (Colab user auth on Colab)"
    if scheme == "s3":
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            return "AWS_ACCESS_KEY_ID from the environment"
        if os.environ.get("AWS_PROFILE"):
            return f"AWS profile {os.environ['AWS_PROFILE']!r}"
        return "the AWS default chain (config files, instance role)"
    return "none needed"
