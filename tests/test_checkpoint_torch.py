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
    return torch.utils.data.TensorDataset(x, y, torch.arange(48))


def train(
    init_seed: int,
    ck: liferaft.Checkpointer | None = None,
    stop_after: int | None = None,
    workers: int = 0,
    persistent: bool = False,
    seen: dict[int, list[int]] | None = None,
) -> dict[int, float]:
    """A plain training loop with dropout, AdamW, a scheduler, a GradScaler and a shuffling sampler.

    With ``workers``, the DataLoader has worker processes (which fetch ahead of the loop)
    and goes to TorchCheckpoint as ``loader=``; ``seen`` collects each step's sample indices.
    """
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    sampler = ResumableSampler(48, seed=7)
    # The loader's own generator: otherwise each iter(loader) draws a seed from the global
    # generator, and a resumed run (which starts its iterator mid-epoch) would draw once more.
    loader_gen = torch.Generator().manual_seed(1)
    loader = torch.utils.data.DataLoader(
        data(), batch_size=8, sampler=sampler, generator=loader_gen, num_workers=workers, persistent_workers=persistent
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = 0
    tc = None
    if ck is not None:
        if workers:
            tc = TorchCheckpoint(ck, model=model, optimizer=opt, scheduler=sched, scaler=scaler, loader=loader)
        else:
            tc = TorchCheckpoint(ck, model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler, loader_gen=loader_gen)
        r = tc.resume()
        start = r.step + 1 if r else 0
    losses: dict[int, float] = {}
    step = start
    while step < TOTAL:
        for xb, yb, ib in loader:
            if seen is not None:
                seen[step] = ib.tolist()
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


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent-workers"])
def test_resume_with_dataloader_workers_misses_no_batch(tmp_path: Path, persistent: bool) -> None:
    # 2 workers x prefetch_factor 2: the loader fetches 4 of an epoch's 6 batches ahead of the
    # loop. The checkpoint of step 4 (5th batch of epoch 0) is taken when the sampler has
    # handed out all of epoch 0 and moved to epoch 1; that of step 12 (1st batch of epoch 2)
    # when it has handed out 5 batches of epoch 2.
    full_seen: dict[int, list[int]] = {}
    full = train(init_seed=0, workers=2, persistent=persistent, seen=full_seen)
    assert sorted(i for s in range(6) for i in full_seen[s]) == list(range(48))  # one epoch: each sample once

    vault = str(tmp_path / "vault")
    seen: dict[int, list[int]] = {}
    losses: dict[int, float] = {}
    for seed, stop_after, resumed in ((0, 5, None), (999, 14, 4), (999, None, 12)):  # two machines vanish, the third finishes
        ck = liferaft.Checkpointer(tmp_path / "m" / "checkpoints", run="workers", vault=vault, keep_last=2)
        losses |= train(init_seed=seed, ck=ck, stop_after=stop_after, workers=2, persistent=persistent, seen=seen)
        ck.close()
        assert ck.resumed_step == resumed
        shutil.rmtree(tmp_path / "m")
    assert seen == full_seen  # the same samples, step for step: none skipped, none repeated
    assert losses == full


def test_followed_loader_starts_again_where_the_loop_left_off() -> None:
    # A loop that stops mid-epoch and iterates again gets the next batch, as with num_workers=0,
    # not the one after those the workers had fetched ahead; the saved position says the same.
    def batches(workers: int) -> tuple[list[list[int]], dict]:
        sampler = ResumableSampler(48, seed=7)
        loader = torch.utils.data.DataLoader(data(), batch_size=8, sampler=sampler, num_workers=workers)
        if workers:
            sampler.follow(loader)
        got = []
        for _ in range(2):  # two short passes: 2 batches each
            for _x, _y, ib in loader:
                got.append(ib.tolist())
                if len(got) % 2 == 0:
                    break
        return got, sampler.state_dict()

    assert batches(workers=1) == batches(workers=0)


def test_torch_checkpoint_checks_what_it_is_given(tmp_path: Path) -> None:
    ck = liferaft.Checkpointer(tmp_path / "c", run="t", vault=False)
    with pytest.raises(LiferaftError, match="state_dict"):
        TorchCheckpoint(ck, model=object())
    with pytest.raises(LiferaftError, match="reserved"):
        TorchCheckpoint(ck, rng=True, extra=torch.nn.Linear(1, 1))
    TorchCheckpoint(ck, model=torch.nn.Linear(2, 2)).save(1)
    ck.wait()
    with pytest.raises(LiferaftError, match="RandomSampler, which cannot resume mid-epoch"):
        TorchCheckpoint(ck, loader=torch.utils.data.DataLoader(data(), batch_size=8, shuffle=True))
    with pytest.raises(LiferaftError, match="in_order=False"):
        s = ResumableSampler(48)
        TorchCheckpoint(ck, loader=torch.utils.data.DataLoader(data(), batch_size=8, sampler=s, num_workers=1, in_order=False))
    with pytest.raises(LiferaftError, match="no 'optimizer'"):
        TorchCheckpoint(ck, model=torch.nn.Linear(2, 2), optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)).resume()
