"""PyTorch: model, optimizer, scheduler, GradScaler, sampler and RNG state in one call.

>>> from liferaft.checkpoint.pytorch import TorchCheckpoint
>>> tc = TorchCheckpoint(ck, model=model, optimizer=opt, scheduler=sched, scaler=scaler)  # doctest: +SKIP
>>> r = tc.resume()                      # loads everything; None on a first run    # doctest: +SKIP
>>> start = r.step + 1 if r else 0                                                   # doctest: +SKIP
>>> tc.save(step, metrics={"val_loss": val_loss})                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import LiferaftError
from .core import Checkpointer, Restored
from .rng import capture_rng, restore_rng

_RESERVED = ("rng", "extra", "liferaft")


def _has(obj: Any, *methods: str) -> bool:
    return all(callable(getattr(obj, m, None)) for m in methods)


def _get(obj: Any) -> Any:
    return obj.state_dict() if _has(obj, "state_dict", "load_state_dict") else obj.get_state()


def _set(obj: Any, state: Any) -> None:
    if _has(obj, "state_dict", "load_state_dict"):
        obj.load_state_dict(state)
    else:
        obj.set_state(state)  # a torch.Generator, e.g. a DataLoader's


class TorchCheckpoint:
    """Save and restore a training loop's objects together through a :class:`~liferaft.Checkpointer`.

    Parameters
    ----------
    checkpointer
        Where checkpoints go.
    rng
        Also save and restore the random generators (python, numpy, torch CPU and CUDA),
        so a resumed run draws what the uninterrupted one would have.
    **objects
        Anything with ``state_dict()`` and ``load_state_dict()``: a model, an optimizer,
        an LR scheduler, a ``torch.amp.GradScaler``, a :class:`ResumableSampler`, ...;
        and ``torch.Generator`` objects (saved with ``get_state()``). Each is saved
        under its keyword.

    Notes
    -----
    For a resumed run to draw exactly what the uninterrupted one would have, give the
    ``DataLoader`` its own generator (``generator=torch.Generator().manual_seed(0)``,
    passed here too): without one, every ``iter(loader)`` takes a seed from torch's
    global generator, and a run resumed mid-epoch starts one more iterator than the
    uninterrupted run did, which shifts every later random draw (dropout, augmentation).

    Examples
    --------
    >>> ck = liferaft.Checkpointer("checkpoints", run="mnist")                   # doctest: +SKIP
    >>> tc = TorchCheckpoint(ck, model=model, optimizer=opt, scheduler=sched,
    ...                      scaler=scaler, sampler=sampler)                      # doctest: +SKIP
    >>> r = tc.resume()                                                          # doctest: +SKIP
    >>> for step in range(r.step + 1 if r else 0, total_steps):                  # doctest: +SKIP
    ...     train_one_step()
    ...     if step % 500 == 0:
    ...         tc.save(step, metrics={"loss": loss.item()})
    """

    def __init__(self, checkpointer: Checkpointer, *, rng: bool = True, **objects: Any) -> None:
        for name, obj in objects.items():
            if name in _RESERVED:
                raise LiferaftError(f"{name!r} is a reserved name in TorchCheckpoint", "pass the object under another keyword")
            if not (_has(obj, "state_dict", "load_state_dict") or _has(obj, "get_state", "set_state")):
                raise LiferaftError(
                    f"{name}={type(obj).__name__} has no state_dict()/load_state_dict()",
                    "pass models, optimizers, schedulers, scalers, samplers or torch.Generator objects",
                )
        self.checkpointer = checkpointer
        self.objects = objects
        self.rng = rng

    def state_dict(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Everything in one dict (what :meth:`save` hands to the Checkpointer)."""
        state: dict[str, Any] = {name: _get(obj) for name, obj in self.objects.items()}
        if self.rng:
            state["rng"] = capture_rng()
        state["extra"] = dict(extra or {})
        state["liferaft"] = {"objects": list(self.objects)}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict` into the objects (and the RNGs)."""
        missing = [name for name in self.objects if name not in state]
        if missing:
            saved = [k for k in state if k not in _RESERVED]
            raise LiferaftError(
                f"the checkpoint has no {missing[0]!r} (it has {', '.join(saved)})", "pass the same keywords as when saving"
            )
        for name, obj in self.objects.items():
            _set(obj, state[name])
        if self.rng and "rng" in state:
            restore_rng(state["rng"])

    def save(self, step: int, *, metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        """Save every object (and the RNGs) as checkpoint ``step``; returns once copied to host memory."""
        self.checkpointer.save(step, self.state_dict(extra), metrics=metrics)

    def resume(self, step: int | None = None, *, best: bool = False) -> Restored | None:
        """Restore the newest valid checkpoint (or ``step``, or the best) into the objects; None on a first run."""
        r = self.checkpointer.restore(step, best=best)
        if r is not None:
            if not isinstance(r.state, Mapping):
                raise LiferaftError(f"checkpoint {r.path.name} was not saved by TorchCheckpoint", "restore it with Checkpointer.restore()")
            self.load_state_dict(r.state)
        return r
