"""Stores of bytes, reached by URL: a path, ``file://``, ``memory://`` (``gs://``, ``s3://`` via fsspec)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from ..errors import BadVaultURL
from .base import Backend, BackendError, Capabilities, NoSpace, ObjectExists, ObjectInfo, ObjectNotFound
from .local import LocalBackend

__all__ = [
    "Backend",
    "BackendError",
    "Capabilities",
    "LocalBackend",
    "NoSpace",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "open_backend",
]

_EXTRAS = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3"), "rclone": ("s3fs", "s3")}
SCHEMES = ("a local path", "file://", "memory://", "gs://", "s3://", "rclone://")


def open_backend(url: str | os.PathLike[str], options: dict[str, Any] | None = None) -> Backend:
    """Return the backend for a vault URL or path; ``options`` go to the store's client.

    A path under a Google Drive mount (``/content/drive`` on Colab, or a folder listed in
    ``LIFERAFT_DRIVE_MOUNTS``) gets the Drive rules; ``rclone://REMOTE/FOLDER/vault``
    reaches an rclone remote (Google Drive off Colab) through ``rclone serve s3``.

    >>> open_backend("/content/vault")                          # doctest: +SKIP
    >>> open_backend("/content/drive/MyDrive/liferaft")         # doctest: +SKIP
    >>> open_backend("gs://my-bucket/liferaft")                 # doctest: +SKIP
    >>> open_backend("memory://tests/vault")                    # doctest: +SKIP
    """
    text = os.fspath(url)
    if not text:
        raise BadVaultURL("empty vault URL", "give a folder path or a URL such as gs://bucket/vault")
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else text
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise BadVaultURL(f"file URL with a host: {text}", "use file:///absolute/path")
        from .mounts import drive_mount_of

        mount = drive_mount_of(path)
        if mount is not None:
            from .drive import DriveMountBackend

            return DriveMountBackend(path, mount=mount)
        return LocalBackend(path)
    if scheme == "memory":
        from .fsspec_backend import FsspecBackend

        return FsspecBackend(text)
    if scheme in _EXTRAS:
        module, extra = _EXTRAS[scheme]
        try:
            __import__(module)
        except ImportError:
            raise BadVaultURL(
                f"{scheme}:// vaults need the {module} package",
                f"pip install 'liferaft[{extra}]'",
            ) from None
        if scheme == "rclone":
            from .drive import open_rclone

            return open_rclone(text, options)
        from .objectstore import ObjectStoreBackend

        return ObjectStoreBackend(text, **(options or {}))
    raise BadVaultURL(
        f"unknown vault URL scheme {scheme!r} in {text!r}",
        "use one of: " + ", ".join(SCHEMES),
    )
