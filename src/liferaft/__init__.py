"""liferaft: keep machine-learning work alive on machines that can vanish.

>>> import liferaft
>>> vault = liferaft.Vault("/content/drive/MyDrive/vault")   # doctest: +SKIP
>>> vault.snapshot(["checkpoints"], run="mnist", step=100)     # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import Vault
    from .checkpoint import Checkpointer
    from .errors import LiferaftError
    from .keep.session import Raft, attach

__all__ = ["Checkpointer", "LiferaftError", "Raft", "Vault", "__version__", "attach"]


def __getattr__(name: str) -> Any:
    # Lazy: importing liferaft starts nothing and loads no heavy module.
    if name == "Vault":
        from .api import Vault

        return Vault
    if name == "Checkpointer":
        from .checkpoint import Checkpointer

        return Checkpointer
    if name in ("attach", "Raft"):
        from .keep import session

        return getattr(session, name)
    if name == "LiferaftError":
        from .errors import LiferaftError

        return LiferaftError
    raise AttributeError(f"module 'liferaft' has no attribute {name!r}")
