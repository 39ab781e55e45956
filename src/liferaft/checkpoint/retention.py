"""Which checkpoints to keep: keep-last, keep-best and keep-every-N, plus what must never go."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import LiferaftError


@dataclass(frozen=True)
class Policy:
    """Retention settings of a :class:`~liferaft.Checkpointer`."""

    keep_last: int | None = 3
    keep_best: int = 0
    monitor: str | None = None
    mode: str = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and (isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int)):
            raise LiferaftError(f"keep_last={self.keep_last!r} is not a whole number", "pass keep_last=3, or None to keep all")
        if self.keep_last is not None and self.keep_last < 1:
            raise LiferaftError(f"keep_last={self.keep_last!r} would keep no checkpoint", "pass keep_last=1 or more, or None to keep all")
        if isinstance(self.keep_best, bool) or not isinstance(self.keep_best, int) or self.keep_best < 0:
            raise LiferaftError(f"keep_best={self.keep_best!r} is not a count", "pass keep_best=0 or more")
        if self.keep_best and not self.monitor:
            raise LiferaftError(
                f"keep_best={self.keep_best} needs a metric to rank by", 'pass monitor="val_loss" (and mode="min" or "max")'
            )
        if self.mode not in ("min", "max"):
            raise LiferaftError(f"mode={self.mode!r} is not 'min' or 'max'", 'pass mode="min" for a loss, mode="max" for an accuracy')
        if self.keep_every is not None and (
            isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int) or self.keep_every < 1
        ):
            raise LiferaftError(f"keep_every={self.keep_every!r} is not a positive step count", "pass keep_every=1000 or None")

    def describe(self) -> str:
        """What the rules keep, in words: ``the newest 3 and the best 1 by 'val_loss' (min)``."""
        kept = [f"the newest {self.keep_last}"] if self.keep_last is not None else []
        if self.keep_best:
            kept.append(f"the best {self.keep_best} by {self.monitor!r} ({self.mode})")
        if self.keep_every:
            kept.append(f"every multiple of {self.keep_every}")
        return " and ".join(kept) or "all"

    def rank(self, metrics: Mapping[int, Mapping[str, float]]) -> list[int]:
        """Steps that have the monitored metric, best first (ties: the newer step first)."""
        if not self.monitor:
            return []
        scored = []
        for step, m in metrics.items():
            v = m.get(self.monitor)
            if isinstance(v, (int, float)) and math.isfinite(v):
                scored.append((v if self.mode == "min" else -v, -step, step))
        return [s for *_k, s in sorted(scored)]


def select_keep(
    steps: Iterable[int],
    metrics: Mapping[int, Mapping[str, float]],
    policy: Policy,
    protect: Iterable[int] = (),
) -> set[int]:
    """The steps to keep; everything else may be deleted.

    ``protect`` holds what must never go whatever the policy says: the newest verified
    checkpoint, the one this process resumed from, those not yet in the vault.

    >>> sorted(select_keep([1, 2, 3, 4], {2: {"loss": 0.1}}, Policy(keep_last=1, keep_best=1, monitor="loss")))
    [2, 4]
    """
    all_steps = sorted(set(steps))
    keep = {s for s in protect if s in all_steps}
    if policy.keep_last is None:
        keep.update(all_steps)
    else:
        keep.update(all_steps[-policy.keep_last :])
    if policy.keep_best:
        keep.update(policy.rank({s: metrics.get(s, {}) for s in all_steps})[: policy.keep_best])
    if policy.keep_every:
        keep.update(s for s in all_steps if s % policy.keep_every == 0)
    return keep
