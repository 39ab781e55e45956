"""Which local paths lie under a Google Drive mount.

Kept apart from ``drive`` (which loads ctypes, subprocess and the rclone helper) so that
opening a plain local vault imports none of that.
"""

from __future__ import annotations

import os
from pathlib import Path

COLAB_MOUNT = "/content/drive"
MOUNTS_ENV = "LIFERAFT_DRIVE_MOUNTS"


def drive_mounts() -> list[Path]:
    """Folders treated as Drive mounts: Colab's, plus those in ``LIFERAFT_DRIVE_MOUNTS``."""
    out = [Path(COLAB_MOUNT)]
    for item in os.environ.get(MOUNTS_ENV, "").split(os.pathsep):
        if item.strip():
            out.append(Path(item.strip()).expanduser().absolute())
    return out


def drive_mount_of(path: str | os.PathLike[str]) -> Path | None:
    """The Drive mount that ``path`` lies under, or None."""
    p = Path(path).expanduser().absolute()
    for mount in drive_mounts():
        if p == mount or mount in p.parents:
            return mount
    return None
