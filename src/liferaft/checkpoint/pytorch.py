"""PyTorch: model, optimizer, scheduler, GradScaler, DataLoader position and RNG state in one call.

>>> from liferaft.checkpoint.pytorch import TorchCheckpoint
>>> tc = TorchCheckpoint(ck, model=model, optimizer=opt, scheduler=sched, scaler=scaler,
...                      loader=loader)                                                # doctest: +SKIP
>>> r = tc.resume()                      # loads everything; None on a first run    # doctest: +SKIP
>>> start = r.step + 1 if r else 0                                                   # doctest: +SKIP
>>> tc.save(step, metrics={"val_loss": val_loss})                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import LiferaftError
from .core import Checkpointer, Restored
from .rng import ResumableSampler, capture_rng, restore_rng

_RESERVED = ("rng", "extra", "liferaft")


def _has(obj: Any, *methods: str) -> bool:
    return all(callable(getattr(obj, m, None)) for m in methods)


def _is_loader(obj: Any) -> bool:
    """A torch DataLoader (one without state_dict of its own, unlike torchdata's StatefulDataLoader)."""
    return callable(getattr(obj, "_get_iterator", None)) and hasattr(obj, "batch_sampler") and hasattr(obj, "dataset")


class _LoaderState:
    """A DataLoader's part of a checkpoint: its ResumableSampler where the loop is, and its generator."""

    def __init__(self, name: str, loader: Any) -> None:
        sampler = loader.sampler
        if not isinstance(sampler, ResumableSampler):
            raise LiferaftError(
                f"{name}=DataLoader draws from a {type(sampler).__name__}, which cannot resume mid-epoch",
                "build it with sampler=ResumableSampler(len(dataset), seed=0)",
            )
        sampler.follow(loader)
        self.loader = loader
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sampler": self.sampler.state_dict()}
        if self.loader.generator is not None:
            state["generator"] = self.loader.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(dict(state["sampler"]))
        if state.get("generator") is not None:
            if self.loader.generator is None:
                raise LiferaftError(
                    "the checkpoint holds the DataLoader's generator, this DataLoader has none",
                    "pass generator=torch.Generator().manual_seed(0) to the DataLoader, as when saving",
                )
            self.loader.generator.set_state(state["generator"])


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
        an LR scheduler, a ``torch.amp.GradScaler``, ...; ``torch.Generator`` objects
        (saved with ``get_state()``); and a ``torch.utils.data.DataLoader`` built with
        ``sampler=ResumableSampler(...)``, saved as its sampler's position and its
        ``generator``. Each is saved under its keyword.

    Notes
    -----
    Pass the DataLoader (``loader=loader``) rather than its sampler: with
    ``num_workers > 0`` the loader fetches ``prefetch_factor * num_workers`` batches
    ahead of your loop, and the sampler alone would save the position of what was
    fetched, so a resumed run skipped the batches fetched but not trained on. Given
    the loader, the sampler counts the batches the loader hands your loop (see
    :meth:`ResumableSampler.follow`), and a checkpoint holds the position after the
    batch your loop last received, whatever ``num_workers``.

    For a resumed run to draw exactly what the uninterrupted one would have, give the
    ``DataLoader`` its own generator (``generator=torch.Generator().manual_seed(0)``;
    ``loader=`` saves it): without one, every ``iter(loader)`` takes a seed from torch's
    global generator, and a run resumed mid-epoch starts one more iterator than the
    uninterrupted run did, which shifts every later random draw (dropout, augmentation).

    Examples
    --------
    >>> ck = liferaft.Checkpointer("checkpoints", run="mnist")                   # doctest: +SKIP
    >>> sampler = ResumableSampler(len(dataset), seed=0)                        # doctest: +SKIP
    >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=2,
    ...                     generator=torch.Generator().manual_seed(0))           # doctest: +SKIP
    >>> tc = TorchCheckpoint(ck, model=model, optimizer=opt, scheduler=sched,
    ...                      scaler=scaler, loader=loader)                        # doctest: +SKIP
    >>> r = tc.resume()                                                          # doctest: +SKIP
    >>> for step in range(r.step + 1 if r else 0, total_steps):                  # doctest: +SKIP
    ...     train_one_step()
    ...     if step % 500 == 0:
    ...         tc.save(step, metrics={"loss": loss.item()})
    """

    def __init__(self, checkpointer: Checkpointer, *, rng: bool = True, **objects: Any) -> None:
        self._parts: dict[str, Any] = {}  # what state_dict()/get_state() is called on, by keyword
        for name, obj in objects.items():
            if name in _RESERVED:
                raise LiferaftError(f"{name!r} is a reserved name in TorchCheckpoint", "pass the object under another keyword")
            if _has(obj, "state_dict", "load_state_dict") or _has(obj, "get_state", "set_state"):
                self._parts[name] = obj
            elif _is_loader(obj):
                self._parts[name] = _LoaderState(name, obj)
            else:
                raise LiferaftError(
                    f"{name}={type(obj).__name__} has no state_dict()/load_state_dict()",
                    "pass models, optimizers, schedulers, scalers, DataLoaders or torch.Generator objects",
                )
        self.checkpointer = checkpointer
        self.objects = objects
        self.rng = rng

    def state_dict(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Everything in one dict (what :meth:`save` hands to the Checkpointer)."""
        state: dict[str, Any] = {name: _get(part) for name, part in self._parts.items()}
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
        for name, part in self._parts.items():
            _set(part, state[name])
        if self.rng and "rng" in state:
            restore_rng(state["rng"])

    def save(self, step: int, *, metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        """Save every object (and the RNGs) as checkpoint ``step``; returns once copied to host memory.

        A DataLoader passed as an object is saved at the batch your loop last received
        from it: save after the training step on that batch, and a resumed run starts
        with the batch after it.
        """
        self.checkpointer.save(step, self.state_dict(extra), metrics=metrics)

    def resume(self, step: int | None = None, *, best: bool = False) -> Restored | None:
        """Restore the newest valid checkpoint (or ``step``, or the best) into the objects; None on a first run."""
        r = self.checkpointer.restore(step, best=best)
        if r is not None:
            if not isinstance(r.state, Mapping):
                raise LiferaftError(f"checkpoint {r.path.name} was not saved by TorchCheckpoint", "restore it with Checkpointer.restore()")
            self.load_state_dict(r.state)
        return r
