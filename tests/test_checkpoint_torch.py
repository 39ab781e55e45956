"""PyTorch: an interrupted and resumed run equals the uninterrupted one, loss for loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import liferaft
from conftest import machine
from liferaft.checkpoint import ResumableSampler
from liferaft.errors import LiferaftError

torch = pytest.importorskip("torch")
from liferaft.checkpoint.pytorch import TorchCheckpoint  # noqa: E402

TOTAL = 30  # steps: 5 epochs of 6 batches


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    y = (x.sum(1, keepdim=True) > 0).float()
    return torch.utils.data.TensorDataset(x, y)


def train(init_seed: int, ck: liferaft.Checkpointer | None = None, stop_after: int | None = None) -> dict[int, float]:
    """A plain training loop with dropout, AdamW, a scheduler, a GradScaler and a shuffling sampler."""
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    sampler = ResumableSampler(48, seed=7)
    # The loader's own generator: otherwise each iter(loader) draws a seed from the global
    # generator, and a resumed run (which starts its iterator mid-epoch) would draw once more.
    loader_gen = torch.Generator().manual_seed(1)
    loader = torch.utils.data.DataLoader(data(), batch_size=8, sampler=sampler, generator=loader_gen)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = 0
    tc = None
    if ck is not None:
        tc = TorchCheckpoint(ck, model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler, loader_gen=loader_gen)
        r = tc.resume()
        start = r.step + 1 if r else 0
    losses: dict[int, float] = {}
    step = start
    while step < TOTAL:
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses[step] = loss.item()
            if tc is not None and step % 4 == 0:
                tc.save(step, metrics={"loss": loss.item()})
            if step == stop_after:
                return losses  # the machine goes away here; the work since step 12 is lost
            step += 1
            if step >= TOTAL:
                break
    return losses


def test_interrupted_and_resumed_training_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    full = train(init_seed=0)
    assert len(full) == TOTAL

    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="exact", vault=str(tmp_path / "vault"), keep_last=2)
    first = train(init_seed=0, ck=ck, stop_after=14)
    ck.wait()
    shutil.rmtree(tmp_path / "m1")  # a fresh machine: only the vault is left

    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("checkpoints", run="exact", vault=str(tmp_path / "vault"), keep_last=2)
    second = train(init_seed=999, ck=ck2)  # other initial weights: everything must come from the checkpoint
    ck2.wait()
    assert ck2.resumed_step == 12
    assert min(second) == 13
    assert first == {s: full[s] for s in range(15)}
    assert second == {s: full[s] for s in range(13, TOTAL)}  # bit for bit, loss for loss


def test_torch_checkpoint_checks_what_it_is_given(tmp_path: Path) -> None:
    ck = liferaft.Checkpointer(tmp_path / "c", run="t", vault=False)
    with pytest.raises(LiferaftError, match="state_dict"):
        TorchCheckpoint(ck, model=object())
    with pytest.raises(LiferaftError, match="reserved"):
        TorchCheckpoint(ck, rng=True, extra=torch.nn.Linear(1, 1))
    TorchCheckpoint(ck, model=torch.nn.Linear(2, 2)).save(1)
    ck.wait()
    with pytest.raises(LiferaftError, match="no 'optimizer'"):
        TorchCheckpoint(ck, model=torch.nn.Linear(2, 2), optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)).resume()
