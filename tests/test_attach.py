"""``liferaft.attach``: in this process, in subprocess interpreters, with real signals and exits."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("include", [False, True])
def test_attach_leaves_credential_files_out_with_a_note_unless_include_secrets(
    tmp_path: Path, local_vault: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], include: bool
) -> None:
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "state").write_text("1")
    (work / "ckpt" / ".env").write_text("WANDB_API_KEY=x")
    monkeypatch.chdir(work)
    raft = liferaft.attach(keep="ckpt", every=60, vault=local_vault, run="nb", include_secrets=include)
    try:
        snap = raft.sync()
    finally:
        raft.close()
    noted = "credential file left out of the snapshots (ckpt/.env)" in capsys.readouterr().out
    assert noted is not include
    liferaft.Vault(local_vault).restore(snap.id, to=tmp_path / "back")
    assert (tmp_path / "back" / "ckpt" / ".env").exists() is include


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


# Attached with flush_timeout=1, then says 'ready' and waits for a file named go.
UNTIL_GO = (
    ATTACHED.replace('run="sub"', 'run="sub", flush_timeout=1')
    + "print('ready', flush=True)\n"
    + "while not os.path.exists('go'):\n    time.sleep(0.01)\n"
)


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    while "ready" not in (line := proc.stdout.readline()):
        assert line, proc.stderr.read() if proc.stderr else ""


def _locks(vault: str) -> list[str]:
    return sorted(n for n in os.listdir(Path(vault) / "locks") if n.startswith("session-"))


def test_attach_in_a_subprocess_flushes_on_sigterm(tmp_path: Path, local_vault: str) -> None:
    script = ATTACHED + "print('ready', flush=True)\ntime.sleep(60)\n"
    proc = _python(script, tmp_path, local_vault, "state at the signal")
    _wait_ready(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, err  # the default action still happens, after the flush
    assert time.monotonic() - t0 < 10
    snaps = _snaps(local_vault, "sub")
    assert [s.tags.get("trigger") for s in snaps] == ["SIGTERM"]
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "state at the signal"
    assert _locks(local_vault) == []


# The script's own SIGTERM handler saves a checkpoint and exits; a `finally` writes more
# while the exception unwinds. Installed before attach (attach chains to it) or after
# (it replaces attach's): either way all of it is in the one final snapshot.
OWN_HANDLER = """
import signal, sys, time
def mine(n, f):
    print('my handler ran', flush=True)
    with open('ckpt/state', 'w') as f:
        f.write('saved by my handler')
    sys.exit(5)
"""


@pytest.mark.parametrize("order", ["before-attach", "after-attach"])
def test_what_the_scripts_own_sigterm_handler_saves_is_in_the_final_snapshot(tmp_path: Path, local_vault: str, order: str) -> None:
    install = "signal.signal(signal.SIGTERM, mine)\n"
    script = (
        OWN_HANDLER
        + (install if order == "before-attach" else "")
        + ATTACHED
        + (install if order == "after-attach" else "")
        + "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
        + "finally:\n    open('ckpt/unwound', 'w').write('written while exiting')\n"
    )
    proc = _python(script, tmp_path, local_vault, "before the signal")
    _wait_ready(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, err
    assert "my handler ran" in out
    snaps = _snaps(local_vault, "sub")
    if order == "before-attach":
        # attach's handler saw the signal: a snapshot before the script's handler ran, and
        # the final one at exit, after it
        assert [s.tags.get("trigger") for s in snaps] == ["SIGTERM", "SIGTERM"], err
        assert _content(local_vault, snaps[0].id, tmp_path, "ckpt/state") == "before the signal"
    else:
        assert [s.tags.get("trigger") for s in snaps] == ["exit"], err
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "saved by my handler"
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/unwound") == "written while exiting"
    assert _locks(local_vault) == []


@pytest.mark.parametrize("how", ["sig-dfl-and-kill", "os-exit", "closed-raft-handler"])
def test_a_handler_that_ends_the_process_without_unwinding_still_leaves_a_snapshot(tmp_path: Path, local_vault: str, how: str) -> None:
    # No exit hook runs after these: the snapshot must be taken before the script's handler.
    # "closed-raft-handler": a raft closed from another thread left its handler in, and the
    # next attach() chained to it (it ends the process by the default action).
    handler = {
        "sig-dfl-and-kill": "def mine(n, f):\n    signal.signal(n, signal.SIG_DFL)\n    os.kill(os.getpid(), n)\n",
        "os-exit": "def mine(n, f):\n    os._exit(3)\n",
        "closed-raft-handler": "",
    }[how]
    install = "signal.signal(signal.SIGTERM, mine)\n" if handler else ""
    before = ""
    if how == "closed-raft-handler":
        before = (
            "import threading, liferaft\n"
            f"old = liferaft.attach(keep='other', vault={local_vault!r}, run='old', every=3600, quiet=True)\n"
            "t = threading.Thread(target=old.close); t.start(); t.join()\n"
        )
    script = "import os, signal, sys, time\n" + handler + install + before + ATTACHED + "print('ready', flush=True)\ntime.sleep(60)\n"
    proc = _python(script, tmp_path, local_vault, "state at the signal")
    _wait_ready(proc)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == (3 if how == "os-exit" else -signal.SIGTERM), err
    snaps = _snaps(local_vault, "sub")
    assert snaps and snaps[-1].tags.get("trigger") == "SIGTERM", err
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "state at the signal"


@pytest.mark.parametrize("how", ["flag-before-attach", "flag-after-attach", "ignored-before-attach"])
def test_a_script_that_goes_on_after_sigterm_is_kept_until_it_ends(tmp_path: Path, local_vault: str, how: str) -> None:
    # The usual training-loop pattern: the handler sets a flag, the loop saves and ends.
    # A script that ignores SIGTERM (SIG_IGN) goes on too, and must stay protected.
    if how == "ignored-before-attach":
        install = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    else:
        install = "signal.signal(signal.SIGTERM, lambda n, f: stop.append(n))\n"
    script = (
        "import os, signal, sys, time\nstop = []\n"
        + (install if how.endswith("before-attach") else "")
        + ATTACHED
        + (install if how.endswith("after-attach") else "")
        + "print('ready', flush=True)\n"
        + "end = time.monotonic() + 30\n"
        + "while not stop and not os.path.exists('go') and time.monotonic() < end:\n    time.sleep(0.01)\n"
        + "with open('ckpt/state', 'w') as f:\n    f.write('saved after the signal')\n"
    )
    proc = _python(script, tmp_path, local_vault, "before the signal")
    _wait_ready(proc)
    proc.send_signal(signal.SIGTERM)
    if how == "ignored-before-attach":
        # attach's handler saw it (it snapshots at once); then the script goes on
        wait_for(lambda: any(s.tags.get("trigger") == "SIGTERM" for s in _snaps(local_vault, "sub")), timeout=20, what="a SIGTERM snapshot")
        (tmp_path / "go").touch()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    snaps = _snaps(local_vault, "sub")
    assert snaps[-1].tags.get("trigger") == ("exit" if how == "flag-after-attach" else "SIGTERM"), err
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "saved after the signal"
    assert _locks(local_vault) == []


def _hang_the_vault(vault: str) -> Path:
    """A FIFO among the index fragments: the next snapshot hangs opening it (a stuck mount)."""
    fifo = Path(vault) / "index" / ("0" * 64)
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    return fifo


def _unhang(fifo: Path, proc: subprocess.Popen[str]) -> None:
    """Let the reader blocked on ``fifo`` go on (it reads a damaged fragment, which is skipped)."""
    while proc.poll() is None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
        except OSError:
            time.sleep(0.01)
            continue
        fifo.unlink()  # before the reader sees EOF: a later listing must not find it again
        os.close(fd)
        return


@pytest.mark.parametrize("during", ["SIGTERM", "close", "exit"])
def test_a_sigterm_during_the_final_snapshot_waits_for_it(tmp_path: Path, local_vault: str, during: str) -> None:
    # A second SIGTERM during the SIGTERM snapshot, or one during close()'s or the exit's:
    # the process must not die half-way (no final snapshot, a session lock left behind).
    script = (
        ATTACHED
        + "print('ready', flush=True)\n"
        + "while not os.path.exists('go'):\n    time.sleep(0.01)\n"
        + ("raft.close()\nprint('closed', flush=True)\n" if during == "close" else "")
    )
    proc = _python(script, tmp_path, local_vault, "state at the signal")
    fifo = None
    try:
        _wait_ready(proc)
        fifo = _hang_the_vault(local_vault)
        if during == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            (tmp_path / "go").touch()
        wait_for(lambda: _locks(local_vault), timeout=20, what="the final snapshot to start")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None, "the process died during its final snapshot"
        _unhang(fifo, proc)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if fifo is not None and fifo.exists():
            fifo.unlink()
    # after the snapshot the signal is acted on: the default action ends the process
    assert proc.returncode == (0 if during == "exit" else -signal.SIGTERM), err
    snaps = _snaps(local_vault, "sub")
    assert [s.tags.get("trigger") for s in snaps] == [during], err
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "state at the signal"
    assert _locks(local_vault) == []
    assert "closed" not in out  # close() did not return into the script: the signal ended it


@pytest.mark.parametrize("ending", ["SIGTERM", "exit", "close", "SIGTERM during close"])
def test_a_hung_vault_delays_the_end_by_flush_timeout_at_most(tmp_path: Path, local_vault: str, ending: str) -> None:
    # The snapshot hangs with its session lock written: the process ends anyway, and
    # deletes that lock rather than leave it to hold off prune until it goes stale.
    script = UNTIL_GO + ("print('closed', raft.close(), flush=True)\n" if "close" in ending else "")
    proc = _python(script, tmp_path, local_vault, "state")
    fifo = None
    try:
        _wait_ready(proc)
        fifo = _hang_the_vault(local_vault)
        t0 = time.monotonic()
        if ending == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            (tmp_path / "go").touch()
        if ending == "SIGTERM during close":
            time.sleep(0.4)  # close() is waiting on the hung snapshot: the signal is held
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if fifo is not None:
            fifo.unlink()
    assert proc.returncode == (-signal.SIGTERM if "SIGTERM" in ending else 0), err
    assert f"the final snapshot ({ending.split()[-1]}) did not finish within 1.0s" in err
    assert "a larger flush_timeout= to attach()" in err
    if ending == "SIGTERM during close":
        # the held signal ends the process once close() stops waiting: no exit hook runs
        assert "closed" not in out and "goes on in the background" not in err
        assert took < 5, took
    elif ending == "close":
        # close() returned (None) after flush_timeout; the exit gave the snapshot as long again
        assert "closed None" in out
        assert "goes on in the background" in err and "did not finish by the end of the process" in err
        assert took < 8, took
    else:
        assert took < 5, took
    assert "session lock could not be removed" not in err
    assert _snaps(local_vault, "sub") == []
    assert _locks(local_vault) == []


@pytest.mark.skipif(importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None, reason="needs moto and s3fs")
def test_the_exit_does_not_wait_for_a_pack_upload_to_a_crawling_store(tmp_path: Path, moto_server: Any) -> None:
    # The final snapshot's 12 MiB pack goes up at 64 KiB per 50 ms (~10 s): the exit
    # gives it flush_timeout, gives it up (its session lock deleted), and leaves without
    # waiting for the upload threads, which used to hold the interpreter's exit.
    from servers import Fault, FaultProxy

    url = moto_server.vault_url()
    raw = moto_server.raw_fs()
    prefix = url.removeprefix("s3://")
    script = (
        ATTACHED.replace('run="sub"', 'run="sub", flush_timeout=1')
        + "open('ckpt/big.bin', 'wb').write(os.urandom(12 << 20))\n"
        + "print('ready', flush=True)\n"
        + "while not os.path.exists('go'):\n    time.sleep(0.01)\n"
    )
    with FaultProxy(moto_server.port, lambda _i: Fault("slow", 0, 0.05), lifetime=120) as proxy:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), url, "state"],
            cwd=tmp_path,
            env={**os.environ, **moto_server.env(proxy.endpoint)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_ready(proc)
            t0 = time.monotonic()
            (tmp_path / "go").touch()
            _out, err = proc.communicate(timeout=60)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert "the final snapshot (exit) did not finish within 1.0s" in err
    assert "session lock could not be removed" not in err and "Traceback" not in err, err
    assert took < 7, f"the exit took {took:.1f}s: it waited for the upload\n{err}"

    def listed(folder: str) -> list[str]:
        try:
            return list(raw.ls(f"{prefix}/{folder}", refresh=True))
        except FileNotFoundError:  # no object under it: S3 has no folders
            return []

    assert [p for p in listed("locks") if "session-" in p] == []
    assert listed("snapshots") == []


def test_attach_again_after_close_gave_up_waiting_takes_over_the_run(tmp_path: Path, local_vault: str) -> None:
    # close() left its snapshot in flight (a stalled vault); the cell is run again. Were
    # that snapshot to commit once the vault answers, the old files would land on top of
    # the new raft's: the new attach gives it up first.
    script = (
        UNTIL_GO
        + "print('closed', raft.close(), flush=True)\n"
        + "with open('ckpt/state', 'w') as f:\n    f.write('newer')\n"
        + "raft2 = liferaft.attach(keep=['ckpt'], every=60, vault=sys.argv[1], run='sub', flush_timeout=30)\n"
        + "print('closed again', raft2.close().short_id, flush=True)\n"
    )
    log = tmp_path / "stderr.log"
    with open(log, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), local_vault, "older"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
    fifo = None
    try:
        _wait_ready(proc)
        fifo = _hang_the_vault(local_vault)
        (tmp_path / "go").touch()
        wait_for(lambda: "the new attach takes over" in log.read_text(), timeout=15, what="the take-over warning")
        time.sleep(0.5)  # the new attach's restore reaches the hung vault too
        _unhang(fifo, proc)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if fifo is not None and fifo.exists():
            fifo.unlink()
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "the final snapshot of run 'sub' that close() left in flight is given up" in err
    snaps = _snaps(local_vault, "sub")
    assert len(snaps) == 1 and f"closed again {snaps[0].short_id}" in out, (out, err)
    assert _content(local_vault, snaps[0].id, tmp_path, "ckpt/state") == "newer"
    assert _locks(local_vault) == []


def test_an_unbounded_flush_timeout_is_waited_out_not_an_error(tmp_path: Path, local_vault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _python(ATTACHED.replace('run="sub"', 'run="sub", flush_timeout=float("inf")'), tmp_path, local_vault, "at exit")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Exception" not in err and "Traceback" not in err, err
    snaps = _snaps(local_vault, "sub")
    assert [s.tags.get("trigger") for s in snaps] == ["exit"], err
    monkeypatch.chdir(tmp_path)
    raft = liferaft.attach(keep=["ckpt"], every=60, vault=local_vault, run="sub", quiet=True)
    try:
        assert raft.resumed
    finally:
        assert raft.close(timeout=1e12) is not None  # past what a timer takes: no limit, no OverflowError


def test_close_on_a_stalled_vault_returns_and_the_snapshot_commits_when_the_vault_answers(tmp_path: Path, local_vault: str) -> None:
    script = (
        UNTIL_GO
        + "print('closed', raft.close(), flush=True)\n"
        + "t = time.monotonic()\n"
        + "while raft.last_snapshot is None and time.monotonic() - t < 20:\n    time.sleep(0.01)\n"
        + "print('committed', raft.last_snapshot.short_id, flush=True)\n"
    )
    proc = _python(script, tmp_path, local_vault, "state at close")
    fifo = None
    try:
        _wait_ready(proc)
        fifo = _hang_the_vault(local_vault)
        t0 = time.monotonic()
        (tmp_path / "go").touch()
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "closed None"
        assert time.monotonic() - t0 < 5  # not held by the stalled vault
        assert proc.poll() is None
        _unhang(fifo, proc)  # the vault answers again: the snapshot left in flight goes on
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if fifo is not None and fifo.exists():
            fifo.unlink()
    assert proc.returncode == 0, err
    assert "the final snapshot (close) did not finish within 1.0s; it goes on in the background" in err
    snaps = _snaps(local_vault, "sub")
    assert [s.tags.get("trigger") for s in snaps] == ["close"], err
    assert f"committed {snaps[-1].short_id}" in out
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "state at close"
    assert "did not finish by the end of the process" not in err
    assert _locks(local_vault) == []


def test_ctrl_c_in_an_attached_script_takes_the_final_snapshot(tmp_path: Path, local_vault: str) -> None:
    proc = _python(ATTACHED + "print('ready', flush=True)\ntime.sleep(60)\n", tmp_path, local_vault, "at Ctrl-C")
    _wait_ready(proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode in (1, -signal.SIGINT), err  # -c exits 1; a script file ends by SIGINT
    assert "KeyboardInterrupt" in err
    snaps = _snaps(local_vault, "sub")
    assert [s.tags.get("trigger") for s in snaps] == ["exit"], err
    assert _content(local_vault, snaps[-1].id, tmp_path, "ckpt/state") == "at Ctrl-C"
    assert _locks(local_vault) == []


def test_close_leaves_a_sigterm_handler_the_script_installed_after_attach(
    tmp_path: Path, local_vault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM)

    def mine(signum: int, frame: object) -> None:
        pass

    raft = liferaft.attach(keep="ckpt", every=60, vault=local_vault, run="nb", quiet=True)
    try:
        signal.signal(signal.SIGTERM, mine)
        raft.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        raft.close()
        signal.signal(signal.SIGTERM, before)


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
