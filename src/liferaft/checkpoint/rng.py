"""Exact resume: random number generator states and a sampler that knows where it is.

An interrupted and resumed run matches an uninterrupted one only if, after the restore,
every random draw and every batch is the same. :func:`capture_rng` / :func:`restore_rng`
cover Python's ``random``, numpy's global generator and torch (CPU and each CUDA device);
:class:`ResumableSampler` gives each epoch an order that depends only on (seed, epoch)
and resumes in the middle of one.
"""

from __future__ import annotations

import inspect
import random
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import LiferaftError

_T = TypeVar("_T")


def capture_rng(*, cuda: bool = True) -> dict[str, Any]:
    """The state of every global random generator in use, to put in a checkpoint.

    numpy and torch are included only when already imported (this never imports them);
    CUDA generators only when CUDA is initialised.

    >>> from liferaft.checkpoint import capture_rng, restore_rng
    >>> ck.save(step, {"model": model.state_dict(), "rng": capture_rng()})   # doctest: +SKIP
    >>> restore_rng(ck.restore().state["rng"])                                # doctest: +SKIP
    """
    out: dict[str, Any] = {"python": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        out["numpy"] = np.random.get_state()
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.get_rng_state()
        if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Put back generator states taken by :func:`capture_rng`."""
    if not isinstance(state, dict) or "python" not in state:
        raise LiferaftError("restore_rng() got something capture_rng() did not make", "pass the dict capture_rng() returned")
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        import numpy as np

        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        import torch

        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
                torch.cuda.set_rng_state_all(state["cuda"])
            else:
                warnings.warn(
                    f"liferaft: the checkpoint has the RNG state of {len(state['cuda'])} CUDA device(s), this machine has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA random draws will differ",
                    stacklevel=2,
                )


class ResumableSampler:
    """Indices of a dataset, shuffled per epoch from (seed, epoch) alone, resumable mid-epoch.

    Use it as a ``torch.utils.data.DataLoader`` sampler (or iterate it yourself). Its
    ``state_dict()`` holds the epoch and how many indices were handed out; after
    ``load_state_dict()``, iteration continues with the next index of that epoch. An
    epoch that runs out moves to the next one by itself; ``set_epoch(e)`` jumps.

    A DataLoader with ``num_workers > 0`` takes indices ahead of your loop
    (``prefetch_factor * num_workers`` batches, into the next epoch near the end of one),
    so what was handed out is not what your loop has trained on. :meth:`follow` the
    loader (``TorchCheckpoint(..., loader=loader)`` does) and ``state_dict()`` is where
    your loop is, whatever ``num_workers``.

    >>> from liferaft.checkpoint import ResumableSampler
    >>> sampler = ResumableSampler(len(dataset), seed=0)                       # doctest: +SKIP
    >>> loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler,
    ...                                      num_workers=2)                     # doctest: +SKIP
    >>> sampler.follow(loader)                                                  # doctest: +SKIP
    >>> ck.save(step, {"model": model.state_dict(), "sampler": sampler.state_dict()})  # doctest: +SKIP
    """

    def __init__(self, data: int | Sized, *, shuffle: bool = True, seed: int = 0) -> None:
        n = data if isinstance(data, int) else len(data)
        if isinstance(n, bool) or n < 0:
            raise LiferaftError(f"ResumableSampler needs a dataset size, got {data!r}", "pass len(dataset)")
        self.length = int(n)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []
        # Where the latest iteration began, and a count that changes whenever an iteration
        # begins or the position is set from outside (set_epoch, load_state_dict).
        self._began: tuple[int, int] | None = None
        self._generation = 0
        self._batch_size = 1
        self._loop: _LoopProgress | None = None  # the followed loader's latest iteration

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``."""
        if self._order_epoch != epoch:
            order = list(range(self.length))
            if self.shuffle:
                random.Random(f"liferaft-sampler-{self.seed}-{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def __len__(self) -> int:
        return self.length - self.position

    def __iter__(self) -> Iterator[int]:
        self._generation += 1
        self._began = (self.epoch, self.position)
        order = self.order(self.epoch)
        while self.position < self.length:
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch`` (its start, unless it is the epoch a restore left off in)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0
            self._moved()

    def follow(self, loader: Any) -> None:
        """Count the batches ``loader`` hands your loop, so that :meth:`state_dict` is where the loop is.

        ``loader`` is the ``torch.utils.data.DataLoader`` built with ``sampler=self``
        (and ``batch_size``, or none). A DataLoader with workers fetches
        ``prefetch_factor * num_workers`` batches ahead; the loader hands them to your
        loop in order, so the position your loop reached is where the batch it last
        received ends. A new ``iter(loader)`` also starts there (not after what was
        fetched ahead), as it does with ``num_workers=0``. ``TorchCheckpoint(...,
        loader=loader)`` calls this for you.

        >>> sampler.follow(loader)                                                 # doctest: +SKIP
        >>> for xb, yb in loader:                                                  # doctest: +SKIP
        ...     train_step(xb, yb)
        ...     ck.save(step, {"sampler": sampler.state_dict(), ...})   # the batches trained on
        """
        make = getattr(loader, "_get_iterator", None)
        if not callable(make) or not hasattr(loader, "batch_sampler"):
            raise LiferaftError(
                f"ResumableSampler.follow() needs a torch.utils.data.DataLoader, got {type(loader).__name__}",
                "pass the DataLoader built with sampler=this sampler",
            )
        batches = loader.batch_sampler
        data = sys.modules.get("torch.utils.data")
        if batches is None and loader.sampler is self:
            batch_size = 1
        elif (
            data is not None
            and type(batches) is data.BatchSampler
            and batches.sampler is self
            and isinstance(batches.batch_size, int)
            and batches.batch_size > 0
        ):
            batch_size = batches.batch_size
        else:
            raise LiferaftError(
                "this DataLoader does not draw its batches from this sampler in batches of batch_size",
                "build it as DataLoader(dataset, batch_size=32, sampler=sampler)",
            )
        if getattr(loader, "in_order", True) is False:
            raise LiferaftError(
                "this DataLoader has in_order=False: it hands batches out of order, so no position says what your loop has seen",
                "build it with in_order=True (the default)",
            )
        hook = getattr(make, "__self__", None)
        if isinstance(hook, _FollowLoader) and hook.sampler is self:
            return  # followed already
        self._batch_size = batch_size
        loader._get_iterator = _FollowLoader(self, make)._get_iterator
        if getattr(loader, "_iterator", None) is not None:  # persistent workers, started before
            loader._iterator = _FollowedIterator(self, loader._iterator, _LoopProgress(None))

    def _loop_position(self) -> tuple[int, int]:
        """(epoch, position) the loop has reached: with :meth:`follow`, the end of the last batch the loader handed it."""
        loop = self._loop
        if loop is None or loop.finished or loop.generation != self._generation or self._began is None:
            return self.epoch, self.position
        epoch, start = self._began
        position = start + loop.batches * self._batch_size
        if position > self.length:  # the last, short batch of the epoch: it is over
            return epoch + 1, 0
        return epoch, position

    def state_dict(self, consumed: int | None = None) -> dict[str, int | bool]:
        """The sampler's state: its seed and size, the epoch, and the position in it.

        The position is where your loop is (see :meth:`follow`). ``consumed`` overrides it
        by hand: how many indices of the epoch the latest iteration began in your loop has
        received, counted from the start of that epoch.
        """
        if consumed is None:
            epoch, position = self._loop_position()
        else:
            epoch, position = (self._began[0] if self._began is not None else self.epoch), int(consumed)
        return {
            "length": self.length,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": epoch,
            "position": position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("length", "shuffle", "seed"):
            if state.get(key) != getattr(self, key):
                raise LiferaftError(
                    f"the sampler was saved with {key}={state.get(key)!r}, this one has {key}={getattr(self, key)!r}",
                    "resume with the same dataset and seed, or start the sampler afresh",
                )
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), self.length)
        self._moved()

    def _moved(self) -> None:
        self._generation += 1
        self._began = None

    def _begin(self, start: Callable[[], _T]) -> tuple[_T, _LoopProgress]:
        """A followed loader starts an iteration: from where the loop is, not from what was fetched ahead."""
        self.epoch, self.position = self._loop_position()
        before = self._generation
        started = start()
        # With workers the iterator fetches ahead at once, so this sampler has begun; with
        # none it begins at the first batch, and handed out is what the loop received.
        self._loop = _LoopProgress(self._generation if self._generation != before else None)
        return started, self._loop


@dataclass
class _LoopProgress:
    """One iteration of a followed DataLoader: batches handed to the loop, and whether it ran out."""

    generation: int | None
    batches: int = 0
    finished: bool = False


class _FollowLoader:
    """Replaces a followed DataLoader's ``_get_iterator``: every iterator it makes is counted."""

    def __init__(self, sampler: ResumableSampler, make: Any) -> None:
        self.sampler = sampler
        # The loader holds this hook: a weak reference back to it keeps the two out of a cycle,
        # so a loader with persistent workers still shuts them down as soon as it is dropped.
        self._make = weakref.WeakMethod(make) if inspect.ismethod(make) else lambda: make

    def _get_iterator(self) -> Any:
        make = self._make()
        assert make is not None  # the loader is calling
        iterator, progress = self.sampler._begin(make)
        return _FollowedIterator(self.sampler, iterator, progress)


class _FollowedIterator:
    """A DataLoader iterator that counts the batches it hands out (everything else is the iterator's own)."""

    def __init__(self, sampler: ResumableSampler, iterator: Any, progress: _LoopProgress) -> None:
        self._sampler = sampler
        self._iterator = iterator
        self._progress = progress

    def __iter__(self) -> _FollowedIterator:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._progress.finished = True
            raise
        self._progress.batches += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str) -> Any:
        if name == "_iterator":
            raise AttributeError(name)
        return getattr(self._iterator, name)

    def _reset(self, loader: Any, first_iter: bool = False) -> None:
        # persistent_workers: the DataLoader reuses its iterator for the next epoch
        _, self._progress = self._sampler._begin(lambda: self._iterator._reset(loader, first_iter))
