"""PyTorch Lightning: the Trainer's checkpoints go to the vault; ckpt_path resumes from the newest valid one."""

from __future__ import annotations

import shutil
import warnings
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


SCORES = [3.0, 1.0, 2.0, 4.0, 5.0, 6.0]  # the metric ModelCheckpoint ranks by, per epoch: the best is epoch 1 (step 8)


class Scored(Tiny):
    """Logs a made-up ``score`` per epoch, so the best checkpoint is neither the first nor the newest."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.save_hyperparameters()
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self.log("score", SCORES[self.current_epoch])
            self.weights[self.global_step] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))


def test_best_checkpoint_loads_by_lightnings_own_names_after_retention(tmp_path: Path) -> None:
    train, val = loaders()
    vault = str(tmp_path / "vault")

    def run(epochs: int, seed: int) -> tuple[liferaft.Checkpointer, LiferaftLightning, pl.callbacks.ModelCheckpoint, pl.Trainer]:
        ck = liferaft.Checkpointer(tmp_path / "m" / "checkpoints", run="pl", vault=vault, keep_last=1, monitor="score")
        cb = LiferaftLightning(ck)
        mc = pl.callbacks.ModelCheckpoint(monitor="score", save_top_k=-1)  # saves every epoch, names no best
        return ck, cb, mc, trainer(tmp_path / "m", epochs, [cb, mc])

    ck, cb, mc, t = run(4, 0)
    first = Scored(0)
    t.fit(first, train, val)
    assert mc.best_model_path.endswith("epoch=1-step=8.ckpt") and not Path(mc.best_model_path).exists()
    assert sorted(c.step for c in ck.checkpoints()) == [8, 16]  # retention: the newest and the best by score

    # The names Lightning keeps load the checkpoint of that step.
    (tested,) = t.test(first, val, ckpt_path="best")
    assert tested["test_loss"] == pytest.approx(first.val[8], abs=1e-6)
    (validated,) = t.validate(first, val, ckpt_path=mc.best_model_path)
    assert validated["val_loss"] == pytest.approx(first.val[8], abs=1e-6)
    # load_from_checkpoint reads the file itself: export writes one.
    exported = cb.export(tmp_path / "best.ckpt", best=True)
    loaded = Scored.load_from_checkpoint(exported)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, first.weights[8][k]), k

    shutil.rmtree(tmp_path / "m")  # a fresh machine: the best (step 8) is in the vault only
    ck2, cb2, mc2, t2 = run(5, 42)
    second = Scored(42)
    t2.fit(second, train, val, ckpt_path=cb2.resume_path())
    assert ck2.resumed_step == 16 and mc2.best_model_path == mc.best_model_path
    (tested,) = t2.test(second, val, ckpt_path="best")  # step 8, fetched from the vault
    assert tested["test_loss"] == pytest.approx(first.val[8], abs=1e-6)
    t2.fit_loop.max_epochs = 6
    with pytest.warns(liferaft.checkpoint.CheckpointWarning, match="step-12 is older than step-20.*resumed from step-8"):
        t2.fit(second, train, val, ckpt_path="best")  # train on from the best: a branch below the newest
    assert ck2.resumed_step == 8 and t2.global_step == 24


def test_lightning_names_retention_deleted_fail_with_what_to_do(tmp_path: Path) -> None:
    train, val = loaders()
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="pl", vault=str(tmp_path / "vault"), keep_last=1, monitor="score")
    cb = LiferaftLightning(ck)
    mc = pl.callbacks.ModelCheckpoint(monitor="score", mode="max", save_top_k=-1)  # ranks the other way round
    t = trainer(tmp_path, 2, [cb, mc])
    model = Scored(0)
    with pytest.warns(liferaft.checkpoint.CheckpointWarning, match="ModelCheckpoint ranks by 'score' \\(max\\)"):
        t.fit(model, train, val)
    assert mc.best_model_path.endswith("epoch=0-step=4.ckpt")  # score 3.0; liferaft kept step 8 (score 1.0)
    with pytest.raises(
        liferaft.LiferaftError, match=r"epoch=0-step=4.ckpt \(liferaft checkpoint step-4\) was deleted by .*cb.best_path\(\)"
    ):
        t.test(model, val, ckpt_path="best")
    with pytest.raises(liferaft.LiferaftError, match=r"no checkpoint at .*nothing.ckpt.*cb.resume_path\(\)"):
        t.test(model, val, ckpt_path=tmp_path / "nothing.ckpt")
    (tested,) = t.test(model, val, ckpt_path=cb.best_path())  # the fix the error names
    assert tested["test_loss"] == pytest.approx(model.val[8], abs=1e-6)


def test_ckpt_path_last_is_the_newest_liferaft_checkpoint_here_or_in_the_vault(tmp_path: Path) -> None:
    train, val = loaders()
    full = Tiny(0)
    trainer(tmp_path / "full", 4, []).fit(full, train, val)
    vault = str(tmp_path / "vault")

    def on(where: Path) -> tuple[liferaft.Checkpointer, LiferaftLightning]:
        with machine(where):
            ck = liferaft.Checkpointer("checkpoints", run="pl", vault=vault, keep_last=1)
        return ck, LiferaftLightning(ck)

    # A first run: no checkpoint anywhere, so "last" trains from scratch, without Lightning's save_last hint.
    ck, cb = on(tmp_path / "m1")
    first = Tiny(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "m1", 2, [cb]).fit(first, train, val, ckpt_path="last")
    assert not [w for w in caught if "no last checkpoint" in str(w.message)]
    assert ck.resumed_step is None and first.losses == {s: full.losses[s] for s in range(8)}

    # The same machine again (a new process): step-8 from the folder.
    ck, cb = on(tmp_path / "m1")
    again = Tiny(42)  # other initial weights: they must come from the checkpoint
    t = trainer(tmp_path / "m1", 3, [cb])
    t.fit(again, train, val, ckpt_path="last")
    assert ck.resumed_step == 8 and t.ckpt_path == str(tmp_path / "m1" / "checkpoints" / "step-8")
    assert t.global_step == 12 and again.losses == {s: full.losses[s] for s in range(8, 12)}
    shutil.rmtree(tmp_path / "m1")  # a fresh machine

    # A fresh machine: step-12 from the vault, and training goes on loss for loss.
    ck, cb = on(tmp_path / "m2")
    second = Tiny(7)
    t = trainer(tmp_path / "m2", 4, [cb])
    t.fit(second, train, val, ckpt_path="last")
    assert ck.resumed_step == 12 and t.ckpt_path == str(tmp_path / "m2" / "checkpoints" / "step-12")
    assert t.global_step == 16 and second.losses == {s: full.losses[s] for s in range(12, 16)}
    for a, b in zip(full.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)

    # validate/test(ckpt_path="last") load the newest checkpoint too, not the weights in memory.
    with torch.no_grad():
        for p in second.parameters():
            p.zero_()
    (validated,) = t.validate(second, val, ckpt_path="last")
    assert t.ckpt_path == str(tmp_path / "m2" / "checkpoints" / "step-16")
    assert validated["val_loss"] == pytest.approx(full.val[16], abs=1e-6)


@pytest.mark.parametrize("save_last", [True, "link"])
def test_save_last_left_on_keeps_one_checkpoint_per_step_and_its_name_loads(tmp_path: Path, save_last: bool | str) -> None:
    train, val = loaders()
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="pl", vault=str(tmp_path / "vault"), keep_last=2)
    cb = LiferaftLightning(ck)
    mc = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "lightning", save_last=save_last)  # a folder nothing else creates
    t = trainer(tmp_path, 2, [cb, mc])
    model = Scored(0)
    t.fit(model, train, val)  # "link" linked last.ckpt into a folder that did not exist: FileNotFoundError
    assert [c.step for c in ck.checkpoints()] == [4, 8]
    assert sorted(s.step for s in ck.vault.snapshots(run="pl")) == [4, 8]  # the second save of a step replaced the first
    assert Path(mc.last_model_path).name == "last.ckpt" and not Path(mc.last_model_path).exists()
    for name in (mc.last_model_path, "last"):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        (tested,) = t.test(model, val, ckpt_path=name)
        assert tested["test_loss"] == pytest.approx(model.val[8], abs=1e-6), name


def test_a_lightning_name_restores_its_step_with_one_vault_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = loaders()
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="pl", vault=str(tmp_path / "vault"), keep_last=2, monitor="score")
    cb = LiferaftLightning(ck)
    mc = pl.callbacks.ModelCheckpoint(monitor="score", save_top_k=2)
    t = trainer(tmp_path, 3, [cb, mc])
    model = Scored(0)
    t.fit(model, train, val)
    assert mc.best_model_path.endswith("epoch=1-step=8.ckpt")
    listings = []
    snapshots = ck.vault.snapshots
    monkeypatch.setattr(ck.vault, "snapshots", lambda *a, **k: listings.append(a) or snapshots(*a, **k))
    (tested,) = t.test(model, val, ckpt_path="best")
    assert tested["test_loss"] == pytest.approx(model.val[8], abs=1e-6)
    assert len(listings) == 1
    shutil.rmtree(tmp_path / "checkpoints" / "step-8")  # from the vault: listed once, then fetched
    (tested,) = t.test(model, val, ckpt_path=mc.best_model_path)
    assert tested["test_loss"] == pytest.approx(model.val[8], abs=1e-6)
    assert len(listings) == 2
