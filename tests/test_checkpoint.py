"""Checkpointer: state formats, async save, restore from folder and vault, retention, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest

import liferaft
from liferaft.checkpoint import CheckpointSaveFailed, CheckpointWarning, ResumableSampler, capture_rng, restore_rng
from liferaft.checkpoint.folder import MANIFEST
from liferaft.checkpoint.state import PICKLE
from liferaft.errors import LiferaftError, VaultUnreachable
from servers import free_port

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")


def make_ck(tmp_path: Path, vault: str | bool | None = None, **kw):
    kw.setdefault("run", "test")
    return liferaft.Checkpointer(tmp_path / "checkpoints", vault=str(tmp_path / "vault") if vault is None else vault, **kw)


def ck_steps(vault: liferaft.Vault, run: str = "test") -> list[int]:
    return sorted(s.step for s in vault.snapshots(run=run) if s.tags.get("liferaft.kind") == "checkpoint")


def local_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / MANIFEST).exists())


def rich_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "bools": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7.5),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "array": np.arange(10, dtype=np.int16).reshape(2, 5),
        "big_endian": np.arange(3, dtype=">f8"),
        "np_scalar": np.float32(2.5),
        "plain": [1, 2.5, "x", None, True, float("nan"), (3, (4, 5))],
        7: "int key",
        "other": {1, 2, 3},  # no array, no JSON: the pickled fallback
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous(), b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype.name == b.dtype.name
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


def test_first_run_restores_nothing(tmp_path: Path) -> None:
    ck = make_ck(tmp_path)
    assert ck.restore() is None
    assert ck.restore_path() is None
    assert ck.checkpoints() == []
    with pytest.raises(LiferaftError, match="no checkpoint step 5"):
        ck.restore(5)
    with pytest.raises(LiferaftError, match="monitor"):
        ck.restore(best=True)


def test_round_trip_every_kind_of_value_local_and_from_vault(tmp_path: Path) -> None:
    state = rich_state()
    ck = make_ck(tmp_path)
    ck.save(10, state, metrics={"loss": 0.5})
    ck.wait()
    r = ck.restore()
    assert r is not None and r.step == 10 and r.source == "local" and r.metrics == {"loss": 0.5}
    assert_same(state, r.state)
    # torch's per-module versions survive (BatchNorm's loading depends on them)
    assert r.state["model"]._metadata == state["model"]._metadata
    # arrays are in a real safetensors file, readable without liferaft; only the set is pickled
    import safetensors.torch

    loaded = safetensors.torch.load_file(str(r.path / "tensors.safetensors"))
    assert torch.equal(loaded["model/0.weight"], state["model"]["0.weight"])
    manifest = json.loads((r.path / MANIFEST).read_text())
    assert manifest["pickled"] == ["other"]
    # a fresh machine: nothing local, everything from the vault
    shutil.rmtree(tmp_path / "checkpoints")
    r2 = make_ck(tmp_path).restore()
    assert r2 is not None and r2.source == "vault" and r2.step == 10
    assert_same(state, r2.state)
    assert (tmp_path / "checkpoints" / "step-10" / MANIFEST).exists()  # put back locally


def test_tensors_and_plain_values_need_no_pickle(tmp_path: Path) -> None:
    ck = make_ck(tmp_path, vault=False, allow_pickle=False)
    ck.save(1, {"w": torch.ones(3), "a": np.zeros(2), "lr": 0.1, "cfg": {"layers": [1, 2]}})
    ck.wait()
    assert sorted(os.listdir(tmp_path / "checkpoints" / "step-1")) == [MANIFEST, "tensors.safetensors"]
    r = ck.restore()
    assert r is not None and r.state["cfg"] == {"layers": [1, 2]}
    # a checkpoint with a pickled part is refused when pickle is not allowed
    ck2 = make_ck(tmp_path, vault=False)
    ck2.save(3, {"s": {2}})
    ck2.wait()
    assert PICKLE in os.listdir(tmp_path / "checkpoints" / "step-3")
    with pytest.raises(LiferaftError, match="allow_pickle"):
        make_ck(tmp_path, vault=False, allow_pickle=False).restore()


def test_allow_pickle_false_refuses_at_save_and_writes_nothing(tmp_path: Path) -> None:
    # A checkpoint that allow_pickle=False could never restore must not be written at all.
    ck = make_ck(tmp_path, allow_pickle=False)
    ck.save(1, {"w": torch.ones(3), "cfg": {"layers": [1, 2]}})
    ck.wait()

    def files() -> set[str]:
        return {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}

    before = files()
    state = {"w": torch.full((3,), 2.0), "s": {1, 2}, "opt": {"pairs": {(1, 2): "x"}, "lr": 0.1}}
    with pytest.raises(LiferaftError) as info:
        ck.save(2, state)
    line = str(info.value)
    assert "need pickle (s (set), opt/pairs (dict))" in line and "allow_pickle=False" in line, line
    assert "nothing was saved" in line and "allow_pickle=True" in line and "\n" not in line, line
    ck.wait()  # no background job was started: nothing to fail
    assert files() == before  # no step-2, no temp folder, no pack or manifest in the vault
    assert ck_steps(ck.vault) == [1]
    r = make_ck(tmp_path, allow_pickle=False).restore()
    assert r is not None and r.step == 1 and torch.equal(r.state["w"], torch.ones(3))
    ck.save(3, {"w": torch.full((3,), 3.0), "s": [1, 2]})  # the fix the error names: plain values
    ck.wait()
    assert ck_steps(ck.vault) == [1, 3] and PICKLE not in os.listdir(tmp_path / "checkpoints" / "step-3")


def test_torch_adapter_state_needs_no_pickle(tmp_path: Path) -> None:
    # The adapters save through Checkpointer.save, so allow_pickle=False refuses there too;
    # what TorchCheckpoint itself adds (RNG states, sampler, generator) must never need it.
    from liferaft.checkpoint.pytorch import TorchCheckpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    objects = {"model": model, "optimizer": opt, "scheduler": sched, "sampler": ResumableSampler(10), "gen": torch.Generator()}
    ck = make_ck(tmp_path, allow_pickle=False)
    TorchCheckpoint(ck, **objects).save(1, extra={"epoch": 1})
    ck.wait()
    assert PICKLE not in os.listdir(tmp_path / "checkpoints" / "step-1")
    r = TorchCheckpoint(make_ck(tmp_path, allow_pickle=False), **objects).resume()
    assert r is not None and r.step == 1 and r.state["extra"] == {"epoch": 1}
    with pytest.raises(LiferaftError, match=r"need pickle \(extra/seen \(set\)\)"):
        TorchCheckpoint(ck, **objects).save(2, extra={"seen": {1, 2}})
    assert ck_steps(ck.vault) == [1]


def test_save_copies_the_state_before_returning(tmp_path: Path) -> None:
    ck = make_ck(tmp_path)
    w = torch.zeros(1000)
    a = np.zeros(10)
    ck._vault_lock.acquire()  # hold the commit back: the save is surely still in flight
    try:
        ck.save(1, {"w": w, "a": a})
        w += 1  # training goes on changing the tensors
        a += 1
        with pytest.raises(LiferaftError, match="still running"):
            ck.wait(timeout=0.2)
    finally:
        ck._vault_lock.release()
    ck.wait()
    r = make_ck(tmp_path).restore()
    assert r is not None and float(r.state["w"].sum()) == 0.0 and float(r.state["a"].sum()) == 0.0


def test_one_save_in_flight_at_most(tmp_path: Path) -> None:
    ck = make_ck(tmp_path)
    ck._vault_lock.acquire()
    second_done = threading.Event()
    try:
        ck.save(1, {"w": torch.zeros(10)})

        def second() -> None:
            ck.save(2, {"w": torch.ones(10)})
            second_done.set()

        t = threading.Thread(target=second)
        t.start()
        assert not second_done.wait(0.5), "a second save must wait while one is in flight"
    finally:
        ck._vault_lock.release()
    t.join(30)
    assert second_done.is_set()
    ck.wait()
    assert ck_steps(ck.vault) == [1, 2]


def test_background_failure_raises_and_never_becomes_latest(tmp_path: Path) -> None:
    ck = make_ck(tmp_path, keep_last=5)
    ck.save(1, {"w": torch.full((4,), 1.0)})
    ck.wait()
    work = tmp_path / "checkpoints" / ".liferaft"
    shutil.rmtree(work)
    work.write_text("not a folder")  # every local write now fails
    try:
        ck.save(2, {"w": torch.full((4,), 2.0)})
        with pytest.raises(CheckpointSaveFailed, match="step-2"):
            ck.wait()
        assert not (tmp_path / "checkpoints" / "step-2").exists()
        ck.save(3, {"w": torch.full((4,), 3.0)})
        with pytest.raises(CheckpointSaveFailed, match="step-3"):
            ck.save(4, {"w": torch.full((4,), 4.0)})  # the failure surfaces on the next save too
    finally:
        work.unlink()
    r = make_ck(tmp_path).restore()
    assert r is not None and r.step == 1
    ck.save(5, {"w": torch.full((4,), 5.0)})
    ck.wait()
    assert ck_steps(ck.vault) == [1, 5]


def test_vault_outage_keeps_checkpoints_locally_and_commits_them_later(tmp_path: Path) -> None:
    # A vault that cannot take writes (a bucket gone for longer than the retry deadline, a
    # Drive mount gone): the checkpoints used to be deleted with the failed save, and the
    # next save raised, stopping the training. Now they stay in the folder, training goes
    # on, and they are committed once the vault is back.
    ck = make_ck(tmp_path, keep_last=2)
    ck.save(1, {"w": torch.full((4,), 1.0)})
    ck.wait()
    packs = tmp_path / "vault" / "packs"
    packs.rename(tmp_path / "packs-aside")
    packs.write_text("not a folder")  # every pack write now fails
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in (2, 3, 4):
                ck.save(step, {"w": torch.full((4,), float(step))})  # no raise: training goes on
            with pytest.raises(CheckpointSaveFailed, match=r"checkpoints step-2, step-3, step-4 are saved in .* only"):
                ck.wait()
        said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        assert len(said) == 1 and "kept in" in said[0] and "step-2" in said[0], said  # once per outage
        assert local_steps(tmp_path / "checkpoints") == [1, 2, 3, 4]  # nothing deleted while offline
        assert ck_steps(ck.vault) == [1]
        r = make_ck(tmp_path).restore()  # another process (a restart) takes the newest, local only
        assert r is not None and r.step == 4 and r.source == "local"
    finally:
        packs.unlink()
        (tmp_path / "packs-aside").rename(packs)
    ck.wait()  # the vault is back: committed now
    assert ck_steps(ck.vault) == [1, 2, 3, 4]
    ck.save(5, {"w": torch.full((4,), 5.0)})
    ck.close()
    assert ck_steps(ck.vault) == [4, 5] and local_steps(tmp_path / "checkpoints") == [4, 5]
    shutil.rmtree(tmp_path / "checkpoints")
    r = make_ck(tmp_path).restore(4)
    assert r is not None and r.source == "vault" and float(r.state["w"][0]) == 4.0


def test_unreachable_vault_on_a_fresh_machine_is_an_error_not_a_first_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # restore() returned None ("first run") when the bucket could not be reached, so a
    # fresh machine trained from step 0 beside the vault's checkpoints.
    monkeypatch.setenv("LIFERAFT_RETRY_DEADLINE", "1")
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }.items():
        monkeypatch.setenv(name, value)  # nothing listens there
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="test", vault="s3://bucket/vault")
    with pytest.raises(VaultUnreachable, match=r"holds no checkpoint of run 'test'.*vault=False"):
        ck.restore()
    local = liferaft.Checkpointer(tmp_path / "checkpoints", run="test", vault=False)
    local.save(3, {"w": torch.ones(2)})
    local.close()
    with pytest.warns(CheckpointWarning, match="cannot be reached.*checkpoints in .* only") as caught:
        r = ck.restore()
    assert r is not None and r.step == 3 and r.source == "local"
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]  # names the caller's line


def test_unpicklable_state_is_refused_at_save(tmp_path: Path) -> None:
    ck = make_ck(tmp_path)
    with pytest.raises(LiferaftError, match="cannot be saved"):
        ck.save(1, {"lock": threading.Lock()})
    ck.wait()
    assert ck.checkpoints() == []


def test_bad_arguments_get_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(LiferaftError, match="keep_best=1 needs a metric"):
        make_ck(tmp_path, keep_best=1)
    with pytest.raises(LiferaftError, match="mode="):
        make_ck(tmp_path, monitor="loss", mode="lowest")
    with pytest.raises(LiferaftError, match="keep_last=0 would keep no checkpoint"):
        make_ck(tmp_path, keep_last=0)
    with pytest.raises(LiferaftError, match=r"keep_last=2\.0 is not a whole number"):
        make_ck(tmp_path, keep_last=2.0)
    ck = make_ck(tmp_path)
    with pytest.raises(LiferaftError, match="step must"):
        ck.save(-1, {})
    with pytest.raises(LiferaftError, match="step must"):
        ck.save(1.5, {})  # type: ignore[arg-type]
    with pytest.raises(LiferaftError, match="not a number"):
        ck.save(1, {}, metrics={"acc": "high"})


def test_retention_keep_last_best_every_in_folder_and_vault(tmp_path: Path) -> None:
    ck = make_ck(tmp_path, keep_last=2, keep_best=1, monitor="val_loss", mode="min", keep_every=4)
    losses = {1: 0.9, 2: 0.2, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.5, 7: float("nan")}
    for step, loss in losses.items():
        ck.save(step, {"w": torch.full((8,), float(step))}, metrics={"val_loss": loss})
    ck.wait()
    # last 2: 6, 7; best: 2; every 4: 4
    assert local_steps(tmp_path / "checkpoints") == [2, 4, 6, 7]
    assert ck_steps(ck.vault) == [2, 4, 6, 7]
    nan_snap = next(s for s in ck.vault.snapshots(run="test") if s.step == 7)
    assert "val_loss" not in nan_snap.metrics  # the vault takes finite metrics only
    best = ck.restore(best=True)
    assert best is not None and best.step == 2 and best.metrics["val_loss"] == 0.2
    assert math.isnan(ck.restore().metrics["val_loss"])


def test_a_misspelt_monitor_is_named_once(tmp_path: Path) -> None:
    # monitor="val_acc" against metrics named "val_accuracy": keep_best kept nothing by it,
    # and retention deleted the best checkpoint without a word.
    ck = make_ck(tmp_path, monitor="val_acc", mode="max")
    with pytest.warns(CheckpointWarning, match="no 'val_acc'.*did you mean 'val_accuracy'") as caught:
        ck.save(1, {"w": torch.ones(2)}, metrics={"loss": 0.5, "val_accuracy": 0.8})
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.save(2, {"w": torch.ones(2)}, metrics={"loss": 0.4, "val_accuracy": 0.9})  # once is enough
        ck.close()
    # A training-time metric beside a validation monitor (Keras saves mid-epoch) is no typo,
    # but a whole run without the monitor is named at the end.
    keras_like = make_ck(tmp_path, monitor="val_accuracy", mode="max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_like.save(3, {"w": torch.ones(2)}, metrics={"loss": 0.4, "accuracy": 0.9})
    with pytest.warns(CheckpointWarning, match="no checkpoint saved had the metric 'val_accuracy' .they had: accuracy, loss"):
        keras_like.close()
    fine = make_ck(tmp_path, monitor="val_loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine.save(4, {"w": torch.ones(2)}, metrics={"loss": 0.4})
        fine.save(5, {"w": torch.ones(2)}, metrics={"loss": 0.3, "val_loss": 0.5})
        fine.close()


def test_saving_below_the_newest_step_warns(tmp_path: Path) -> None:
    # A restart that forgot restore(): its checkpoints are older than the last run's, so
    # retention deleted them one after another and restore() went back to the old run.
    ck = make_ck(tmp_path)
    for step in (100, 200, 300):
        ck.save(step, {"w": torch.ones(2)})
    ck.close()
    again = make_ck(tmp_path)
    again.save(1, {"w": torch.ones(2)})
    with pytest.warns(CheckpointWarning, match="step-1 is older than step-300.*call restore.. first"):
        again.wait()
    resumed = make_ck(tmp_path)
    r = resumed.restore()
    assert r is not None and r.step == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.save(301, {"w": torch.ones(2)})
        resumed.close()


def test_two_checkpoint_folders_with_one_name_stay_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sweep: runs/lr0.1/checkpoints and runs/lr0.01/checkpoints under one run name (the
    # working folder's). Both were tagged liferaft.folder=checkpoints: the second resumed
    # from the first's weights and its retention forgot the first's steps.
    monkeypatch.chdir(tmp_path)
    vault = liferaft.Vault(tmp_path / "vault")
    a = liferaft.Checkpointer("runs/lr0.1/checkpoints", run="sweep", vault=vault, keep_last=1)
    a.save(500, {"w": torch.full((2,), 0.1)})
    a.close()
    b = liferaft.Checkpointer("runs/lr0.01/checkpoints", run="sweep", vault=vault, keep_last=1)
    with pytest.warns(
        CheckpointWarning, match=r"no checkpoint of runs/lr0\.01/checkpoints .* only of runs/lr0\.1/checkpoints; starting afresh"
    ):
        assert b.restore() is None
    b.save(10, {"w": torch.full((2,), 0.01)})
    b.save(20, {"w": torch.full((2,), 0.01)})
    b.close()
    tags = sorted((s.step, s.tags["liferaft.folder"]) for s in vault.snapshots(run="sweep"))
    assert tags == [(20, "runs/lr0.01/checkpoints"), (500, "runs/lr0.1/checkpoints")]
    # A fresh machine with the same layout elsewhere (another working folder) finds each.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    ra = liferaft.Checkpointer("runs/lr0.1/checkpoints", run="sweep", vault=vault).restore()
    rb = liferaft.Checkpointer("runs/lr0.01/checkpoints", run="sweep", vault=vault).restore()
    assert ra is not None and ra.step == 500 and ra.source == "vault" and float(ra.state["w"][0]) == pytest.approx(0.1)
    assert rb is not None and rb.step == 20 and rb.source == "vault"


def test_checkpoints_tagged_with_the_folder_name_alone_are_still_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Vaults written before the tag held the relative path: liferaft.folder=<base name>.
    # Such a snapshot is this folder's when it was taken from this very folder.
    monkeypatch.chdir(tmp_path)
    vault = liferaft.Vault(tmp_path / "vault")
    for name in ("a", "b"):
        ck = liferaft.Checkpointer(f"{name}/checkpoints", run="old", vault=vault)
        ck.save(7 if name == "a" else 9, {"w": torch.ones(2)})
        ck.close()
        info = next(s for s in vault.snapshots(run="old") if s.tags["liferaft.folder"] == f"{name}/checkpoints")
        vault.snapshot(
            [tmp_path / name / "checkpoints" / f"step-{info.step}"],
            run="old",
            step=info.step,
            tags={**info.tags, "liferaft.folder": "checkpoints"},
        )
        vault.forget_ids([info.id])
    ra = liferaft.Checkpointer("a/checkpoints", run="old", vault=vault).restore()
    assert ra is not None and ra.step == 7
    shutil.rmtree(tmp_path / "b" / "checkpoints")
    rb = liferaft.Checkpointer("b/checkpoints", run="old", vault=vault).restore()
    assert rb is not None and rb.step == 9 and rb.source == "vault"


def test_retention_never_deletes_the_checkpoint_resumed_from(tmp_path: Path) -> None:
    ck = make_ck(tmp_path, keep_last=None)
    for step in range(1, 6):
        ck.save(step, {"w": torch.full((4,), float(step))})
    ck.wait()
    ck2 = make_ck(tmp_path, keep_last=1)
    r = ck2.restore(2)
    assert r is not None and r.step == 2
    ck2.save(6, {"w": torch.full((4,), 6.0)})
    ck2.save(7, {"w": torch.full((4,), 7.0)})
    ck2.wait()
    assert local_steps(tmp_path / "checkpoints") == [2, 7]
    assert ck_steps(ck2.vault) == [2, 7]


def test_prune_frees_the_data_of_forgotten_checkpoints(tmp_path: Path) -> None:
    def vault_bytes() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "vault" / "packs").rglob("*") if p.is_file())

    ck = make_ck(tmp_path, keep_last=1)
    for step in range(1, 5):
        ck.save(step, {"w": torch.rand(1 << 18)})  # 1 MiB each, incompressible
        ck.wait()
    assert vault_bytes() < 2.5 * (1 << 20)
    r = make_ck(tmp_path).restore()
    assert r is not None and r.step == 4


def test_uncommitted_local_checkpoint_is_committed_by_the_next_process(tmp_path: Path) -> None:
    # A process that died between writing step-3 and committing it leaves it local only.
    ck = make_ck(tmp_path, keep_last=5)
    ck.save(1, {"w": torch.ones(2)})
    ck.wait()
    local_only = make_ck(tmp_path, vault=False, keep_last=None)
    local_only.save(3, {"w": torch.full((2,), 3.0)})
    local_only.wait()
    assert ck_steps(ck.vault) == [1]
    ck2 = make_ck(tmp_path, keep_last=5)
    r = ck2.restore()
    assert r is not None and r.step == 3 and r.source == "local"
    info = {c.step: c for c in ck2.checkpoints()}
    assert info[3].committed is False and info[1].committed is True
    ck2.save(4, {"w": torch.full((2,), 4.0)})
    ck2.wait()
    assert ck_steps(ck2.vault) == [1, 3, 4]
    shutil.rmtree(tmp_path / "checkpoints")
    r3 = make_ck(tmp_path).restore(3)
    assert r3 is not None and r3.source == "vault" and float(r3.state["w"][0]) == 3.0


@pytest.mark.parametrize("ending", ["returns", "raises"])
def test_a_save_in_flight_when_the_script_ends_is_finished(tmp_path: Path, ending: str) -> None:
    # A script that ends, or dies of an exception (an OOM, a bug after the save), right
    # after save(): the interpreter's shutdown refused the commit's uploads ("cannot
    # schedule new futures after interpreter shutdown") and the newest checkpoint was lost.
    script = (
        "import sys, numpy, liferaft\n"
        "ck = liferaft.Checkpointer('ck', vault=sys.argv[1], run='x')\n"
        "ck.save(7, {'w': numpy.arange(20_000_000, dtype=numpy.float32)})\n"
        "if sys.argv[2] == 'raises':\n"
        "    raise RuntimeError('CUDA out of memory (simulated)')\n"
    )
    vault = str(tmp_path / "vault")
    r = subprocess.run([sys.executable, "-c", script, vault, ending], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == (1 if ending == "raises" else 0), r.stderr
    assert "failed in the background" not in r.stderr, r.stderr
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    restored = liferaft.Checkpointer(fresh / "ck", vault=vault, run="x").restore()
    assert restored is not None and restored.step == 7 and restored.source == "vault"
    w = restored.state["w"]
    assert w.shape == (20_000_000,) and w[:3].tolist() == [0.0, 1.0, 2.0] and w[-1] == w.dtype.type(19_999_999)


def test_a_save_that_fails_as_the_script_ends_is_reported(tmp_path: Path) -> None:
    # The exit hook closed the Checkpointer and swallowed its error: exit 0, not a word.
    script = (
        "import sys, pathlib, numpy, liferaft\n"
        "ck = liferaft.Checkpointer('ck', vault='vault', run='x')\n"
        "ck.save(1, {'w': numpy.ones(3)}); ck.wait()\n"
        "packs = pathlib.Path('vault/packs'); packs.rename('aside'); packs.write_text('not a folder')\n"
        "ck.save(2, {'w': numpy.ones(3)})\n"
    )
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "liferaft: checkpoint step-2 is saved in" in r.stderr and "only" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "ck" / "step-2" / MANIFEST).exists()


def test_a_forked_child_leaves_the_parents_saves_alone(tmp_path: Path) -> None:
    # DataLoader workers are forked copies of the training process: each ran the exit hook
    # on exit and waited on its parent's save, which it cannot finish, until torch killed
    # it (every epoch stalled by seconds per worker).
    script = (
        "import multiprocessing, numpy, liferaft\n"
        "ck = liferaft.Checkpointer('ck', vault='vault', run='x')\n"
        "ck.save(1, {'w': numpy.ones(100_000_000, dtype=numpy.float32)})\n"  # 400 MB: still in flight
        "child = multiprocessing.get_context('fork').Process(target=print, args=('worker',))\n"
        "child.start(); child.join(30)\n"
        "print('child exit', child.exitcode, flush=True)\n"
        "ck.wait()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "child exit 0" in r.stdout, (r.stdout, r.stderr)
    assert "finishing" not in r.stderr, r.stderr
    assert ck_steps(liferaft.Vault(tmp_path / "vault"), "x") == [1]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    ck = make_ck(tmp_path)
    ck.save(5, {"w": torch.zeros(3)})
    ck.save(5, {"w": torch.ones(3)})
    ck.wait()
    assert [s.step for s in ck.vault.snapshots(run="test")] == [5]  # the older copy is forgotten
    shutil.rmtree(tmp_path / "checkpoints")
    r = make_ck(tmp_path).restore()
    assert r is not None and float(r.state["w"].sum()) == 3.0


def test_save_folder_commits_a_framework_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ck = liferaft.Checkpointer(out, run="hf", vault=str(tmp_path / "vault"), prefix="checkpoint-")
    for step in (10, 20):
        folder = out / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(os.urandom(1000))
        (folder / "sub" / "trainer_state.json").write_text(json.dumps({"step": step}))
        ck.save_folder(step, folder, metrics={"eval_loss": 1.0 / step})
    ck.wait()
    # a folder the framework was still writing when it died has no manifest: never chosen
    (out / "checkpoint-30").mkdir()
    (out / "checkpoint-30" / "model.safetensors").write_bytes(b"half")
    assert ck.restore_path() == out / "checkpoint-20"
    r = ck.restore()
    assert r is not None and r.state is None and r.step == 20
    shutil.rmtree(out / "checkpoint-20")
    shutil.rmtree(out / "checkpoint-10")
    fresh = liferaft.Checkpointer(out, run="hf", vault=str(tmp_path / "vault"), prefix="checkpoint-")
    path = fresh.restore_path()
    assert path == out / "checkpoint-20"
    assert json.loads((path / "sub" / "trainer_state.json").read_text()) == {"step": 20}
    assert (out / "checkpoint-30").exists()  # not ours: left alone


def test_resumable_sampler_continues_mid_epoch() -> None:
    full = ResumableSampler(20, seed=3)
    order = list(full) + list(full)  # two epochs
    assert sorted(order[:20]) == list(range(20)) and order[:20] != order[20:]
    s = ResumableSampler(20, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(7)]
    saved = s.state_dict()
    resumed = ResumableSampler(20, seed=3)
    resumed.load_state_dict(saved)
    rest = list(resumed) + list(resumed)
    assert first + rest == order
    with pytest.raises(LiferaftError, match="seed"):
        ResumableSampler(20, seed=4).load_state_dict(saved)


def test_rng_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    import random

    ck = make_ck(tmp_path, vault=False)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    ck.save(1, {"rng": capture_rng()})
    ck.wait()
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(ck.restore().state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_importing_liferaft_imports_no_framework() -> None:
    code = (
        "import sys, liferaft, liferaft.checkpoint\n"
        "liferaft.Checkpointer\n"
        "heavy = [m for m in ('torch', 'numpy', 'keras', 'lightning', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_damage_warning_names_the_checkpoint(tmp_path: Path) -> None:
    ck = make_ck(tmp_path, vault=False)
    ck.save(1, {"w": torch.ones(64)})
    ck.save(2, {"w": torch.full((64,), 2.0)})
    ck.wait()
    path = tmp_path / "checkpoints" / "step-2" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = make_ck(tmp_path, vault=False).restore()
    assert r is not None and r.step == 1
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(msgs) == 1 and "step-2" in msgs[0] and "does not match its hash" in msgs[0]
    assert r.fallbacks and "step-2" in r.fallbacks[0]


def test_ordered_dict_subclasses_and_odd_keys_use_the_fallback(tmp_path: Path) -> None:
    from collections import defaultdict

    state = {"dd": defaultdict(int, {"a": 1}), "tuple_key": {(1, 2): "x"}, "od": OrderedDict(b=1, a=2)}
    ck = make_ck(tmp_path, vault=False)
    ck.save(1, state)
    ck.wait()
    r = ck.restore()
    assert r is not None
    assert type(r.state["dd"]) is defaultdict and r.state["dd"]["a"] == 1
    assert r.state["tuple_key"] == {(1, 2): "x"}
    assert type(r.state["od"]) is OrderedDict and list(r.state["od"]) == ["b", "a"]
