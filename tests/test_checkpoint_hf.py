"""Hugging Face Trainer: each checkpoint-N committed; resume_from_checkpoint gives the newest valid one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import liferaft  # noqa: E402
from conftest import machine  # noqa: E402
from liferaft.checkpoint.folder import MANIFEST  # noqa: E402
from liferaft.checkpoint.hf import LiferaftCallback, resume_from_checkpoint  # noqa: E402
from liferaft.errors import LiferaftError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (32, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_model(seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)  # from a config: no download
    return transformers.GPT2LMHeadModel(config)


class Crash(transformers.TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt  # the runtime is gone


def run(out: Path, seed: int, callbacks: list, resume: str | None = None) -> dict[int, float]:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=12,
        save_strategy="steps",
        save_steps=4,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=tiny_model(seed), args=args, train_dataset=Tokens(), callbacks=callbacks)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    return losses


def test_trainer_checkpoints_go_to_the_vault_and_resume_exactly(tmp_path: Path) -> None:
    full = run(tmp_path / "full", 0, [])
    assert sorted(full) == list(range(1, 13))

    vault = str(tmp_path / "vault")
    out = tmp_path / "m1" / "out"
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("out", run="hf", vault=vault, prefix="checkpoint-", keep_last=2)
    assert resume_from_checkpoint(ck) is None  # first run: None, where the Trainer's True would raise
    with pytest.raises(KeyboardInterrupt):
        run(out, 0, [LiferaftCallback(ck), Crash(at=6)])
    ck.wait()
    assert (out / "checkpoint-4" / MANIFEST).exists()
    snaps = [s for s in ck.vault.snapshots(run="hf") if s.tags.get("liferaft.kind") == "checkpoint"]
    assert [s.step for s in snaps] == [4]
    assert snaps[0].metrics.get("loss") == full[4]
    shutil.rmtree(tmp_path / "m1")  # a fresh machine

    out2 = tmp_path / "m2" / "out"
    (out2 / "checkpoint-99").mkdir(parents=True)  # a folder the Trainer died writing: no manifest
    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("out", run="hf", vault=vault, prefix="checkpoint-", keep_last=2)
    path = resume_from_checkpoint(ck2)
    assert path == str(out2 / "checkpoint-4")
    second = run(out2, 123, [LiferaftCallback(ck2)], resume=path)
    # steps 1-4 come back with the checkpoint's trainer state; 5-12 were trained again
    assert second == full  # loss for loss
    steps = sorted(s.step for s in ck2.vault.snapshots(run="hf"))
    assert steps == [4, 8, 12]  # keep_last=2, plus the one this process resumed from, in the vault ...
    names = sorted(p.name for p in out2.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-12", "checkpoint-4", "checkpoint-8", "checkpoint-99"]  # ... and here


def test_callback_refuses_a_mismatched_checkpointer(tmp_path: Path) -> None:
    with pytest.raises(LiferaftError, match='prefix="checkpoint-"'):
        LiferaftCallback(liferaft.Checkpointer(tmp_path / "out", run="hf", vault=False))
    ck = liferaft.Checkpointer(tmp_path / "elsewhere", run="hf", vault=False, prefix="checkpoint-")
    with pytest.raises(LiferaftError, match="output_dir"):
        run(tmp_path / "out", 0, [LiferaftCallback(ck)])
