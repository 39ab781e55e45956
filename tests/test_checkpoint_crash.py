"""Proofs: SIGKILL during an async save, damaged checkpoints here and in the vault."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import liferaft
from conftest import machine
from liferaft.checkpoint import CheckpointDamaged, CheckpointWarning
from liferaft.checkpoint.folder import MANIFEST

np = pytest.importorskip("numpy")

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import liferaft

    ck = liferaft.Checkpointer(sys.argv[1], run="crash", vault=sys.argv[2], keep_last=3, prune=False)

    arrays = {k: np.empty(8 << 20, dtype=np.float32) for k in "abc"}  # 96 MiB, touched once

    def state(i):
        arrays["a"].fill(i)
        arrays["b"].fill(-i)
        arrays["c"].fill(2 * i)
        return {**arrays, "step": i}

    ck.save(1, state(1))
    ck.wait()
    print("ready", flush=True)
    i = 2
    while True:
        ck.save(i, state(i))
        i += 1
    """
)


def check_state(r, step: int) -> None:
    assert r is not None and r.step == step
    assert r.state["step"] == step
    assert float(r.state["a"][0]) == step and float(r.state["a"][-1]) == step
    assert float(r.state["b"][12345]) == -step and float(r.state["c"][-1]) == 2 * step


def start_child(tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    (tmp_path / "m1").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(script), "checkpoints", str(tmp_path / "vault")],
        cwd=tmp_path / "m1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc


def kill_when(proc: subprocess.Popen[str], found, timeout: float = 90.0) -> int:
    """Poll until ``found()`` names a step, SIGKILL the child at once, return that step."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            step = found()
            if step is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return step
            if proc.poll() is not None:
                raise AssertionError(f"child died by itself: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.001)
        raise AssertionError("the moment to kill never came")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_sigkill_while_writing_restores_the_previous_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "m1" / "checkpoints"
    proc = start_child(tmp_path)
    work = folder / ".liferaft"

    def writing() -> int | None:
        try:
            names = os.listdir(work)
        except FileNotFoundError:
            return None
        for name in names:
            if name.startswith(f"tmp-{proc.pid}-"):
                step = int(name.rsplit("step-", 1)[1])
                if step >= 3:
                    return step
        return None

    k = kill_when(proc, writing)
    assert not (folder / f"step-{k}").exists(), "the kill was meant to land mid-write"
    assert any(n.startswith(f"tmp-{proc.pid}-") for n in os.listdir(work))  # its half-written folder

    # Same machine, new process: the previous checkpoint, verified; the garbage is cleared.
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="crash", vault=str(tmp_path / "vault"))
    assert not any(n.startswith(f"tmp-{proc.pid}-") for n in os.listdir(work))
    check_state(ck.restore(), k - 1)
    # Fresh machine: nothing local, the vault has it (saves are committed in order).
    with machine(tmp_path / "m2"):
        fresh = liferaft.Checkpointer("checkpoints", run="crash", vault=str(tmp_path / "vault"))
    r = fresh.restore()
    check_state(r, k - 1)
    assert r.source == "vault"


def test_sigkill_while_committing_keeps_the_local_checkpoint_and_commits_it_later(tmp_path: Path) -> None:
    folder = tmp_path / "m1" / "checkpoints"
    vault = str(tmp_path / "vault")
    proc = start_child(tmp_path)

    def committing() -> int | None:
        for step in (3, 4, 5, 6):
            if (folder / f"step-{step}" / MANIFEST).exists() and not (folder / f"step-{step + 1}").exists():
                return step
        return None

    k = kill_when(proc, committing)
    with machine(tmp_path / "m1"):
        ck = liferaft.Checkpointer("checkpoints", run="crash", vault=vault, keep_last=3)
    check_state(ck.restore(), k)  # complete on local disk: it verifies
    with machine(tmp_path / "m2"):
        fresh = liferaft.Checkpointer("checkpoints", run="crash", vault=vault)
    r = fresh.restore()
    assert r is not None and r.step in (k - 1, k)  # k only if its commit landed before the kill
    check_state(r, r.step)
    # The next save of the resumed run commits the orphan first.
    ck.save(k + 1, {"a": np.full(4, k + 1.0, dtype=np.float32), "b": np.full(4, -(k + 1.0)), "c": np.full(4, 2.0 * (k + 1)), "step": k + 1})
    ck.wait()
    shutil.rmtree(tmp_path / "m2")
    with machine(tmp_path / "m2"):
        again = liferaft.Checkpointer("checkpoints", run="crash", vault=vault)
    check_state(again.restore(k), k)


# ------------------------------------------------------------------ damage


def random_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.random(50_000).astype(np.float32), "step": step}


def saved(tmp_path: Path, steps=(1, 2, 3), **kw) -> liferaft.Checkpointer:
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="dmg", vault=str(tmp_path / "vault"), keep_last=None, **kw)
    for s in steps:
        ck.save(s, random_state(s))
    ck.wait()
    return ck


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def newest_pack(tmp_path: Path) -> Path:
    return max((p for p in (tmp_path / "vault" / "packs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)


def restore_with_warnings(ck: liferaft.Checkpointer, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = ck.restore(**kw)
    return r, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def test_damaged_local_newest_is_repaired_from_the_vault(tmp_path: Path) -> None:
    saved(tmp_path)
    flip(tmp_path / "checkpoints" / "step-3" / "tensors.safetensors", 100_000)
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="dmg", vault=str(tmp_path / "vault"))
    r, msgs = restore_with_warnings(ck)
    assert r is not None and r.step == 3 and r.source == "vault"
    assert np.array_equal(r.state["w"], random_state(3)["w"])
    assert len(msgs) == 1 and "step-3" in msgs[0] and "trying its copy in the vault" in msgs[0]
    r2, msgs2 = restore_with_warnings(liferaft.Checkpointer(tmp_path / "checkpoints", run="dmg", vault=str(tmp_path / "vault")))
    assert r2.source == "local" and r2.step == 3 and msgs2 == []  # the folder was put right


def test_damaged_newest_everywhere_falls_back_to_the_one_before(tmp_path: Path) -> None:
    saved(tmp_path)
    flip(newest_pack(tmp_path), 10)  # step 3's data in the vault
    flip(tmp_path / "checkpoints" / "step-3" / "tensors.safetensors", 5000)
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="dmg", vault=str(tmp_path / "vault"))
    r, msgs = restore_with_warnings(ck)
    assert r is not None and r.step == 2 and r.source == "local"
    assert np.array_equal(r.state["w"], random_state(2)["w"])
    assert len(msgs) == 2 and all("step-3" in m for m in msgs)
    assert "snapshot" in msgs[1]
    assert len(r.fallbacks) == 2


def test_fresh_machine_with_a_damaged_vault_copy_falls_back(tmp_path: Path) -> None:
    saved(tmp_path)
    flip(newest_pack(tmp_path), 10)
    shutil.rmtree(tmp_path / "checkpoints")
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="dmg", vault=str(tmp_path / "vault"))
    r, msgs = restore_with_warnings(ck)
    assert r is not None and r.step == 2 and r.source == "vault"
    assert len(msgs) == 1 and "step-3" in msgs[0]
    assert not (tmp_path / "checkpoints" / "step-3").exists()  # nothing damaged was put in place


def test_unreadable_manifest_and_truncated_file_count_as_damage(tmp_path: Path) -> None:
    saved(tmp_path)
    (tmp_path / "checkpoints" / "step-3" / MANIFEST).write_text('{"format": "liferaft-checkpoint", "vers')
    path = tmp_path / "checkpoints" / "step-2" / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="dmg", vault=False)
    r, msgs = restore_with_warnings(ck)
    assert r is not None and r.step == 1
    assert "step-3" in msgs[0] and "not valid JSON" in msgs[0]
    assert "step-2" in msgs[1] and "bytes" in msgs[1]


def test_nothing_verifies_is_an_error_not_a_first_run(tmp_path: Path) -> None:
    saved(tmp_path, (1,))
    flip(tmp_path / "checkpoints" / "step-1" / "tensors.safetensors", 50_000)
    ck = liferaft.Checkpointer(tmp_path / "checkpoints", run="dmg", vault=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointDamaged, match="no checkpoint of run 'dmg' verifies"):
            ck.restore()
