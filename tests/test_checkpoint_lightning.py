"""PyTorch Lightning: the Trainer's checkpoints go to the vault; ckpt_path resumes from the newest valid one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

import liferaft  # noqa: E402
from conftest import machine  # noqa: E402
from liferaft.checkpoint.lightning import LiferaftLightning  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")


class Tiny(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.losses: dict[int, float] = {}
        self.val: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses[self.global_step] = loss.item()
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val[self.global_step] = float(self.trainer.callback_metrics["val_loss"])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x.sum(1, keepdim=True)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=8), torch.utils.data.DataLoader(ds, batch_size=16)


def trainer(root: Path, epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )


def test_trainer_commits_checkpoints_and_resumes_from_the_vault(tmp_path: Path) -> None:
    train, val = loaders()
    full = Tiny(0)
    trainer(tmp_path / "full", 3, []).fit(full, train, val)
    assert len(full.losses) == 12

    vault = str(tmp_path / "vault")
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="pl", vault=vault, keep_last=1, monitor="val_loss")
    cb = LiferaftLightning(ck)
    assert cb.resume_path() is None  # first run
    first = Tiny(0)
    trainer(tmp_path / "m1", 2, [cb]).fit(first, train, val, ckpt_path=cb.resume_path())
    snaps = [s for s in ck.vault.snapshots(run="pl") if s.tags.get("liferaft.kind") == "checkpoint"]
    best = min(first.val, key=first.val.get)
    assert sorted(s.step for s in snaps) == sorted({8, best})  # the newest, and the best by val_loss
    assert {s.step: s.metrics["val_loss"] for s in snaps} == {s: first.val[s] for s in {8, best}}
    assert not list((tmp_path / "m1").rglob("*.ckpt"))  # nothing went around liferaft
    shutil.rmtree(tmp_path / "m1")  # a fresh machine

    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("checkpoints", run="pl", vault=vault, keep_last=1, monitor="val_loss")
    cb2 = LiferaftLightning(ck2)
    second = Tiny(42)  # other initial weights: they must come from the checkpoint
    t2 = trainer(tmp_path / "m2", 3, [cb2])
    t2.fit(second, train, val, ckpt_path=cb2.resume_path())
    assert ck2.resumed_step == 8
    assert t2.global_step == 12
    assert second.losses == {s: full.losses[s] for s in range(8, 12)}  # loss for loss
    for a, b in zip(full.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
