"""PyTorch Lightning: every checkpoint the Trainer saves goes through liferaft, resume from the newest valid one.

>>> import lightning as L, liferaft
>>> from liferaft.checkpoint.lightning import LiferaftLightning
>>> ck = liferaft.Checkpointer("checkpoints", run="mnist", keep_last=2, keep_best=1,
...                            monitor="val_loss")                             # doctest: +SKIP
>>> cb = LiferaftLightning(ck)                                                 # doctest: +SKIP
>>> trainer = L.Trainer(max_epochs=10, callbacks=[cb])                          # doctest: +SKIP
>>> trainer.fit(model, ckpt_path="last")               # the newest, if any    # doctest: +SKIP
>>> trainer.test(model, ckpt_path="best")              # ModelCheckpoint's best # doctest: +SKIP
>>> best = Model.load_from_checkpoint(cb.export("best.ckpt", best=True))       # doctest: +SKIP

The callback installs :class:`LiferaftCheckpointIO` as the Trainer's checkpoint plugin
(or pass ``plugins=[cb.io]`` yourself). Lightning's ``ModelCheckpoint`` still decides
*when* to save; each save becomes ``checkpoints/step-N/`` (Lightning's checkpoint dict
stored without pickle where it is tensors and plain values) and a vault snapshot tagged
with the step and ``trainer.callback_metrics``. Which checkpoints stay is liferaft's
retention (``keep_last``, ``keep_best``, ``keep_every``); ``ModelCheckpoint``'s requests
to delete files are ignored. ``ckpt_path="last"`` (in ``fit``, ``validate``, ``test``,
``predict``) loads the newest checkpoint that verifies, from the folder or, on a fresh
machine, from the vault, as ``ckpt_path=cb.resume_path()`` does; on a first run there is
none and ``fit`` starts from scratch. Leave ``save_last`` off: ``True`` saves each
checkpoint twice (the Trainer waits for the first copy), ``"link"`` leaves a dangling
``last.ckpt`` link.

No ``.ckpt`` file is written where ``ModelCheckpoint`` names one. The plugin remembers
which step each name was saved as (and keeps that in the checkpoints, so it survives a
resume on a fresh machine): ``ckpt_path="best"``, ``ckpt_path=trainer.checkpoint_callback.best_model_path``
and the other names ``ModelCheckpoint`` reports load that step, from the vault when the
folder is gone. Give the Checkpointer the ``monitor`` and ``mode`` of your
``ModelCheckpoint`` so that retention keeps its best. ``Model.load_from_checkpoint``
reads files itself, without the plugin: pass it a file :meth:`LiferaftLightning.export`
writes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import warnings
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

from ..errors import LiferaftError
from .core import Checkpointer, CheckpointWarning, Restored
from .folder import MANIFEST

METRICS_KEY = "liferaft_metrics"
PATHS_KEY = "liferaft_paths"  # the checkpoint names ModelCheckpoint asked for → liferaft step
_KEEP_UNREFERENCED = 100  # names no callback refers to any more: only the newest are remembered


def _key(path: Any) -> str:
    """One spelling per checkpoint name: absolute for local paths, untouched for URLs."""
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


class LiferaftCheckpointIO(CheckpointIO):
    """A Lightning checkpoint plugin that saves through a :class:`~liferaft.Checkpointer`.

    ``save_checkpoint`` hands the checkpoint dict to ``Checkpointer.save`` (async: the
    copy to host memory is all the Trainer waits for) and remembers the step under the
    path Lightning gave. ``load_checkpoint`` takes a liferaft checkpoint folder, a path
    Lightning saved through this plugin (``ModelCheckpoint.best_model_path`` and the
    like: the checkpoint of that step is restored, from the vault if need be), or an
    ordinary ``.ckpt`` file, which it reads as Lightning would.
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__()
        self.checkpointer = checkpointer
        self._loaded: dict[str, Restored] = {}
        self._paths: dict[str, int] = {}
        self._plain = TorchCheckpointIO()
        _resolve_last_through_liferaft()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        metrics = dict(checkpoint.pop(METRICS_KEY, None) or {})
        if not metrics:
            metrics = _monitored(checkpoint)
        step = int(checkpoint.get("global_step", 0))
        key = _key(path)
        if "://" not in key:  # as Lightning's own plugin does: save_last="link" links last.ckpt in this folder
            os.makedirs(os.path.dirname(key), exist_ok=True)
        self._paths.pop(key, None)  # re-inserted last: the newest name
        self._paths[key] = step
        self._forget_unreferenced(checkpoint)
        checkpoint[PATHS_KEY] = dict(self._paths)
        self.checkpointer.save(step, checkpoint, metrics=metrics)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        key = _key(path)
        r = self._loaded.pop(key, None)
        if r is None:
            step = self._step_of(key)
            if step is not None:
                r = self._restore_step(step, key)
        if r is None:
            if not os.path.exists(key) and "://" not in key:
                raise LiferaftError(
                    f"no checkpoint at {key}: it is neither a file nor a name this Trainer saved through liferaft",
                    "pass ckpt_path=cb.resume_path() (the newest) or cb.best_path() (the best by the Checkpointer's monitor)",
                )
            return self._plain.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        state = dict(r.state)
        for name, step in dict(state.pop(PATHS_KEY, None) or {}).items():
            self._paths.setdefault(str(name), int(step))  # names this process saved itself win
        return state

    def remove_checkpoint(self, path: Any) -> None:
        """Ignored: liferaft's retention decides which checkpoints go."""

    def teardown(self) -> None:
        self.checkpointer.wait()

    def resume_path(self) -> str | None:
        """The newest checkpoint that verifies, loaded and ready for ``ckpt_path``; None on a first run."""
        return self._preload(self.checkpointer.restore())

    def best_path(self) -> str | None:
        """The best checkpoint by the Checkpointer's ``monitor``, loaded and ready for ``ckpt_path``; None if there is none."""
        return self._preload(self.checkpointer.restore(best=True))

    def export(self, path: str | os.PathLike[str], *, step: int | None = None, best: bool = False) -> str:
        """Write a liferaft checkpoint (the newest, ``step`` or the ``best``) as an ordinary Lightning ``.ckpt`` file."""
        import torch

        r = self.checkpointer.restore(step, best=best)
        if r is None:
            raise LiferaftError(f"run {self.checkpointer.run!r} has no checkpoint yet", "export after the Trainer has saved one")
        state = dict(r.state)
        state.pop(PATHS_KEY, None)
        dest = Path(_key(path))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return str(dest)

    def _preload(self, r: Restored | None) -> str | None:
        if r is None:
            return None
        key = str(r.path)
        self._loaded = {key: r}
        return key

    def _step_of(self, key: str) -> int | None:
        """The liferaft step a path stands for: a ``step-N`` folder of this Checkpointer, or a name saved through it."""
        folder = Path(key)
        if folder.parent == self.checkpointer.directory:
            step = self.checkpointer._naming.step_of(folder.name)
            if step is not None:
                return step
        elif (folder / MANIFEST).is_file():
            raise LiferaftError(
                f"{key} is a liferaft checkpoint of another checkpoints folder than {self.checkpointer.directory}",
                "restore it with a Checkpointer on that folder",
            )
        step = self._paths.get(key)
        if step is None and os.path.islink(key):  # save_last="link": last.ckpt links to the name saved through liferaft
            step = self._paths.get(_key(os.path.join(os.path.dirname(key), os.readlink(key))))
        return step

    def _restore_step(self, step: int, key: str) -> Restored:
        ck = self.checkpointer
        try:
            r = ck.restore(step)
        except LiferaftError as err:
            # restore(step) lists the checkpoints itself. A step it does not find raises a plain
            # LiferaftError (vault, damage and save failures are subclasses): list again only then,
            # to tell a step retention deleted from any other failure.
            if type(err) is not LiferaftError or any(c.step == step for c in ck.checkpoints()):
                raise
            name = ck._naming.name(step)
            where = f"{key} (liferaft checkpoint {name})" if Path(key).name != name else key
            policy = ck.policy
            fix = (
                f"pass ckpt_path=cb.best_path() for the best by {policy.monitor!r}, or create the Checkpointer with "
                "the monitor and mode of your ModelCheckpoint so that its best is kept"
                if policy.monitor
                else "create the Checkpointer with the monitor and mode of your ModelCheckpoint so that its best is kept, "
                "or pass ckpt_path=cb.resume_path() for the newest"
            )
            raise LiferaftError(f"{where} was deleted by liferaft's retention (it keeps {policy.describe()})", fix) from None
        assert r is not None
        return r

    def _forget_unreferenced(self, checkpoint: dict[str, Any]) -> None:
        """Keep the names some callback (ModelCheckpoint's best_k_models, best_model_path, ...) still refers to, and the newest others."""
        referenced: set[str] = set()
        for state in (checkpoint.get("callbacks") or {}).values():
            if not isinstance(state, dict):
                continue
            for value in state.values():
                names = value.keys() if isinstance(value, dict) else [value]
                referenced.update(_key(n) for n in names if isinstance(n, (str, os.PathLike)) and n)
        others = [k for k in self._paths if k not in referenced]
        for k in others[:-_KEEP_UNREFERENCED]:
            del self._paths[k]


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


_NO_LAST = r'.*ckpt_path="last"\) is set, but there is no last checkpoint'  # Lightning's warning, with its save_last hint


def _liferaft_io(trainer: Any) -> LiferaftCheckpointIO | None:
    """The liferaft plugin that will load this Trainer's checkpoints, or None if it has none."""
    # Read without Strategy.checkpoint_io, which would install a default plugin on a Trainer that is not ours.
    io = getattr(getattr(trainer, "strategy", None), "_checkpoint_io", None)
    if isinstance(io, LiferaftCheckpointIO):  # plugins=[cb.io], or the callback's setup has run
        return io
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, LiferaftLightning):
            return callback.io  # its setup installs it before anything is loaded
    return None


def _resolve_last_through_liferaft() -> None:
    """Make ``ckpt_path="last"`` the newest liferaft checkpoint on Trainers that save through liferaft.

    Lightning turns "last" into a path in ``_CheckpointConnector._parse_ckpt_path``, before
    any callback hook runs, by looking for ``last*.ckpt`` files, which liferaft never
    writes: it found none and trained from scratch. Wrapped once per process; a Trainer
    without a liferaft plugin or callback gets Lightning's own answer.
    """
    try:
        module = importlib.import_module(f"{pl.__name__}.trainer.connectors.checkpoint_connector")
        connector = module._CheckpointConnector
        original = connector._parse_ckpt_path
        signature = inspect.signature(original)
    except (ImportError, AttributeError, TypeError, ValueError):
        warnings.warn(
            'liferaft: this Lightning version resolves ckpt_path="last" in a way liferaft does not know, so it finds no '
            "checkpoint; pass ckpt_path=cb.resume_path()",
            CheckpointWarning,
            stacklevel=3,
        )
        return
    if getattr(original, "_liferaft", False):
        return

    @functools.wraps(original)
    def parse_ckpt_path(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ckpt_path = signature.bind(self, *args, **kwargs).arguments.get("ckpt_path")
        except TypeError:
            ckpt_path = None
        io = _liferaft_io(getattr(self, "trainer", None)) if isinstance(ckpt_path, str) and ckpt_path == "last" else None
        if io is None:
            return original(self, *args, **kwargs)
        path = io.resume_path()  # the newest that verifies, from the vault on a fresh machine
        if path is not None:
            return path
        # A first run: Lightning's answer (a last.ckpt written without liferaft, else None), without its
        # hint to set save_last=True, which would only save each checkpoint twice.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_LAST)
            return original(self, *args, **kwargs)

    parse_ckpt_path._liferaft = True  # type: ignore[attr-defined]
    connector._parse_ckpt_path = parse_ckpt_path


class LiferaftLightning(pl.Callback):
    """Route the Trainer's checkpoints through a Checkpointer and resume from the newest valid one.

    Parameters
    ----------
    checkpointer
        Where checkpoints go; its retention decides which stay. Give it the ``monitor``
        and ``mode`` of your ``ModelCheckpoint`` (if that has a monitor), so that the
        checkpoint ``ckpt_path="best"`` names is one retention keeps.

    Examples
    --------
    >>> ck = liferaft.Checkpointer("checkpoints", run="mnist", keep_last=1, monitor="val_loss")  # doctest: +SKIP
    >>> cb = LiferaftLightning(ck)                                                             # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=10, callbacks=[cb, ModelCheckpoint(monitor="val_loss")])  # doctest: +SKIP
    >>> trainer.fit(model, ckpt_path="last")     # or cb.resume_path(): the newest, from the vault if need be  # doctest: +SKIP
    >>> trainer.test(model, ckpt_path="best")                                                  # doctest: +SKIP
    >>> model = Model.load_from_checkpoint(cb.export("best.ckpt", best=True))                  # doctest: +SKIP
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__()
        self.checkpointer = checkpointer
        self.io = LiferaftCheckpointIO(checkpointer)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not isinstance(trainer.strategy.checkpoint_io, LiferaftCheckpointIO):
            trainer.strategy.checkpoint_io = self.io
        if stage == "fit":
            self._check_monitors(trainer)

    def _check_monitors(self, trainer: Any) -> None:
        policy = self.checkpointer.policy
        for mc in getattr(trainer, "checkpoint_callbacks", []):
            monitor = getattr(mc, "monitor", None)
            if not monitor or (policy.keep_best and policy.monitor == monitor and policy.mode == getattr(mc, "mode", "min")):
                continue
            have = f"keeps the best by {policy.monitor!r} ({policy.mode})" if policy.keep_best else "keeps no best"
            warnings.warn(
                f"liferaft: ModelCheckpoint ranks by {monitor!r} ({getattr(mc, 'mode', 'min')}) but the Checkpointer {have}, "
                f'so retention may delete the checkpoint ckpt_path="best" names; create the Checkpointer with '
                f"monitor={monitor!r}, mode={getattr(mc, 'mode', 'min')!r}",
                CheckpointWarning,
                stacklevel=2,
            )

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
        """Pass to ``trainer.fit(..., ckpt_path=...)``: the newest valid checkpoint, or None on a first run.

        What ``ckpt_path="last"`` loads on a Trainer with this callback.

        >>> trainer.fit(model, ckpt_path=cb.resume_path())      # doctest: +SKIP
        """
        return self.io.resume_path()

    def best_path(self) -> str | None:
        """Pass to ``ckpt_path=``: the best checkpoint by the Checkpointer's ``monitor`` (from the vault if need be).

        Works in a fresh process too, where ``ckpt_path="best"`` has no ``ModelCheckpoint``
        history to go by. None if there is no checkpoint.

        >>> trainer.test(model, ckpt_path=cb.best_path())        # doctest: +SKIP
        """
        return self.io.best_path()

    def export(self, path: str | os.PathLike[str], *, step: int | None = None, best: bool = False) -> str:
        """Write the newest checkpoint (or ``step``, or the ``best`` by the monitor) as a Lightning ``.ckpt`` file; return its path.

        For what reads files without the Trainer's plugin: ``Model.load_from_checkpoint``,
        ``torch.load``, a download from the notebook. The checkpoint is verified (and
        fetched from the vault if need be) first.

        >>> model = Model.load_from_checkpoint(cb.export("best.ckpt", best=True))  # doctest: +SKIP
        """
        return self.io.export(path, step=step, best=best)
