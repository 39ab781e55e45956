"""Where we run: Colab, Kaggle, SageMaker Studio Lab or a plain machine, and its time cap.

Detection reads environment variables and well-known paths only: it imports nothing
from the platforms and reaches no network, so it is cheap and safe anywhere.

>>> from liferaft.platform import detect
>>> p = detect()
>>> p.name in ("colab", "kaggle", "studiolab", "skypilot", "local")
True
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

HOUR = 3600.0


def register_exit_hook(fn: Callable[[], object]) -> None:
    """Run ``fn`` when the interpreter exits, while background work can still be started.

    threading's exit hooks run (newest first) before concurrent.futures refuses new work
    at shutdown, which a final snapshot's uploads need; plain atexit runs after that.
    A forked child (a DataLoader worker) inherits the hooks and runs them when it exits:
    it skips them, as the work they finish is its parent's (a worker waited on its
    parent's checkpoint save until torch killed it, stalling every epoch by seconds)."""
    import threading

    pid = os.getpid()

    def hook() -> None:
        if os.getpid() == pid:
            fn()

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(hook)
            return
        except RuntimeError:
            pass
    import atexit

    atexit.register(hook)


def hostname() -> str:
    """This machine's name, without importing socket (``os.uname`` gives the same on POSIX)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    return os.environ.get("COMPUTERNAME", "")  # pragma: no cover - Windows


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs here; True whenever that cannot be told."""
    if pid == os.getpid() or pid <= 0 or os.name == "nt":  # on Windows os.kill(pid, 0) would end it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # PermissionError: alive, another user's
        return True
    return True


@functools.cache
def pid_scope() -> str:
    """A tag two processes share only when their pids name the same processes, or "".

    On Linux: the kernel's boot id and the pid namespace, so a container sharing a
    folder (or a vault) with its host, or another machine, never passes for this one.
    Elsewhere "": a host name is no proof (two laptops may share one), so nothing is
    ever judged by pid there. A file or lock stamped with this tag and a pid that is
    not alive here belongs to a process that is gone.
    """
    import hashlib

    try:
        parts = [Path("/proc/sys/kernel/random/boot_id").read_text().strip(), str(os.stat("/proc/self/ns/pid").st_ino)]
    except OSError:
        return ""
    if not all(parts):
        return ""
    return hashlib.blake2s("\0".join(parts).encode(), digest_size=4).hexdigest()


#: Published per-session caps, in seconds. Conservative: the free tiers' numbers.
#: Colab: "notebooks can run for at most 12 hours" on the free tier (Pro/Pro+ up to 24 h).
#: Kaggle: 12 h for CPU and GPU sessions, 9 h for TPU sessions.
#: SageMaker Studio Lab: 4 h per GPU session, 4 h per CPU session (recent quota).
CAPS = {
    "colab": 12 * HOUR,
    "kaggle": 12 * HOUR,
    "kaggle-tpu": 9 * HOUR,
    "studiolab": 4 * HOUR,
}

#: Stop this long before a platform's cap: the session start is only estimated.
CAP_MARGIN = 10 * 60.0


@dataclass(frozen=True)
class Platform:
    """The detected platform.

    ``time_cap`` is the platform's session cap in seconds (None where there is none),
    ``session_started`` the best estimate of when the session began (epoch seconds), and
    ``persistent_home`` says whether files in the home folder outlive a session.
    """

    name: str
    label: str
    time_cap: float | None = None
    session_started: float | None = None
    persistent_home: bool = False
    note: str = ""

    def time_left(self, now: float | None = None) -> float | None:
        """Seconds left before the cap (less a safety margin), or None without a cap.

        >>> Platform("colab", "Colab", 12 * 3600, session_started=0.0).time_left(now=3600.0)
        39000.0
        """
        if self.time_cap is None:
            return None
        now = time.time() if now is None else now
        started = self.session_started if self.session_started is not None else now
        return max(0.0, self.time_cap - CAP_MARGIN - max(0.0, now - started))


def _container_started() -> float | None:
    """When this container (its PID 1) started: the session start on Colab and Kaggle."""
    try:
        import psutil

        return float(psutil.Process(1).create_time())
    except Exception:
        return None


def _has_tpu(env: Mapping[str, str], root: Path) -> bool:
    return bool(env.get("TPU_NAME") or env.get("TPU_ACCELERATOR_TYPE") or env.get("COLAB_TPU_ADDR")) or (root / "dev" / "accel0").exists()


def detect(environ: Mapping[str, str] | None = None, root: str | os.PathLike[str] = "/") -> Platform:
    """Detect the platform from environment variables and well-known paths.

    ``environ`` and ``root`` default to this process's environment and ``/``; tests and
    tools can pass others.

    >>> detect({"COLAB_RELEASE_TAG": "release-colab_20240101"}).name
    'colab'
    >>> detect({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}).time_cap
    43200.0
    """
    env = os.environ if environ is None else environ
    base = Path(root)
    own = environ is None
    started = _container_started() if own else None
    if (
        env.get("COLAB_RELEASE_TAG")
        or env.get("COLAB_GPU") is not None
        or env.get("COLAB_BACKEND_VERSION")
        or (own and "google.colab" in sys.modules)
    ):
        return Platform(
            "colab",
            "Google Colab",
            CAPS["colab"],
            started,
            note="12 h on the free tier (Colab Pro and Pro+ allow up to 24 h: pass --time-limit 23h30m)",
        )
    if env.get("KAGGLE_KERNEL_RUN_TYPE") or env.get("KAGGLE_URL_BASE"):
        if _has_tpu(env, base):
            return Platform("kaggle", "Kaggle (TPU)", CAPS["kaggle-tpu"], started, note="9 h per TPU session")
        return Platform("kaggle", "Kaggle", CAPS["kaggle"], started, note="12 h per CPU/GPU session")
    home = env.get("HOME", "")
    if home == "/home/studio-lab-user" or env.get("USER") == "studio-lab-user":
        return Platform(
            "studiolab",
            "SageMaker Studio Lab",
            CAPS["studiolab"],
            started,
            persistent_home=True,
            note="4 h per session; the home folder persists between sessions",
        )
    if env.get("SKYPILOT_TASK_ID") or env.get("SKYPILOT_CLUSTER_INFO"):
        return Platform("skypilot", "a SkyPilot job", note="no time cap; SkyPilot recovers the machine, liferaft the state")
    return Platform("local", "this machine", note="no known time cap")
