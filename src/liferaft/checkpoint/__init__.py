"""Checkpoints: async save, verified restore, retention, mirrored into the vault.

>>> import liferaft
>>> ck = liferaft.Checkpointer("checkpoints", run="mnist", keep_last=3)     # doctest: +SKIP
>>> ck.save(100, {"model": model.state_dict()}, metrics={"val_loss": 0.31})  # doctest: +SKIP
>>> r = ck.restore()                                                         # doctest: +SKIP

Framework adapters live in submodules that import their framework only when imported
themselves: ``liferaft.checkpoint.pytorch``, ``.keras``, ``.lightning``, ``.hf``.
"""

from __future__ import annotations

from .core import Checkpointer, CheckpointInfo, CheckpointSaveFailed, CheckpointWarning, Restored
from .retention import Policy, select_keep
from .rng import ResumableSampler, capture_rng, restore_rng
from .state import CheckpointDamaged

__all__ = [
    "CheckpointDamaged",
    "CheckpointInfo",
    "CheckpointSaveFailed",
    "CheckpointWarning",
    "Checkpointer",
    "Policy",
    "Restored",
    "ResumableSampler",
    "capture_rng",
    "restore_rng",
    "select_keep",
]
