"""Hugging Face Trainer: commit each ``checkpoint-N`` to the vault, resume from the newest valid one.

>>> import liferaft
>>> from liferaft.checkpoint.hf import LiferaftCallback, resume_from_checkpoint
>>> ck = liferaft.Checkpointer("out", run="tiny-bert", prefix="checkpoint-", keep_last=2,
...                            keep_best=1, monitor="eval_loss")                 # doctest: +SKIP
>>> trainer = Trainer(model, TrainingArguments(output_dir="out", save_steps=500), ...,
...                   callbacks=[LiferaftCallback(ck)])                          # doctest: +SKIP
>>> trainer.train(resume_from_checkpoint=resume_from_checkpoint(ck))   # None on a first run  # doctest: +SKIP

The Trainer writes ``out/checkpoint-N/`` as usual; when it is done (``on_save``), the
callback hashes the folder into a liferaft manifest and commits it to the vault in the
background. A ``checkpoint-N`` without a manifest (the Trainer died while writing it) is
never resumed from, unlike the Trainer's own choice of the highest number.
``resume_from_checkpoint`` returns the newest folder that verifies, fetched from the vault
on a fresh machine, and None on a first run (where the Trainer's ``True`` raises).

Retention is liferaft's: leave ``save_total_limit`` unset (if set, the callback waits for
the previous commit before the Trainer saves, so the Trainer cannot delete a folder being
uploaded). With ``load_best_model_at_end``, give the Checkpointer
``monitor="eval_<metric_for_best_model>"`` so the best folder is kept.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback

from ..errors import LiferaftError
from .core import Checkpointer, CheckpointWarning

PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR + "-"


class LiferaftCallback(TrainerCallback):
    """Commit every checkpoint the Trainer writes through a Checkpointer (whose folder is ``output_dir``).

    Parameters
    ----------
    checkpointer
        Created with ``prefix="checkpoint-"`` on the Trainer's ``output_dir``.
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        if checkpointer.prefix != PREFIX:
            raise LiferaftError(
                f"the Checkpointer names folders {checkpointer.prefix}N, the Trainer writes {PREFIX}N",
                f'create it with prefix="{PREFIX}"',
            )
        self.checkpointer = checkpointer

    def _check(self, args: Any) -> None:
        out = os.path.abspath(args.output_dir)
        if out != str(self.checkpointer.directory):
            raise LiferaftError(
                f"the Checkpointer's folder is {self.checkpointer.directory}, the Trainer's output_dir is {out}",
                "create the Checkpointer on the Trainer's output_dir",
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check(args)
        if getattr(args, "load_best_model_at_end", False) and args.metric_for_best_model:
            metric = args.metric_for_best_model
            metric = metric if metric.startswith("eval_") else f"eval_{metric}"
            policy = self.checkpointer.policy
            if policy.monitor != metric or not policy.keep_best:
                warnings.warn(
                    f"liferaft: load_best_model_at_end ranks by {metric!r} but the Checkpointer keeps the best by "
                    f"{policy.monitor!r}; its retention may delete the Trainer's best folder (pass monitor={metric!r})",
                    CheckpointWarning,
                    stacklevel=2,
                )

    def _before_save(self, args: Any, control: Any) -> None:
        if control.should_save and args.save_total_limit:
            self.checkpointer.wait()  # the Trainer's rotation must not delete a folder being committed

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before_save(args, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before_save(args, control)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if str(getattr(args, "save_strategy", "")).endswith("best") and args.save_total_limit:
            self.checkpointer.wait()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        folder = os.path.join(args.output_dir, f"{PREFIX}{step}")
        metrics: dict[str, float] = {}
        for entry in state.log_history:
            if entry.get("step") == step:
                for k, v in entry.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        metrics[k] = float(v)
        self.checkpointer.save_folder(step, folder, metrics=metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.checkpointer.wait()


def resume_from_checkpoint(checkpointer: Checkpointer) -> str | None:
    """The folder to pass as ``trainer.train(resume_from_checkpoint=...)``: the newest that verifies, or None.

    On a fresh machine it is fetched from the vault first.

    >>> trainer.train(resume_from_checkpoint=resume_from_checkpoint(ck))    # doctest: +SKIP
    """
    path = checkpointer.restore_path()
    return str(path) if path is not None else None
