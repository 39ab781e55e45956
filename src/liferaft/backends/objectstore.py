"""Vaults in object stores: ``gs://bucket/prefix`` (gcsfs) and ``s3://bucket/prefix`` (s3fs).

The commit point is create-only on both: ``ifGenerationMatch=0`` on GCS and
``If-None-Match: *`` on S3 (fsspec's ``mode="create"``). Some S3-compatible servers
ignore that precondition; such a store is detected by a probe the first time
``capabilities`` is asked for, and the vault then relies on unique names (see the
README's "Cloud vaults" section for exactly what holds there).

Transient failures (reset connections, timeouts, 429, 5xx) are retried with
exponential backoff and full jitter under a total deadline; then one clear error.
Credentials are never printed, logged or stored.
"""

from __future__ import annotations

import errno
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

from ..errors import LiferaftError, VaultUnreachable
from .base import Backend, BackendError, Capabilities, ObjectExists, ObjectInfo, ObjectNotFound
from .fsspec_backend import _mtime

T = TypeVar("T")

DEFAULT_DEADLINE = 120.0
PART_SIZE = 8 << 20  # multipart / resumable part size for large objects


class CredentialsError(LiferaftError):
    """The store refused our credentials (or we have none)."""


class BucketNotFound(LiferaftError):
    """The bucket in the vault URL does not exist."""


def _is_transient(err: BaseException) -> bool:
    """Worth another try: connection trouble, timeouts, throttling, server errors."""
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    status = getattr(err, "code", None) or getattr(err, "status", None)
    if isinstance(status, int):
        return status == 429 or status == 408 or status >= 500
    name = type(err).__name__
    module = type(err).__module__ or ""
    if module.startswith(("aiohttp", "botocore", "urllib3", "requests", "asyncio", "http")):
        return True
    if name in ("ChecksumError", "IncompleteReadError", "ReadTimeoutError", "ResponseStreamingError"):
        return True
    if isinstance(err, OSError):
        text = str(err)
        if err.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return True
        # s3fs and gcsfs wrap server errors into plain OSErrors with the message only.
        return any(
            word in text
            for word in ("Internal", "ServiceUnavailable", "SlowDown", "503", "500", "502", "504", "429", "Timeout", "reset", "Connection")
        )
    return False


class ObjectStoreBackend(Backend):
    """Objects under ``bucket/prefix`` of a GCS or S3(-compatible) store."""

    def __init__(self, url: str, *, deadline: float | None = None, **options: Any) -> None:
        parsed = urlparse(url)
        self.scheme = "gcs" if parsed.scheme in ("gs", "gcs") else "s3"
        self.bucket = parsed.netloc
        if not self.bucket:
            from ..errors import BadVaultURL

            raise BadVaultURL(f"no bucket in {url!r}", f"write {parsed.scheme}://BUCKET/prefix")
        self.prefix = parsed.path.strip("/")
        self.root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        self.url = url
        env_deadline = os.environ.get("LIFERAFT_RETRY_DEADLINE")
        self.deadline = float(deadline if deadline is not None else options.pop("retry_deadline", env_deadline or DEFAULT_DEADLINE))
        self._create_only: bool | None = options.pop("create_only", None)
        self.endpoint = None
        self.fs = self._make_fs(options)

    # ------------------------------------------------------------ setup

    def _make_fs(self, options: dict[str, Any]) -> Any:
        if self.scheme == "gcs":
            # The core client, not gcsfs's experimental zonal/HNS one (which probes each
            # bucket over gRPC first): the one the tests run against a real-protocol server.
            from gcsfs.core import GCSFileSystem

            opts = dict(options)
            emulator = os.environ.get("STORAGE_EMULATOR_HOST")
            if emulator:
                self.endpoint = emulator
                opts.setdefault("token", "anon")
            else:
                opts.setdefault("token", gcs_token())
            return GCSFileSystem(**opts)
        import s3fs

        opts = dict(options)
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
        if "region_name" not in client and not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            client["region_name"] = "us-east-1"
        config = dict(opts.pop("config_kwargs", {}) or {})
        # Our own retry loop owns the deadline; let botocore try only twice per call.
        config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 60)
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
        name = f"locks/.probe-{uuid.uuid4().hex}"
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

    # ------------------------------------------------------------ retries

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise BackendError(f"refusing object name {name!r}")
        return f"{self.root}/{name}" if name else self.root

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
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
                if not _is_transient(err) and not _is_credentials(err):
                    raise
                if _is_credentials(err):
                    raise CredentialsError(
                        f"{self.url}: credentials rejected while {what} ({_clean(err)})", self._credentials_hint()
                    ) from None
                attempt += 1
                elapsed = time.monotonic() - start
                delay = random.uniform(0, min(8.0, 0.25 * 2**attempt))  # full jitter
                if elapsed + delay > self.deadline:
                    where = f" at {self.endpoint}" if self.endpoint else ""
                    raise VaultUnreachable(
                        f"{self.url}{where}: {what} still failing after {attempt} tries in {elapsed:.0f}s ({_clean(err)})",
                        "check the network and the endpoint; committed snapshots are intact",
                    ) from None
                time.sleep(delay)

    def _raise_missing_bucket(self, err: BaseException) -> None:
        text = str(err)
        if "bucket" in text.lower() and ("not exist" in text or "NoSuchBucket" in text or "not found" in text.lower()):
            raise BucketNotFound(
                f"bucket {self.bucket!r} does not exist" + (f" at {self.endpoint}" if self.endpoint else ""),
                f"create it (e.g. {'gcloud storage buckets create gs://' if self.scheme == 'gcs' else 'aws s3 mb s3://'}{self.bucket}) or fix the vault URL",
            ) from None

    def _credentials_hint(self) -> str:
        if self.scheme == "gcs":
            return "on Colab run google.colab.auth.authenticate_user(); elsewhere `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        return "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (and AWS_ENDPOINT_URL for S3-compatible stores)"

    # ------------------------------------------------------------ Backend

    def _put_raw(self, name: str, data: bytes, *, create: bool) -> None:
        path = self._path(name)
        mode = "create" if create else "overwrite"
        self._retry(
            f"writing {name}", lambda: self.fs.pipe_file(path, data, mode=mode, chunksize=PART_SIZE if self.scheme == "s3" else 64 << 20)
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
        return bytes(self._retry(f"reading {name}", lambda: self.fs.cat_file(path, start=offset or None, end=end)))

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        info = self._retry(f"checking {name}", lambda: self.fs.info(path))
        if info.get("type") == "directory":
            raise ObjectNotFound(name)
        return ObjectInfo(name, int(info.get("size") or 0), _mtime(info))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root

        def find() -> dict[str, Any]:
            self.fs.invalidate_cache(base)
            return self.fs.find(base, detail=True)

        try:
            found = self._retry(f"listing {prefix or '/'}", find)
        except ObjectNotFound:
            return
        cut = len(self.root) + 1
        for path, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            yield ObjectInfo(path[cut:], int(info.get("size") or 0), _mtime(info))

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not self.exists(name):
            raise ObjectNotFound(name)
        self._retry(f"deleting {name}", lambda: self.fs.rm_file(path))

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    def exists_location(self) -> bool:
        return bool(self._retry("checking the bucket", lambda: self.fs.exists(self.bucket)))

    def is_empty(self) -> bool:
        return next(iter(self.list("")), None) is None


def _is_credentials(err: BaseException) -> bool:
    text = str(err)
    status = getattr(err, "code", None) or getattr(err, "status", None)
    if status in (401, 403):
        return "Invalid Credentials" not in text  # gcsfs retries an expired token itself
    return any(
        w in text
        for w in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "Forbidden",
            "NoCredentialsError",
            "Unable to locate credentials",
        )
    )


def _clean(err: BaseException) -> str:
    """An error's text without anything that could be a secret (tokens, signed URLs)."""
    text = " ".join(str(err).split())[:200] or type(err).__name__
    for marker in ("X-Amz-Signature=", "X-Goog-Signature=", "access_token=", "Signature="):
        if marker in text:
            text = text.split(marker, 1)[0] + marker + "…"
    return text


def gcs_token() -> Any:
    """GCS credentials: Colab's user auth, application default credentials, or a key file."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
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
