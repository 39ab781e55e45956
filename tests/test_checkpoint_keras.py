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


def model(seed: int):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.25, seed=3), keras.layers.Dense(1)]
    )
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return m


class Record(keras.callbacks.Callback):
    """Per-batch running loss by global step (skipped batches report no loss)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, batch, logs=None):
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
