"""Exact resume: random number generator states and a sampler that knows where it is.

An interrupted and resumed run matches an uninterrupted one only if, after the restore,
every random draw and every batch is the same. :func:`capture_rng` / :func:`restore_rng`
cover Python's ``random``, numpy's global generator and torch (CPU and each CUDA device);
:class:`ResumableSampler` gives each epoch an order that depends only on (seed, epoch)
and resumes in the middle of one.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Iterator, Sized
from typing import Any

from ..errors import LiferaftError


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

    With ``num_workers > 0`` a DataLoader fetches ahead of your loop, so pass the count
    your loop consumed: ``sampler.state_dict(consumed=batches_done * batch_size)``.

    >>> from liferaft.checkpoint import ResumableSampler
    >>> sampler = ResumableSampler(len(dataset), seed=0)                       # doctest: +SKIP
    >>> loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler)  # doctest: +SKIP
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

    def state_dict(self, consumed: int | None = None) -> dict[str, int | bool]:
        return {
            "length": self.length,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position if consumed is None else int(consumed),
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
