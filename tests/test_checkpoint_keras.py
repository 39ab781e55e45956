"""Keras 3 (torch backend): resume mid-epoch where training stopped, keep and load the best model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")
if keras.backend.backend() != "torch":  # pragma: no cover - another test imported keras first
    pytest.skip("these tests run Keras on its torch backend", allow_module_level=True)

import liferaft  # noqa: E402
from conftest import machine  # noqa: E402
from liferaft.checkpoint.keras import LiferaftCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras's own, numpy 2

EPOCHS, BATCH = 3, 8  # 5 batches an epoch


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5], dtype="float32"))[:, None] + 0.1
    xv = rng.normal(size=(16, 4)).astype("float32")
    yv = (xv @ np.array([1.0, -2.0, 0.5, 1.5], dtype="float32"))[:, None] + 0.1
    return x, y, xv, yv


def model(seed: int, dropout_seed: int | None = 3):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.25, seed=dropout_seed),  # None: torch's global generator draws the masks
            keras.layers.Dense(1),
        ]
    )
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return m


class Record(keras.callbacks.Callback):
    """Per-batch running loss by global step (skipped batches report no loss)."""

    def __init__(self, stop_at: int | None = None, stop_at_batch: int | None = None) -> None:
        super().__init__()
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at
        self.stop_at_batch = stop_at_batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.stop_at_batch:
            raise KeyboardInterrupt  # the stop button
        if logs and "loss" in logs:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self.losses[step] = float(logs["loss"])
            if step == self.stop_at:
                raise KeyboardInterrupt  # the runtime is gone


def test_resume_mid_epoch_equals_uninterrupted_training(tmp_path: Path) -> None:
    x, y, xv, yv = data()
    fit = {"epochs": EPOCHS, "batch_size": BATCH, "shuffle": False, "validation_data": (xv, yv), "verbose": 0}
    full = Record()
    reference = model(0)
    hist = reference.fit(x, y, callbacks=[full], **fit)
    assert len(full.losses) == 15

    vault = str(tmp_path / "vault")
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="keras", vault=vault, keep_last=2, monitor="val_loss")
    first = Record(stop_at=9)
    with pytest.raises(KeyboardInterrupt):
        model(0).fit(x, y, callbacks=[LiferaftCallback(ck, save_freq=2), first], **fit)
    ck.wait()
    shutil.rmtree(tmp_path / "m1")  # fresh machine

    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("checkpoints", run="keras", vault=vault, keep_last=2, monitor="val_loss")
    second = Record()
    cb = LiferaftCallback(ck2, save_freq=2)
    resumed = model(123)  # other initial weights: all of it must come from the checkpoint
    hist2 = resumed.fit(x, y, callbacks=[cb, second], **fit)
    assert cb.restored is not None and cb.restored.step == 8  # epoch 1, after its 3rd batch
    assert cb.restored.state["epoch"] == 1 and cb.restored.state["batch"] == 3
    assert first.losses == {s: full.losses[s] for s in range(1, 10)}
    assert second.losses == {s: full.losses[s] for s in range(9, 16)}  # loss for loss
    assert hist2.history["val_loss"] == hist.history["val_loss"][1:]
    for a, b in zip(reference.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    # keep best: the epoch with the lowest val_loss stays, and load_best puts it back
    best_epoch = int(np.argmin(hist.history["val_loss"]))
    steps = [c.step for c in ck2.checkpoints()]
    assert 5 * (best_epoch + 1) in steps
    fresh = model(7)
    r = LiferaftCallback(ck2).load_best(fresh)
    assert r is not None and r.step == 5 * (best_epoch + 1)
    val = fresh.evaluate(xv, yv, verbose=0, batch_size=BATCH)
    assert val == pytest.approx(hist.history["val_loss"][best_epoch], rel=1e-5)


def test_resume_at_an_epoch_boundary_and_a_finished_run(tmp_path: Path) -> None:
    x, y, _, _ = data()
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="keras2", vault=False)
    model(0).fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[LiferaftCallback(ck)])
    m = model(5)
    hist = m.fit(x, y, epochs=3, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[LiferaftCallback(ck)])
    assert len(hist.history["loss"]) == 1  # only the third epoch ran
    assert int(keras.ops.convert_to_numpy(m.optimizer.iterations)) == 15
    again = model(5).fit(x, y, epochs=3, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[LiferaftCallback(ck)])
    assert again.history == {}  # nothing left to do


def same_weights(a, b) -> None:
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def iterations(m) -> int:
    return int(keras.ops.convert_to_numpy(m.optimizer.iterations))


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_epoch_with_an_unseeded_dropout_equals_uninterrupted_training(tmp_path: Path, shuffle: bool) -> None:
    # Dropout(seed=None) on torch draws its masks from torch's global generator, batch after batch:
    # the resumed run must carry on from its state as of the checkpoint's batch, not the epoch's start.
    x, y, xv, yv = data()
    fit = {"epochs": EPOCHS, "batch_size": BATCH, "shuffle": shuffle, "validation_data": (xv, yv), "verbose": 0}
    full = Record()
    reference = model(0, dropout_seed=None)
    reference.fit(x, y, callbacks=[full], **fit)

    vault = str(tmp_path / "vault")
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="keras", vault=vault)
    with pytest.raises(KeyboardInterrupt):
        model(0, dropout_seed=None).fit(x, y, callbacks=[LiferaftCallback(ck, save_freq=2), Record(stop_at=9)], **fit)
    ck.wait()
    shutil.rmtree(tmp_path / "m1")  # fresh machine

    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("checkpoints", run="keras", vault=vault)
    second = Record()
    cb = LiferaftCallback(ck2, save_freq=2)
    resumed = model(123, dropout_seed=None)  # another global generator state too
    resumed.fit(x, y, callbacks=[cb, second], **fit)
    assert cb.restored is not None and cb.restored.state["epoch"] == 1 and cb.restored.state["batch"] == 3
    assert second.losses == {s: full.losses[s] for s in range(9, 16)}  # loss for loss
    same_weights(reference, resumed)


@pytest.mark.parametrize("same_callback", [True, False])
def test_another_fit_of_the_same_model_trains_on_like_keras(tmp_path: Path, same_callback: bool) -> None:
    # As without the callback (and as BackupAndRestore, which deletes its backup when a fit ends):
    # fit(epochs=2) twice trains 4 epochs; fit(epochs=5, initial_epoch=4) then trains the fifth.
    x, y, _, _ = data()
    fit = {"batch_size": BATCH, "shuffle": False, "verbose": 0}
    plain = model(0)
    plain.fit(x, y, epochs=2, **fit)
    plain.fit(x, y, epochs=2, **fit)
    plain.fit(x, y, epochs=5, initial_epoch=4, **fit)

    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="keras3", vault=False, keep_last=None)
    cb = LiferaftCallback(ck, save_freq=3)

    def callback() -> LiferaftCallback:
        return cb if same_callback else LiferaftCallback(ck, save_freq=3)  # or one per fit(), as in the README

    m = model(0)
    runs = [
        m.fit(x, y, epochs=2, callbacks=[callback()], **fit),
        m.fit(x, y, epochs=2, callbacks=[callback()], **fit),
        m.fit(x, y, epochs=5, initial_epoch=4, callbacks=[callback()], **fit),
    ]
    assert [len(h.history["loss"]) for h in runs] == [2, 2, 1]
    assert iterations(m) == 25
    same_weights(plain, m)
    assert [c.step for c in ck.checkpoints()] == [3, 5, 6, 9, 10, 12, 15, 18, 20, 21, 24, 25]  # every 3 batches, each epoch end


def test_a_script_of_two_fits_cut_off_in_the_second_replays_on_a_fresh_machine(tmp_path: Path) -> None:
    x, y, _, _ = data()
    fit = {"epochs": 2, "batch_size": BATCH, "shuffle": False, "verbose": 0}
    reference = model(0)
    reference.fit(x, y, **fit)
    reference.fit(x, y, **fit)

    vault = str(tmp_path / "vault")
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="keras4", vault=vault)
    cb = LiferaftCallback(ck, save_freq=2)
    m = model(0)
    m.fit(x, y, callbacks=[cb], **fit)
    with pytest.raises(KeyboardInterrupt):
        m.fit(x, y, callbacks=[cb, Record(stop_at=13)], **fit)  # cut off in its first epoch, after step 12
    ck.wait()
    shutil.rmtree(tmp_path / "m1")  # fresh machine: the same script again

    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("checkpoints", run="keras4", vault=vault)
    cb2 = LiferaftCallback(ck2, save_freq=2)
    resumed = model(123)
    with pytest.warns(liferaft.checkpoint.CheckpointWarning, match="fit\\(\\) call 2 of this model and this is call 1"):
        first = resumed.fit(x, y, callbacks=[cb2], **fit)
    assert first.history == {}  # done before the checkpoint was taken
    second = resumed.fit(x, y, callbacks=[cb2], **fit)
    assert cb2.restored is not None and cb2.restored.step == 12
    assert len(second.history["loss"]) == 2  # the rest of its first epoch, then its second
    assert iterations(resumed) == 20
    same_weights(reference, resumed)


def test_stopped_while_skipping_the_trained_batches_then_run_again(tmp_path: Path) -> None:
    # The stop button while a resumed fit() lets the batches trained before go by: the next fit()
    # with the same callback resumes from the checkpoint again, with no skipping left over.
    x, y, _, _ = data()
    fit = {"epochs": EPOCHS, "batch_size": BATCH, "shuffle": False, "verbose": 0}
    reference = model(0)
    reference.fit(x, y, **fit)

    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="keras5", vault=False)
    with pytest.raises(KeyboardInterrupt):
        model(0).fit(x, y, callbacks=[LiferaftCallback(ck, save_freq=2), Record(stop_at=9)], **fit)
    ck.wait()
    cb = LiferaftCallback(ck, save_freq=2)
    m = model(123)
    with pytest.raises(KeyboardInterrupt):
        m.fit(x, y, callbacks=[cb, Record(stop_at_batch=1)], **fit)  # the checkpoint is after batch 3
    hist = m.fit(x, y, callbacks=[cb], **fit)
    assert cb.restored is not None and cb.restored.step == 8
    assert len(hist.history["loss"]) == 2
    assert iterations(m) == 15
    same_weights(reference, m)
