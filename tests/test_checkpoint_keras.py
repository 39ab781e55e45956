"""Keras 3 (torch backend): resume mid-epoch where training stopped, keep and load the best model."""

from __future__ import annotations

import os
import shutil
import warnings
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


def fine_tune(m) -> None:
    """What fine-tuning does between fits: a new optimizer at a lower rate, its iterations from 0 again."""
    for layer in m.layers:
        layer.trainable = True
    m.compile(optimizer=keras.optimizers.Adam(0.002), loss="mse")


def frozen_model(seed: int, frozen: bool):
    """model(seed), with its first layer frozen for the first fit() when ``frozen``."""
    m = model(seed)
    if frozen:
        m.layers[0].trainable = False
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return m


def saved_steps(ck: liferaft.Checkpointer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The step of each save() the callback makes, in order."""
    steps: list[int] = []
    save = ck.save

    def recording(step: int, state, **kwargs) -> None:
        steps.append(step)
        save(step, state, **kwargs)

    monkeypatch.setattr(ck, "save", recording)
    return steps


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


def test_a_script_of_two_fits_cut_off_in_the_second_replays_on_a_fresh_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, _, _ = data()
    fit = {"epochs": 2, "batch_size": BATCH, "shuffle": False, "verbose": 0}
    reference = model(0)
    reference.fit(x, y, **fit)
    reference.fit(x, y, **fit)

    vault = str(tmp_path / "vault")
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="keras4", vault=vault)
    steps = saved_steps(ck, monkeypatch)
    cb = LiferaftCallback(ck, save_freq=2)
    m = model(0)
    m.fit(x, y, callbacks=[cb], **fit)
    with pytest.raises(KeyboardInterrupt):
        m.fit(x, y, callbacks=[cb, Record(stop_at=13)], **fit)  # cut off in its first epoch, after step 12
    ck.wait()
    shutil.rmtree(tmp_path / "m1")  # fresh machine: the same script again

    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("checkpoints", run="keras4", vault=vault)
    steps2 = saved_steps(ck2, monkeypatch)
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
    # the same optimizer went on through both fits: its iterations are the step numbers, with nothing added
    assert steps == [2, 4, 5, 6, 8, 10, 12]
    assert steps2 == [14, 15, 16, 18, 20]


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


@pytest.mark.parametrize("stopped", [False, True], ids=["uninterrupted", "stopped-and-run-again"])
def test_a_recompile_between_fits_keeps_the_step_numbers_increasing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped: bool) -> None:
    # fit, recompile with a new optimizer, fit again with the same callback: the second fit's
    # checkpoints come after the first's, so retention keeps them and restore() takes the newest.
    # Stopped in its third batch and run again, the second fit resumes from its own checkpoint 12.
    x, y, _, _ = data()
    fit = {"epochs": 2, "batch_size": BATCH, "shuffle": False, "verbose": 0}
    plain = model(0)
    plain.fit(x, y, **fit)
    fine_tune(plain)
    plain.fit(x, y, **fit)

    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="keras6", vault=False, keep_last=2)
    steps = saved_steps(ck, monkeypatch)
    cb = LiferaftCallback(ck, save_freq=2)
    m = model(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(x, y, callbacks=[cb], **fit)
        fine_tune(m)
        if stopped:
            with pytest.raises(KeyboardInterrupt):
                m.fit(x, y, callbacks=[cb, Record(stop_at_batch=2)], **fit)
        m.fit(x, y, callbacks=[cb], **fit)
    assert [str(w.message) for w in caught if issubclass(w.category, liferaft.checkpoint.CheckpointWarning)] == []
    assert steps == [2, 4, 5, 6, 8, 10, 12, 14, 15, 16, 18, 20]  # the second fit's go on from the first's 10
    if stopped:
        assert cb.restored is not None and cb.restored.step == 12
    kept = [c.step for c in ck.checkpoints()]
    # keep_last=2 keeps the fine-tune's 18 and 20; the Checkpointer never deletes the one its process
    # restored last: 10, which the second fit() looked at and trained on past, or 12, which it resumed from
    assert kept[-2:] == [18, 20] and set(kept[:-2]) <= {12 if stopped else 10}
    r = ck.restore()
    assert r is not None and r.step == 20 and r.state["fit"] == 1 and r.state["epoch"] == 2
    same_weights(plain, m)


@pytest.mark.parametrize("frozen", [False, True], ids=["lower-rate", "unfreeze"])
def test_a_fine_tune_script_cut_off_in_its_second_fit_replays_on_a_fresh_machine(tmp_path: Path, frozen: bool) -> None:
    # The same script on a fresh machine: the first fit takes the weights of the fine-tune's checkpoint and
    # trains nothing, the second (after the recompile) resumes at its batch, with the same step numbers.
    x, y, _, _ = data()
    fit = {"epochs": 2, "batch_size": BATCH, "shuffle": False, "verbose": 0}
    reference = frozen_model(0, frozen)
    reference.fit(x, y, **fit)
    fine_tune(reference)
    full = Record()
    reference.fit(x, y, callbacks=[full], **fit)

    vault = str(tmp_path / "vault")
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="keras7", vault=vault, keep_last=2)
    cb = LiferaftCallback(ck, save_freq=2)
    m = frozen_model(0, frozen)
    m.fit(x, y, callbacks=[cb], **fit)
    fine_tune(m)
    with pytest.raises(KeyboardInterrupt):
        m.fit(x, y, callbacks=[cb, Record(stop_at_batch=2)], **fit)  # cut off in its third batch, after step 10 + 2
    ck.wait()
    shutil.rmtree(tmp_path / "m1")  # fresh machine: the same script again

    with machine(tmp_path / "m2"):
        ck2 = liferaft.Checkpointer("checkpoints", run="keras7", vault=vault, keep_last=2)
    cb2 = LiferaftCallback(ck2, save_freq=2)
    resumed = frozen_model(123, frozen)
    with pytest.warns(liferaft.checkpoint.CheckpointWarning, match="fit\\(\\) call 2 of this model and this is call 1"):
        first = resumed.fit(x, y, callbacks=[cb2], **fit)
    assert first.history == {}
    fine_tune(resumed)
    second = Record()
    resumed.fit(x, y, callbacks=[cb2, second], **fit)
    assert cb2.restored is not None and cb2.restored.step == 12 and cb2.restored.state["fit"] == 1
    assert second.losses == {s: full.losses[s] for s in range(3, 11)}  # the rest of the fine-tune, loss for loss
    assert iterations(resumed) == 10
    same_weights(reference, resumed)
    assert [c.step for c in ck2.checkpoints()] == [12, 18, 20]  # keep_last=2, and the one resumed from
    r = ck2.restore()
    assert r is not None and r.step == 20 and r.state["fit"] == 1


class Noise(keras.layers.Layer):
    """Gaussian noise in training from an unseeded keras.random call: Keras's global SeedGenerator draws it."""

    def call(self, x, training=False):
        if training:
            return x + keras.random.normal(keras.ops.shape(x), stddev=0.5)
        return x


def noisy_model(seed: int | None):
    if seed is not None:
        keras.utils.set_random_seed(seed)  # also drops Keras's global SeedGenerator: the next draw makes a new one
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"), Noise(), keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return m


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-process", "same-process"])
def test_resume_mid_epoch_with_unseeded_keras_random_draws_equals_uninterrupted_training(tmp_path: Path, fresh: bool) -> None:
    # keras.random.normal(shape) with no seed draws from Keras's global SeedGenerator, a state outside the
    # model and outside torch's generators: a resume must carry on from it as of the checkpoint's batch.
    x, y, _, _ = data()
    fit = {"epochs": EPOCHS, "batch_size": BATCH, "shuffle": False, "verbose": 0}
    full = Record()
    reference = noisy_model(0)
    reference.fit(x, y, callbacks=[full], **fit)

    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="keras8", vault=False)
    with pytest.raises(KeyboardInterrupt):
        noisy_model(0).fit(x, y, callbacks=[LiferaftCallback(ck, save_freq=2), Record(stop_at=9)], **fit)
    ck.wait()
    second = Record()
    # a fresh process has other generators (none of Keras's yet); the same one, run again, has them as the cut-off run left them
    resumed = noisy_model(123 if fresh else None)
    cb = LiferaftCallback(ck, save_freq=2)
    resumed.fit(x, y, callbacks=[cb, second], **fit)
    assert cb.restored is not None and cb.restored.step == 8
    assert second.losses == {s: full.losses[s] for s in range(9, 16)}  # loss for loss
    same_weights(reference, resumed)
