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
    from .errors import LiferaftError

__all__ = ["LiferaftError", "Vault", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing liferaft starts nothing and loads no heavy module.
    if name == "Vault":
        from .api import Vault

        return Vault
    if name == "LiferaftError":
        from .errors import LiferaftError

        return LiferaftError
    raise AttributeError(f"module 'liferaft' has no attribute {name!r}")
