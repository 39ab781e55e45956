"""Keras 3: one callback that resumes mid-training (epoch and step) and keeps the best model.

It replaces ``BackupAndRestore`` + ``ModelCheckpoint(save_best_only=True)``: every
variable of the model (weights, dropout seed state), of the optimizer and of the metrics,
and the global random generators, go into a liferaft checkpoint every ``save_freq``
batches and at each epoch end; ``fit()`` on a fresh machine, or again after one was cut
off, continues at the epoch and batch where the last checkpoint was taken instead of
restarting the epoch. With ``monitor=`` on the Checkpointer, ``keep_best`` keeps the best
epoch and :meth:`LiferaftCallback.load_best` puts its weights back.

>>> import liferaft
>>> from liferaft.checkpoint.keras import LiferaftCallback
>>> ck = liferaft.Checkpointer("checkpoints", run="mnist", keep_last=2, keep_best=1,
...                            monitor="val_loss", mode="min")                # doctest: +SKIP
>>> model.fit(x, y, epochs=10, validation_split=0.1,
...           callbacks=[LiferaftCallback(ck, save_freq=200)])                # doctest: +SKIP
>>> LiferaftCallback(ck).load_best(model)                                     # doctest: +SKIP

Another ``fit()`` of a model that finished one with the callback in this process trains on
from that model, as in Keras (``BackupAndRestore`` deletes its backup when a fit ends):
``fit(epochs=3)`` twice trains 6 epochs, ``fit(epochs=6, initial_epoch=3)`` continues to
epoch 6. The checkpoint is restored when the model has not trained here yet (a fresh
machine, a restarted runtime, a rebuilt model) or its last ``fit()`` was cut off. Each
checkpoint records which ``fit()`` of the model saved it, so on a fresh machine a script's
``fit()`` calls replay in order: one the checkpoint is already past takes its weights and
trains nothing, the one that was cut off resumes at its epoch and batch.

Checkpoints are numbered by the optimizer's iterations. A ``compile()`` between two ``fit()``
calls (fine-tuning at a lower rate, or after unfreezing layers) brings a new optimizer that
counts from 0 again: that fit()'s checkpoints are numbered on from the step where the one
before ended (the offset goes into each checkpoint, so a resume on a fresh machine numbers
them the same), so retention keeps the fine-tune's newest and ``restore()`` takes them.
With the same optimizer the iterations go on and are the step numbers, nothing added.

Resuming in the middle of an epoch is exact when the epoch's batch order comes out the
same: ``shuffle=False`` (over data you shuffle per epoch yourself), a
``keras.utils.PyDataset`` that shuffles from the epoch number, a seeded ``tf.data``
pipeline, or on the torch backend ``shuffle=True`` on arrays (Keras draws that order from
torch's global generator as the epoch begins, and the callback puts the generators back
as of then). Random draws in the model carry on exactly too: a seeded layer's seed state
is a model variable, and the global generators (an unseeded ``Dropout`` draws from
torch's on the torch backend, an unseeded ``keras.random.normal(...)`` call from Keras's
global SeedGenerator) are put back as of the checkpoint's batch once the batches before
it have gone by. With ``steps_per_epoch`` set, Keras makes an epoch's iterator at
the end of the one before, so the global draws after a resume differ.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, NamedTuple

import keras

from ..errors import LiferaftError
from .core import Checkpointer, CheckpointWarning, Restored
from .rng import capture_rng, restore_rng

try:  # Keras's global SeedGenerator, which unseeded keras.random calls draw from: no public way to it
    from keras.src.backend.common import global_state as _global_state
    from keras.src.random import seed_generator as _seed_generator
except ImportError:  # pragma: no cover - another Keras layout: that generator is left as it is
    _global_state = _seed_generator = None  # type: ignore[assignment]


class _Done(NamedTuple):
    """What a model's fit() calls with the callback on one run have done in this process."""

    fits: int  # how many finished: a model that finished one is newer than the run's checkpoints
    step: int  # the run's step number where the last one ended


# Per model and run: its next fit() trains on from the model, and numbers its checkpoints on from ``step``.
_FITS_DONE: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], _Done]] = weakref.WeakKeyDictionary()


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


def _global_seeds_known() -> bool:
    return hasattr(_global_state, "get_global_attribute") and hasattr(_seed_generator, "GLOBAL_SEED_GENERATOR")


def _capture() -> dict[str, Any]:
    """The global generators (:func:`capture_rng`) and Keras's global SeedGenerator: its state, or None
    while there is none (``keras.utils.set_random_seed`` drops it; the next unseeded draw makes one)."""
    out = capture_rng()
    if _global_seeds_known():
        gen = _global_state.get_global_attribute(_seed_generator.GLOBAL_SEED_GENERATOR)
        out["keras"] = keras.ops.convert_to_numpy(gen.state) if gen is not None else None
    return out


def _restore(rng: dict[str, Any]) -> None:
    """Put back what :func:`_capture` took (a checkpoint without ``"keras"`` leaves that generator as it is)."""
    if "keras" in rng and _global_seeds_known():
        name = _seed_generator.GLOBAL_SEED_GENERATOR
        if rng["keras"] is None:
            _global_state.set_global_attribute(name, None)
        else:
            gen = _global_state.get_global_attribute(name)
            if gen is None:
                gen = _seed_generator.global_seed_generator()  # draws its seed from Python's random, put back below
            gen.state.assign(rng["keras"])
    restore_rng({k: v for k, v in rng.items() if k != "keras"})


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
        Restore the newest valid checkpoint when ``fit()`` starts, unless the model
        finished a ``fit()`` with the callback in this process (then it trains on as it is).
    """

    def __init__(self, checkpointer: Checkpointer, *, save_freq: str | int = "epoch", resume: bool = True) -> None:
        super().__init__()
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise LiferaftError(f"save_freq={save_freq!r} is not 'epoch' or a number of batches", 'pass save_freq="epoch" or e.g. 500')
        self.checkpointer = checkpointer
        self.save_freq = save_freq
        self.resume = resume
        self.restored: Restored | None = None
        self._fit = 0  # which fit() of this model on this run is under way (0 for the first)
        self._offset = 0  # the step number is this plus the optimizer's iterations
        self._epoch = 0
        self._batch = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None  # what to put back when the resumed epoch begins
        self._skip: dict[str, Any] | None = None  # what to put back once the batches trained before go by
        self._skipping: tuple[Any, Any, Any] | None = None  # (model, its train_function, the stand-in)
        self._sets_initial_epoch = False

    # ------------------------------------------------------------ state

    def _state(self, epoch: int, batch: int, rng: dict[str, Any], epoch_rng: dict[str, Any] | None) -> dict[str, Any]:
        model = self.model
        optimizer = model.optimizer
        return {
            "fit": self._fit,
            "offset": self._offset,  # step number = offset + optimizer iterations, in this fit()
            "epoch": epoch,  # epochs finished before this point
            "batch": batch,  # batches done in the epoch under way
            "model": _arrays(model.variables),
            "optimizer": _arrays(optimizer.variables) if optimizer is not None else [],
            "metrics": _arrays(model.metrics_variables) if batch else [],
            "rng": rng,  # the global generators (and Keras's global SeedGenerator) as of this point
            "epoch_rng": epoch_rng,  # and as of the epoch's start, which its batch order was drawn from
        }

    def _iterations(self) -> int:
        optimizer = self.model.optimizer
        return int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else self._epoch

    def _step(self) -> int:
        """The run's step number: the optimizer's iterations, after the steps of the fit() calls before
        a recompile (whose new optimizer counts from 0 again)."""
        return self._offset + self._iterations()

    def _number_from(self, step: int) -> None:
        """Number this fit()'s steps on from ``step``, where the run is: the optimizer's iterations when
        they have gone on from there (the same optimizer), else after it (a new one counts from 0)."""
        self._offset = max(0, step - self._iterations())

    def _run_key(self) -> tuple[str, str]:
        return (str(self.checkpointer.directory), self.checkpointer.run)

    def _apply(self, r: Restored, *, weights_only: bool = False) -> None:
        state = r.state
        model = self.model
        if not model.built:
            raise LiferaftError(
                "the model is not built, so its weights cannot be restored", "build it first (an Input layer, or call it on a batch)"
            )
        _assign(model.variables, state["model"], "model", r.path.name)
        if weights_only:
            return
        optimizer = model.optimizer
        if optimizer is not None and state["optimizer"]:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            _assign(optimizer.variables, state["optimizer"], "optimizer", r.path.name)
        self._start_at(int(state["epoch"]))
        self._pending = {
            "epoch": int(state["epoch"]),
            "batch": int(state["batch"]),
            "metrics": state.get("metrics") or [],
            "rng": state.get("rng"),
            "epoch_rng": state.get("epoch_rng"),
        }

    def _start_at(self, epoch: int) -> None:
        """Have this fit() start at ``epoch`` (Keras reads it right after on_train_begin)."""
        self.model._initial_epoch = epoch
        self._sets_initial_epoch = True

    def _leave_initial_epoch(self) -> None:
        # Cleared once read, so a fit() cut off later leaves no stale start to the model's next fit().
        if self._sets_initial_epoch:
            self.model._initial_epoch = None
            self._sets_initial_epoch = False

    # ------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._stop_skipping()  # one a cut-off fit() left behind
        self.restored = self._pending = self._skip = None
        model = self.model
        done = _FITS_DONE.get(model, {}).get(self._run_key(), _Done(0, 0))
        self._fit = done.fits
        r = self.checkpointer.restore() if self.resume else None
        if r is None:
            self._number_from(done.step)
            return
        state = r.state
        if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
            raise LiferaftError(
                f"checkpoint {r.path.name} was not saved by the Keras callback", "give the callback its own Checkpointer folder"
            )
        fit = int(state.get("fit", 0))
        if fit < self._fit:
            self._number_from(max(done.step, r.step))
            return  # saved by an earlier fit() of this model, which has trained on since
        self.restored = r
        if fit == self._fit:
            self._apply(r)
            self._offset = int(state.get("offset", 0))
            return
        # A later fit() saved it, so this one had finished (a script replayed on a fresh machine): only the
        # weights, as that fit() may have another optimizer (fine-tuning recompiles), and no epoch to train.
        self._apply(r, weights_only=True)
        self._number_from(r.step)
        self._start_at(int(self.params["epochs"]))
        warnings.warn(
            f"liferaft: checkpoint {r.path.name} was saved by fit() call {fit + 1} of this model and this is call "
            f"{self._fit + 1}: it takes the checkpoint's weights and trains nothing; fit() call {fit + 1} resumes the rest",
            CheckpointWarning,
            stacklevel=2,
        )

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._leave_initial_epoch()
        self._epoch, self._batch = epoch, 0
        pending, self._pending = self._pending, None
        if pending is not None and pending["epoch"] == epoch:
            if not pending["batch"]:
                if pending["rng"] is not None:
                    _restore(pending["rng"])
            else:
                if pending["epoch_rng"] is not None:
                    _restore(pending["epoch_rng"])  # the batch order drawn as this epoch begins
                self._start_skipping(pending)
        self._epoch_rng = _capture()

    def _start_skipping(self, pending: dict[str, Any]) -> None:
        """Let the first ``pending["batch"]`` batches of this epoch go by untrained: they were trained before."""
        model = self.model
        train = model.train_function

        def skipping(data: Any) -> Any:
            return {}

        model.train_function = skipping
        self._skipping = (model, train, skipping)
        self._skip = pending

    def _stop_skipping(self) -> None:
        if self._skipping is not None:
            model, train, skipping = self._skipping
            if model.train_function is skipping:
                model.train_function = train
            self._skipping = None

    def _resume_here(self) -> None:
        """The batches trained before have gone by: put back the metrics and generators as of the checkpoint."""
        pending, self._skip = self._skip, None
        self._stop_skipping()
        if pending is None:
            return
        if pending["metrics"]:
            _assign(self.model.metrics_variables, pending["metrics"], "metrics", "resumed")
        if pending["rng"] is not None:
            _restore(pending["rng"])

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch = batch + 1
        if self._skip is not None:
            if self._batch >= self._skip["batch"]:
                self._resume_here()
            return
        if self.save_freq == "epoch":
            return
        steps = self.params.get("steps") if isinstance(self.params, dict) else None
        if steps is not None and self._batch >= steps:
            return  # the epoch-end save covers the last batch
        step = self._step()
        if step % int(self.save_freq) == 0:
            self.checkpointer.save(step, self._state(self._epoch, self._batch, _capture(), self._epoch_rng), metrics=_numbers(logs))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._skip is not None:
            skipped = self._skip["batch"]
            self._resume_here()
            warnings.warn(
                f"liferaft: the checkpoint was taken after batch {skipped} of epoch {epoch + 1}, which has only "
                f"{self._batch} batches this time, so none of them was trained; resume with the data of the run that saved it",
                CheckpointWarning,
                stacklevel=2,
            )
        self.checkpointer.save(self._step(), self._state(epoch + 1, 0, _capture(), None), metrics=_numbers(logs))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._stop_skipping()
        self._skip = self._pending = None
        self._leave_initial_epoch()
        _FITS_DONE.setdefault(self.model, {})[self._run_key()] = _Done(self._fit + 1, self._step())
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
