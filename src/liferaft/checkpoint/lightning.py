"""PyTorch Lightning: every checkpoint the Trainer saves goes through liferaft, resume from the newest valid one.

>>> import lightning as L, liferaft
>>> from liferaft.checkpoint.lightning import LiferaftLightning
>>> ck = liferaft.Checkpointer("checkpoints", run="mnist", keep_last=2, keep_best=1,
...                            monitor="val_loss")                             # doctest: +SKIP
>>> cb = LiferaftLightning(ck)                                                 # doctest: +SKIP
>>> trainer = L.Trainer(max_epochs=10, callbacks=[cb])                          # doctest: +SKIP
>>> trainer.fit(model, ckpt_path=cb.resume_path())     # None on a first run    # doctest: +SKIP

The callback installs :class:`LiferaftCheckpointIO` as the Trainer's checkpoint plugin
(or pass ``plugins=[cb.io]`` yourself). Lightning's ``ModelCheckpoint`` still decides
*when* to save; each save becomes ``checkpoints/step-N/`` (Lightning's checkpoint dict
stored without pickle where it is tensors and plain values) and a vault snapshot tagged
with the step and ``trainer.callback_metrics``. Which checkpoints stay is liferaft's
retention (``keep_last``, ``keep_best``, ``keep_every``); ``ModelCheckpoint``'s requests
to delete files are ignored. Leave ``save_last`` off: the newest liferaft checkpoint is
"last". ``Trainer(..., ckpt_path=cb.resume_path())`` loads the newest checkpoint that
verifies, from the folder or, on a fresh machine, from the vault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
except ImportError:  # the standalone pytorch_lightning package
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef]
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO  # type: ignore[no-redef]

from .core import Checkpointer, Restored
from .folder import MANIFEST

METRICS_KEY = "liferaft_metrics"


class LiferaftCheckpointIO(CheckpointIO):
    """A Lightning checkpoint plugin that saves through a :class:`~liferaft.Checkpointer`.

    ``save_checkpoint`` hands the checkpoint dict to ``Checkpointer.save`` (async: the
    copy to host memory is all the Trainer waits for); ``load_checkpoint`` reads a
    liferaft checkpoint folder, or an ordinary ``.ckpt`` file as Lightning would.
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__()
        self.checkpointer = checkpointer
        self._loaded: dict[str, Restored] = {}
        self._plain = TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        metrics = dict(checkpoint.pop(METRICS_KEY, None) or {})
        if not metrics:
            metrics = _monitored(checkpoint)
        self.checkpointer.save(int(checkpoint.get("global_step", 0)), checkpoint, metrics=metrics)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        key = os.path.abspath(os.fspath(path))
        r = self._loaded.pop(key, None)
        if r is None and Path(key, MANIFEST).is_file():
            step = self.checkpointer._naming.step_of(Path(key).name)
            if Path(key).parent != self.checkpointer.directory or step is None:
                raise FileNotFoundError(f"{key} is a liferaft checkpoint of another Checkpointer folder")
            r = self.checkpointer.restore(step)
        if r is not None:
            return dict(r.state)
        return self._plain.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        """Ignored: liferaft's retention decides which checkpoints go."""

    def teardown(self) -> None:
        self.checkpointer.wait()

    def resume_path(self) -> str | None:
        """The newest checkpoint that verifies, loaded and ready for ``ckpt_path``; None on a first run."""
        r = self.checkpointer.restore()
        if r is None:
            return None
        key = str(r.path)
        self._loaded = {key: r}
        return key


def _monitored(checkpoint: dict[str, Any]) -> dict[str, float]:
    """Metrics ModelCheckpoint recorded in the checkpoint (its monitor and score)."""
    out: dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get("monitor"), str) and state.get("current_score") is not None:
            try:
                out[state["monitor"]] = float(state["current_score"])
            except (TypeError, ValueError):
                pass
    return out


class LiferaftLightning(pl.Callback):
    """Route the Trainer's checkpoints through a Checkpointer and resume from the newest valid one.

    Parameters
    ----------
    checkpointer
        Where checkpoints go; its retention decides which stay.
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__()
        self.checkpointer = checkpointer
        self.io = LiferaftCheckpointIO(checkpointer)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not isinstance(trainer.strategy.checkpoint_io, LiferaftCheckpointIO):
            trainer.strategy.checkpoint_io = self.io

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        metrics: dict[str, float] = {}
        for k, v in trainer.callback_metrics.items():
            try:
                metrics[str(k)] = float(v)
            except (TypeError, ValueError, RuntimeError):
                continue
        checkpoint[METRICS_KEY] = metrics

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.checkpointer.wait()

    def resume_path(self) -> str | None:
        """Pass to ``trainer.fit(..., ckpt_path=...)``: the newest valid checkpoint, or None on a first run."""
        return self.io.resume_path()
