"""``liferaft.attach``: in this process, in subprocess interpreters, with real signals and exits."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import liferaft
from liferaft.errors import LiferaftError
from test_run_support import wait_for


def _syncers() -> int:
    return sum(t.name == "liferaft-sync" and t.is_alive() for t in threading.enumerate())


def _snaps(vault: str, run: str) -> list[liferaft.api.SnapshotInfo]:
    try:
        return liferaft.Vault(vault).snapshots(run=run)
    except LiferaftError:
        return []


def _content(vault: str, snap_id: str, tmp: Path, rel: str) -> str:
    out = tmp / f"r-{snap_id[:8]}"
    liferaft.Vault(vault).restore(snap_id, to=out)
    return (out / rel).read_text()


def test_attach_twice_returns_the_running_raft(tmp_path: Path, local_vault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = signal.getsignal(signal.SIGTERM)
    base = _syncers()
    raft = liferaft.attach(keep=["ckpt"], every=0.2, vault=local_vault, run="nb", quiet=True)
    try:
        assert liferaft.attach(keep=["ckpt"]) is raft
        with pytest.warns(UserWarning, match="already attached"):
            assert liferaft.attach(keep=["elsewhere"], vault=local_vault) is raft
        assert _syncers() == base + 1
        assert signal.getsignal(signal.SIGTERM) != before
        # the background syncer takes what appears
        (work / "ckpt").mkdir()
        (work / "ckpt" / "state").write_text("1")
        wait_for(lambda: _snaps(local_vault, "nb"), timeout=20, what="a background snapshot")
        # an explicit sync commits now, with step and metrics
        (work / "ckpt" / "state").write_text("2")
        snap = raft.sync(step=7, metrics={"loss": 0.5})
        assert snap.step == 7 and snap.metrics == {"loss": 0.5} and not snap.unchanged
        assert _content(local_vault, snap.id, tmp_path, "ckpt/state") == "2"
        assert raft.last_snapshot is not None and raft.snapshots_taken >= 2
    finally:
        raft.close()
    assert raft.closed and liferaft.keep.session.current() is None
    wait_for(lambda: _syncers() == base, timeout=10, what="the syncer to stop")
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(LiferaftError, match="closed"):
        raft.sync()

    # a fresh machine (another folder): attach restores, and says so
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    raft2 = liferaft.attach(keep="ckpt", every=60, vault=local_vault, run="nb", quiet=True)
    try:
        assert raft2 is not raft
        assert raft2.resumed and raft2.snapshot_id == _snaps(local_vault, "nb")[-1].id
        assert (fresh / "ckpt" / "state").read_text() == "2"
    finally:
        raft2.close()


def test_attach_to_a_vault_that_refuses_writes_fails_before_restoring(
    tmp_path: Path, local_vault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Readable but not writable (its locks/ is a file: a real OSError on the first write,
    # as root too): without this check every background pass would fail, one warning an
    # interval, while the notebook trains unprotected.
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "state").write_text("saved")
    liferaft.Vault(local_vault).snapshot([work / "ckpt"], run="nb")
    (work / "ckpt" / "state").write_text("local, newer")
    (Path(local_vault) / "locks").rmdir()
    (Path(local_vault) / "locks").write_text("not a folder")
    monkeypatch.chdir(work)
    base = _syncers()
    with pytest.raises(LiferaftError) as info:
        liferaft.attach(keep="ckpt", every=60, vault=local_vault, run="nb", force=True, quiet=True)
    assert f"the vault at {local_vault} can be read but not written" in str(info.value)
    assert "choose another vault=" in str(info.value)
    assert liferaft.keep.session.current() is None and _syncers() == base
    assert (work / "ckpt" / "state").read_text() == "local, newer"  # nothing restored over it


def _python(script: str, cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


ATTACHED = """
import os, sys, time, liferaft
raft = liferaft.attach(keep=["ckpt"], every=60, vault=sys.argv[1], run="sub")
os.makedirs("ckpt", exist_ok=True)
with open("ckpt/state", "w") as f:
    f.write(sys.argv[2])
"""


def test_attach_in_a_subprocess_flushes_on_sigterm(tmp_path: Path, local_vault: str) -> None:
    script = ATTACHED + "print('ready', flush=True)\ntime.sleep(60)\n"
    proc = _python(script, tmp_path, local_vault, "state at the signal")
    assert proc.stdout is not None
    while "ready" not in (line := proc.stdout.readline()):
        assert line, proc.stderr.read() if proc.stderr else ""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, err  # the default action still happens, after the flush
    assert time.monotonic() - t0 < 10
    snaps = _snaps(local_vault, "sub")
    assert snaps and snaps[-1].tags.get("trigger") == "SIGTERM"
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "state at the signal"


def test_attach_chains_to_the_scripts_own_sigterm_handler(tmp_path: Path, local_vault: str) -> None:
    script = (
        "import signal, sys, time\n"
        "def mine(n, f):\n    print('my handler ran', flush=True)\n    sys.exit(5)\n"
        "signal.signal(signal.SIGTERM, mine)\n" + textwrap.dedent(ATTACHED) + "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    proc = _python(script, tmp_path, local_vault, "mine")
    assert proc.stdout is not None
    while "ready" not in (line := proc.stdout.readline()):
        assert line, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, err
    assert "my handler ran" in out
    snaps = _snaps(local_vault, "sub")
    assert snaps[-1].tags.get("trigger") == "SIGTERM"
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "mine"


@pytest.mark.parametrize(("ending", "code"), [("", 0), ("raise RuntimeError('training blew up')", 1)])
def test_attach_flushes_at_interpreter_exit(tmp_path: Path, local_vault: str, ending: str, code: int) -> None:
    proc = _python(ATTACHED + ending + "\n", tmp_path, local_vault, f"last words {code}")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    snaps = _snaps(local_vault, "sub")
    assert snaps and snaps[-1].tags.get("trigger") == "exit", err
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == f"last words {code}"


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, threading, signal, liferaft\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "liferaft.attach\n"  # resolving the name starts nothing either
        "print(threading.active_count(), signal.getsignal(signal.SIGTERM) is before, 'liferaft.api' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out == ["1", "True", "False"]


@pytest.mark.skipif(importlib.util.find_spec("IPython") is None, reason="IPython is not installed")
def test_attach_in_ipython(tmp_path: Path, local_vault: str) -> None:
    code = ATTACHED.replace("sys.argv[1]", json.dumps(local_vault)).replace("sys.argv[2]", '"from ipython"')
    code += "assert liferaft.attach(keep=['ckpt']) is raft\n"
    r = subprocess.run(
        [sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=NoColor", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Error" not in r.stdout, r.stdout
    snaps = _snaps(local_vault, "sub")
    assert snaps and snaps[-1].tags.get("trigger") == "exit"
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "from ipython"


@pytest.mark.skipif(
    importlib.util.find_spec("jupyter_client") is None or importlib.util.find_spec("ipykernel") is None,
    reason="jupyter_client and ipykernel are not installed",
)
def test_attach_in_a_jupyter_kernel(tmp_path: Path, local_vault: str) -> None:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(cwd=str(tmp_path))
    try:
        code = ATTACHED.replace("sys.argv[1]", json.dumps(local_vault)).replace("sys.argv[2]", '"from a kernel"')
        code += "print(liferaft.attach(keep=['ckpt']) is raft)\n"
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        # a shutdown (or a restart) of the kernel flushes
        km.shutdown_kernel(now=False)
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)
    snaps = _snaps(local_vault, "sub")
    assert snaps and snaps[-1].tags.get("trigger") == "exit"
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "from a kernel"

    # an idle kernel that gets SIGTERM (a runtime going away) flushes before it dies
    km, kc = start_new_kernel(cwd=str(tmp_path))
    try:
        code = ATTACHED.replace("sys.argv[1]", json.dumps(local_vault)).replace("sys.argv[2]", '"before SIGTERM"')
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        km.signal_kernel(signal.SIGTERM)
        wait_for(lambda: not km.is_alive(), timeout=30, what="the kernel to exit")
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)
    snaps = _snaps(local_vault, "sub")
    assert snaps[-1].tags.get("trigger") == "SIGTERM"
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "before SIGTERM"
