"""Keras 3: one callback that resumes mid-training (epoch and step) and keeps the best model.

It replaces ``BackupAndRestore`` + ``ModelCheckpoint(save_best_only=True)``: every
variable of the model (weights, dropout seed state), of the optimizer and of the metrics
goes into a liferaft checkpoint every ``save_freq`` batches and at each epoch end; a new
``fit()`` (on this machine or a fresh one) continues at the epoch and batch where the
last checkpoint was taken instead of restarting the epoch. With ``monitor=`` on the
Checkpointer, ``keep_best`` keeps the best epoch and :meth:`LiferaftCallback.load_best`
puts its weights back.

>>> import liferaft
>>> from liferaft.checkpoint.keras import LiferaftCallback
>>> ck = liferaft.Checkpointer("checkpoints", run="mnist", keep_last=2, keep_best=1,
...                            monitor="val_loss", mode="min")                # doctest: +SKIP
>>> model.fit(x, y, epochs=10, validation_split=0.1,
...           callbacks=[LiferaftCallback(ck, save_freq=200)])                # doctest: +SKIP
>>> LiferaftCallback(ck).load_best(model)                                     # doctest: +SKIP

Resuming in the middle of an epoch is exact when the order of that epoch's batches does
not depend on how many global random draws came before it: ``shuffle=False`` (over data
you shuffle per epoch yourself), a ``keras.utils.PyDataset`` that shuffles from the epoch
number, or a seeded ``tf.data`` pipeline. With ``shuffle=True`` on arrays, Keras draws
the order from torch's global generator when the epoch's iterator is made, so the rest
of an interrupted epoch is drawn afresh. Resuming at an epoch boundary is exact either way
for the model, optimizer and dropout state.
"""

from __future__ import annotations

from typing import Any

import keras

from ..errors import LiferaftError
from .core import Checkpointer, Restored
from .rng import capture_rng, restore_rng


def _arrays(variables: list[Any]) -> list[Any]:
    return [keras.ops.convert_to_numpy(v) for v in variables]


def _assign(variables: list[Any], arrays: list[Any], what: str, name: str) -> None:
    if len(variables) != len(arrays):
        raise LiferaftError(
            f"checkpoint {name} has {len(arrays)} {what} variables, this model has {len(variables)}",
            "resume with the same model and optimizer as the run that saved it",
        )
    for v, a in zip(variables, arrays, strict=True):
        if tuple(v.shape) != tuple(a.shape):
            raise LiferaftError(
                f"checkpoint {name}: {what} variable {v.path} has shape {tuple(a.shape)} there, {tuple(v.shape)} here",
                "resume with the same model and optimizer as the run that saved it",
            )
        v.assign(a)


def _numbers(logs: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (logs or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class LiferaftCallback(keras.callbacks.Callback):
    """Save the whole training state through a Checkpointer; resume from it when ``fit()`` starts.

    Parameters
    ----------
    checkpointer
        Where checkpoints go (its retention applies; give it ``monitor=`` to keep the best).
    save_freq
        ``"epoch"`` (at each epoch end) or a number of batches (and at each epoch end).
    resume
        Restore the newest valid checkpoint when ``fit()`` starts.
    """

    def __init__(self, checkpointer: Checkpointer, *, save_freq: str | int = "epoch", resume: bool = True) -> None:
        super().__init__()
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise LiferaftError(f"save_freq={save_freq!r} is not 'epoch' or a number of batches", 'pass save_freq="epoch" or e.g. 500')
        self.checkpointer = checkpointer
        self.save_freq = save_freq
        self.resume = resume
        self.restored: Restored | None = None
        self._epoch = 0
        self._batch = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None  # what to put back when the resumed epoch begins

    # ------------------------------------------------------------ state

    def _state(self, epoch: int, batch: int, rng: dict[str, Any] | None) -> dict[str, Any]:
        model = self.model
        optimizer = model.optimizer
        return {
            "epoch": epoch,  # epochs finished before this point
            "batch": batch,  # batches done in the epoch under way
            "model": _arrays(model.variables),
            "optimizer": _arrays(optimizer.variables) if optimizer is not None else [],
            "metrics": _arrays(model.metrics_variables) if batch else [],
            "rng": rng,
        }

    def _step(self) -> int:
        optimizer = self.model.optimizer
        return int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else self._epoch

    def _apply(self, r: Restored) -> None:
        state = r.state
        if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
            raise LiferaftError(
                f"checkpoint {r.path.name} was not saved by the Keras callback", "give the callback its own Checkpointer folder"
            )
        model = self.model
        if not model.built:
            raise LiferaftError(
                "the model is not built, so its weights cannot be restored", "build it first (an Input layer, or call it on a batch)"
            )
        _assign(model.variables, state["model"], "model", r.path.name)
        optimizer = model.optimizer
        if optimizer is not None and state["optimizer"]:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            _assign(optimizer.variables, state["optimizer"], "optimizer", r.path.name)
        model._initial_epoch = int(state["epoch"])
        self._pending = {
            "epoch": int(state["epoch"]),
            "batch": int(state["batch"]),
            "metrics": state.get("metrics") or [],
            "rng": state.get("rng"),
        }

    # ------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.restored = None
        if self.resume:
            self.restored = self.checkpointer.restore()
            if self.restored is not None:
                self._apply(self.restored)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch, self._batch = epoch, 0
        pending, self._pending = self._pending, None
        if pending is not None and pending["epoch"] == epoch:
            if pending["rng"] is not None:
                restore_rng(pending["rng"])
            if pending["batch"]:
                if pending["metrics"]:
                    _assign(self.model.metrics_variables, pending["metrics"], "metrics", "resumed")
                self._skip(pending["batch"])
        self._epoch_rng = capture_rng()

    def _skip(self, batches: int) -> None:
        """Let the first ``batches`` batches of this epoch go by untrained: they were trained before."""
        model = self.model
        train = model.train_function
        left = [batches]

        def skipping(data: Any) -> Any:
            if left[0] > 0:
                left[0] -= 1
                if left[0] == 0:
                    model.train_function = train
                return {}
            return train(data)

        model.train_function = skipping
        self._batch = -batches  # on_train_batch_end counts up to 0 through the skipped ones

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._batch < 0:
            self._batch += 1
            if self._batch == 0:
                self._batch = batch + 1
            return
        self._batch = batch + 1
        if self.save_freq == "epoch":
            return
        steps = self.params.get("steps") if isinstance(self.params, dict) else None
        if steps is not None and self._batch >= steps:
            return  # the epoch-end save covers the last batch
        step = self._step()
        if step % int(self.save_freq) == 0:
            self.checkpointer.save(step, self._state(self._epoch, self._batch, self._epoch_rng), metrics=_numbers(logs))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.checkpointer.save(self._step(), self._state(epoch + 1, 0, capture_rng()), metrics=_numbers(logs))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.model._initial_epoch = None
        self.checkpointer.wait()

    # ------------------------------------------------------------ best

    def load_best(self, model: Any | None = None) -> Restored | None:
        """Put the best checkpoint's weights (by the Checkpointer's ``monitor``) into ``model``.

        >>> LiferaftCallback(ck).load_best(model)      # like ModelCheckpoint(save_best_only)  # doctest: +SKIP
        """
        model = model if model is not None else self.model
        r = self.checkpointer.restore(best=True)
        if r is not None:
            _assign(model.variables, r.state["model"], "model", r.path.name)
        return r
