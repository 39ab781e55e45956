"""``liferaft run`` end to end: real subprocesses, real signals, a real local vault."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import liferaft
from conftest import cli
from liferaft.api import SnapshotInfo
from liferaft.errors import NotAVault, VaultNotFound
from test_run_support import (
    CHECKPOINT_6MIB_THEN_WAIT,
    STARTED,
    Terminal,
    finish,
    kill_leftovers,
    no_traceback,
    progress,
    setup_work,
    start_run,
    starts,
    wait_for,
)


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    kill_leftovers()


def _env(tmp_path: Path, **kw: str) -> dict[str, str]:
    env = {"T_PROGRESS": str(tmp_path / "progress.log"), "T_STEP_S": "0.02", "T_CKPT_EVERY": "5"}
    env.update(kw)
    return env


def _newest(vault: str, run: str = "work") -> SnapshotInfo | None:
    try:
        snaps = liferaft.Vault(vault).snapshots(run=run)
    except (VaultNotFound, NotAVault):  # not created yet, or being created
        return None
    return snaps[-1] if snaps else None


def _step_in(vault: str, snap_id: str, tmp: Path) -> int:
    out = tmp / f"restored-{snap_id[:8]}"
    liferaft.Vault(vault).restore(snap_id, to=out)
    return json.loads((out / "ckpt" / "state.json").read_text())["step"]


# ---------------------------------------------------------------- signals


def test_sigterm_final_snapshot_holds_state_at_signal_and_exit_code_is_the_commands(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    grace = 5.0
    proc = start_run(
        ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "0.3", "--grace", f"{grace:g}", "--", "python", "trainer.py"],
        work,
        _env(tmp_path, T_SIG_EXIT="7"),
    )
    wait_for(lambda: _newest(local_vault) is not None and sum(p[0] == "step" for p in progress(prog)) >= 15, what="a committed snapshot")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # as a platform does: to liferaft only
    rc, _out, err = finish(proc)
    elapsed = time.monotonic() - t0
    assert rc == 7, err
    no_traceback(err)
    stops = [p for p in progress(prog) if p[0] == "stop"]
    assert len(stops) == 1 and stops[0][1] == str(int(signal.SIGTERM)), progress(prog)
    stopped_at = int(stops[0][2])
    newest = _newest(local_vault)
    assert newest is not None and newest.tags.get("trigger") == "SIGTERM", err
    assert _step_in(local_vault, newest.id, tmp_path) == stopped_at
    assert elapsed < grace + 5.0, f"took {elapsed:.1f}s to exit"
    # the command led its own process group in liferaft's session (one autogroup: the
    # syncer's low priority counts against it)
    _, env = starts(prog)[0]
    assert env["sid"] == proc.pid and env["pgid"] == env["pid"] != proc.pid, env
    assert "SIGTERM: passed on to the command" in err
    assert "final snapshot" in err and "exit 7" in err


@pytest.mark.parametrize("signame", ["SIGINT", "SIGHUP", "SIGUSR1"])
def test_other_stop_signals_are_passed_on(tmp_path: Path, local_vault: str, signame: str) -> None:
    signum = getattr(signal, signame)
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    proc = start_run(
        ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--", "python", "trainer.py"],
        work,
        _env(tmp_path, T_SIG_EXIT="0"),
    )
    wait_for(lambda: sum(p[0] == "step" for p in progress(prog)) >= 3, what="training steps")
    proc.send_signal(signum)
    rc, _out, err = finish(proc)
    assert rc == 0, err
    stops = [p for p in progress(prog) if p[0] == "stop"]
    assert stops and stops[0][1] == str(int(signum)), progress(prog)
    newest = _newest(local_vault)
    assert newest is not None and newest.tags.get("trigger") == signame
    assert _step_in(local_vault, newest.id, tmp_path) == int(stops[0][2])


def test_default_sigterm_death_gives_143_and_an_ignoring_command_is_killed_after_grace(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    # 1. a command with Python's default SIGTERM: dies of it; liferaft exits 128 + 15
    proc = start_run(["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--", "python", "trainer.py"], work, _env(tmp_path))
    wait_for(lambda: sum(p[0] == "step" for p in progress(prog)) >= 3, what="training steps")
    proc.send_signal(signal.SIGTERM)
    rc, _out, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert _newest(local_vault) is not None  # the checkpoints written before it died are kept
    # 2. a command that ignores SIGTERM: killed after the grace; 128 + 9
    prog.unlink()
    proc = start_run(
        ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--grace", "1", "--", "python", "trainer.py"],
        work,
        _env(tmp_path, T_IGNORE_TERM="1"),
    )
    wait_for(lambda: sum(p[0] == "step" for p in progress(prog)) >= 3, what="training steps")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, _out, err = finish(proc)
    elapsed = time.monotonic() - t0
    assert rc == 128 + signal.SIGKILL, err
    assert 1.0 <= elapsed < 1.0 + 5.0, elapsed
    assert "did not exit within the 1.0s grace" in err


def test_time_limit_stops_the_command_early_enough_for_the_final_snapshot(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    limit = 4.0
    t0 = time.monotonic()
    proc = start_run(
        [
            "--vault",
            local_vault,
            "run",
            "--keep",
            "ckpt",
            "--every",
            "0.5",
            "--grace",
            "1",
            "--time-limit",
            f"{limit:g}s",
            "--",
            "python",
            "trainer.py",
        ],
        work,
        _env(tmp_path, T_SIG_EXIT="0"),
    )
    rc, _out, err = finish(proc)
    elapsed = time.monotonic() - t0
    assert rc == 0, err
    assert elapsed < limit + 1.5, f"exited {elapsed:.1f}s after start, limit {limit}s"
    assert "time limit: sent SIGTERM" in err
    stops = [p for p in progress(prog) if p[0] == "stop"]
    assert stops and stops[0][1] == str(int(signal.SIGTERM))
    newest = _newest(local_vault)
    assert newest is not None
    assert _step_in(local_vault, newest.id, tmp_path) == int(stops[0][2])  # the state at the stop is kept
    if newest.tags.get("trigger") != "time-limit":
        # An interval pass that fell in the grace took the final state first (passes are
        # not held then: the earlier it is committed, the better); the final pass says so.
        assert newest.tags.get("trigger") == "interval", newest.tags
        assert f"nothing changed since snapshot {newest.short_id}" in err, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_a_killed_supervisor_does_not_leave_the_command_running(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    proc = start_run(
        ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--", "python", "trainer.py"],
        work,
        _env(tmp_path, T_SIG_EXIT="0"),
    )
    wait_for(lambda: sum(p[0] == "step" for p in progress(prog)) >= 3, what="training steps")
    proc.kill()  # only liferaft: the OOM killer's choice, say
    finish(proc)
    wait_for(lambda: any(p[0] == "stop" for p in progress(prog)), timeout=10, what="the orphaned command to get SIGTERM")
    assert next(p for p in progress(prog) if p[0] == "stop")[1] == str(int(signal.SIGTERM))


def test_ctrl_c_in_a_terminal_reaches_the_command_once_and_is_not_a_crash(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    args = ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--restarts", "2", "--", "python", "trainer.py"]
    # 1. a command that handles Ctrl-C: saves, exits 0; it got exactly one SIGINT
    term = Terminal(args, work, _env(tmp_path, T_SIG_EXIT="0"))
    wait_for(lambda: sum(p[0] == "step" for p in progress(prog)) >= 3, what="training steps")
    term.type(b"\x03")
    rc, out = term.finish()
    assert rc == 0, out
    assert [p[1] for p in progress(prog) if p[0] == "signal"] == [str(int(signal.SIGINT))], out
    assert "final snapshot" in out
    stopped_at = int(next(p for p in progress(prog) if p[0] == "stop")[2])
    assert _step_in(local_vault, _newest(local_vault).id, tmp_path) == stopped_at  # type: ignore[union-attr]
    # 2. Python's own KeyboardInterrupt: the command dies of SIGINT; stopped, not restarted
    prog.unlink()
    term = Terminal(args, work, _env(tmp_path))
    wait_for(lambda: sum(p[0] == "step" for p in progress(prog)) >= 3, what="training steps")
    term.type(b"\x03")
    rc, out = term.finish()
    assert rc == 128 + signal.SIGINT, out
    assert len(starts(prog)) == 1 and "restarting" not in out, out
    assert "KeyboardInterrupt" in out  # the command's own output went through the terminal


# ---------------------------------------------------------------- restarts


def test_restart_on_crash_with_backoff_then_success(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    env = _env(tmp_path, T_CRASH_UNTIL="2", T_TOTAL="8", T_CKPT_EVERY="1", T_STEP_S="0.01")
    proc = start_run(
        ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--restarts", "2", "--", "python", "trainer.py"], work, env
    )
    rc, _out, err = finish(proc)
    assert rc == 0, err
    assert "restarting in 1.0s (restart 1 of 2)" in err and "restarting in 2.0s (restart 2 of 2)" in err
    runs = starts(prog)
    assert [env["LIFERAFT_RESTARTS"] for _, env in runs] == ["0", "1", "2"]
    assert [step for step, _ in runs] == [0, 3, 4]  # each restart continues from the local checkpoint
    assert _step_in(local_vault, _newest(local_vault).id, tmp_path) == 8  # type: ignore[union-attr]


def test_restarts_exhausted_exit_with_the_commands_status(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    env = _env(tmp_path, T_CRASH_UNTIL="5", T_STEP_S="0.01")
    proc = start_run(
        ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--restarts", "1", "--", "python", "trainer.py"], work, env
    )
    rc, _out, err = finish(proc)
    assert rc == 1, err
    assert "giving up" in err
    assert len(starts(tmp_path / "progress.log")) == 2


# ---------------------------------------------------------------- restore before the start


def test_restore_env_and_refusing_to_overwrite_local_work(tmp_path: Path, local_vault: str) -> None:
    work = setup_work(tmp_path)
    prog = tmp_path / "progress.log"
    base = ["--vault", local_vault, "run", "--keep", "ckpt", "--every", "30", "--", "python", "trainer.py"]
    # a first run: nothing to restore
    rc, _out, err = finish(start_run(base, work, _env(tmp_path, T_TOTAL="3")))
    assert rc == 0, err
    assert "nothing to restore" in err
    assert starts(prog)[-1][1]["LIFERAFT_RESUMED"] == "0"
    snap = _newest(local_vault)
    assert snap is not None

    # a fresh machine: the kept path is missing → restored; the command learns it
    (work / "ckpt" / "state.json").unlink()
    (work / "ckpt").rmdir()
    rc, _out, err = finish(start_run(base, work, _env(tmp_path, T_TOTAL="3")))
    assert rc == 0, err
    step, env = starts(prog)[-1]
    assert step == 3 and env["LIFERAFT_RESUMED"] == "1" and env["LIFERAFT_SNAPSHOT"] == snap.id and env["LIFERAFT_RUN"] == "work"
    assert f"restored ckpt from snapshot {snap.short_id}" in err

    # newer local work: kept as it is, said so, --force offered
    state = work / "ckpt" / "state.json"
    state.write_text(json.dumps({"step": 40}))
    rc, _out, err = finish(start_run(base, work, _env(tmp_path, T_TOTAL="41")))
    assert rc == 0, err
    assert "keeping local ckpt: it has work newer than snapshot" in err and "--force" in err
    step, env = starts(prog)[-1]
    assert step == 40 and env["LIFERAFT_RESUMED"] == "0"

    # older local files that differ from the newest snapshot: refused before the command starts
    state.write_text(json.dumps({"step": 7}))
    old = time.time() - 3600
    os.utime(state, (old, old))
    n_starts = len(starts(prog))
    rc, _out, err = finish(start_run(base, work, _env(tmp_path, T_TOTAL="41")))
    assert rc == 2, err
    no_traceback(err)
    errors = [line for line in err.splitlines() if line.startswith("liferaft: error:")]
    assert len(errors) == 1 and "older than it" in errors[0] and "--force" in errors[0], err
    assert len(starts(prog)) == n_starts  # never started
    assert json.loads(state.read_text())["step"] == 7  # untouched

    # --force: the snapshot wins
    rc, _out, err = finish(start_run([*base[:3], "--force", *base[3:]], work, _env(tmp_path, T_TOTAL="41")))
    assert rc == 0, err
    step, env = starts(prog)[-1]
    assert step == 41 and env["LIFERAFT_RESUMED"] == "1"


# ---------------------------------------------------------------- bad input


def _one_error_line(err: str) -> str:
    """Exactly one error line, the last thing printed, and no traceback."""
    no_traceback(err)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("liferaft: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def test_no_command(tmp_path: Path, local_vault: str) -> None:
    r = cli("--vault", local_vault, "run", "--keep", "ckpt", cwd=tmp_path)
    assert r.returncode == 2
    assert "no command to run" in _one_error_line(r.stderr)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_the_command_starts_with_default_signal_dispositions(tmp_path: Path, local_vault: str) -> None:
    # Python ignores SIGPIPE (and liferaft SIGTTOU in a terminal): the command must not inherit that
    r = cli("--vault", local_vault, "run", "--keep", "ckpt", "--", "grep", "SigIgn", "/proc/self/status", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ignored = int(r.stdout.split()[-1], 16)
    for sig in (signal.SIGPIPE, signal.SIGTTOU, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), (sig, r.stdout)


def test_command_not_found_and_not_executable(tmp_path: Path, local_vault: str) -> None:
    # As a shell: 127 when there is nothing to run, 126 when it is there but cannot be run.
    def run(*command: str) -> tuple[int, str]:
        r = cli("--vault", local_vault, "run", "--keep", "ckpt", "--", *command, cwd=tmp_path)
        return r.returncode, _one_error_line(r.stderr)

    rc, line = run("no-such-command-liferaft")
    assert rc == 127 and "command not found: no-such-command-liferaft; check the spelling" in line, line
    (tmp_path / "train.py").write_text("print(1)\n")
    rc, line = run("./train.py")
    assert rc == 126, line
    assert (
        "cannot run ./train.py: permission denied; make it executable (chmod +x ./train.py) or run it with its interpreter (python ./train.py)"
        in line
    )
    (tmp_path / "train.sh").write_text("#!/usr/bin/env bash\necho hi\n")
    rc, line = run("./train.sh")
    assert rc == 126 and "(chmod +x ./train.sh) or run it with its interpreter (bash ./train.sh)" in line, line
    rc, line = run("train.sh")  # not on PATH: not found, with the way to run the file that is here
    assert rc == 127 and "command not found: train.sh; there is a file train.sh here" in line and "write ./train.sh" in line, line
    (tmp_path / "runs").mkdir()
    rc, line = run("./runs")
    assert rc == 126 and "cannot run ./runs: it is a folder, not a program" in line, line
    rc, line = run("runs")
    assert rc == 127 and "command not found: runs; runs here is a folder, not a command" in line, line
    assert not (tmp_path / "ckpt").exists() and not os.path.exists(local_vault)  # nothing started, no vault made


def test_a_command_the_kernel_refuses_gets_one_line_and_a_shells_status(tmp_path: Path, local_vault: str) -> None:
    # Executable files that exec still refuses: the launcher says why, with a shell's status.
    no_line = tmp_path / "no-shebang"
    no_line.write_text("echo hi\n")
    bad = tmp_path / "bad-interpreter"
    bad.write_text("#!/no/such/interpreter\necho hi\n")
    for f in (no_line, bad):
        f.chmod(0o755)
    r = cli("--vault", local_vault, "run", "--keep", "ckpt", "--", "./no-shebang", cwd=tmp_path)
    no_traceback(r.stderr)
    assert r.returncode == 126, r.stderr
    assert "liferaft: cannot run ./no-shebang: it is not a program and has no #! line; run it with its interpreter" in r.stderr
    r = cli("--vault", local_vault, "run", "--keep", "ckpt", "--", "./bad-interpreter", cwd=tmp_path)
    no_traceback(r.stderr)
    assert r.returncode == 127, r.stderr
    assert "liferaft: cannot run ./bad-interpreter: the interpreter on its #! line is not found" in r.stderr


def test_a_refused_exec_in_popen_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # Where the command is exec'd by Popen itself (not Linux), its OSError becomes the same line.
    import errno

    from liferaft.keep.supervisor import CommandNotFound, _not_runnable

    script = tmp_path / "train.sh"
    script.write_text("#!/bin/bash\n")
    err = _not_runnable(str(script), PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    assert err.exit_code == 126
    assert (
        str(err)
        == f"cannot run {script}: permission denied; make it executable (chmod +x {script}) or run it with its interpreter (bash {script})"
    )
    err = _not_runnable(str(tmp_path), PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    assert err.exit_code == 126 and "it is a folder" in str(err)
    err = _not_runnable("no-such-thing", FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))
    assert type(err) is CommandNotFound and err.exit_code == 127 and "command not found: no-such-thing" in str(err)


def test_bad_durations_and_keeps(tmp_path: Path, local_vault: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = cli("--vault", local_vault, "run", "--keep", "ckpt", "--every", "5x", "--", "true", cwd=work)
    assert r.returncode == 2 and "--every '5x' is not a duration" in _one_error_line(r.stderr)
    r = cli("--vault", local_vault, "run", "--keep", "..", "--", "true", cwd=work)
    assert r.returncode == 2 and "holds the working folder" in _one_error_line(r.stderr)
    r = cli("--vault", local_vault, "run", "--", "true", cwd=work)
    assert r.returncode == 2 and "nothing to keep" in _one_error_line(r.stderr)
    r = cli("--vault", local_vault, "run", "--keep", "a", "--keep", "a/b", "--", "true", cwd=work)
    assert r.returncode == 2 and "--keep a/b is inside --keep a" in _one_error_line(r.stderr)
    r = cli("--vault", local_vault, "run", "--keep", "a", "--time-limit", "1s", "--", "true", cwd=work)
    assert r.returncode == 2 and "no time to run" in _one_error_line(r.stderr)
    r = cli("--vault", str(work / "data" / "vault"), "run", "--keep", "data", "--", "true", cwd=work)
    assert r.returncode == 2 and "overlap" in _one_error_line(r.stderr)
    # paths from liferaft.toml are named as such, with the file's own syntax (no --keep was given)
    (work / "liferaft.toml").write_text('keep = ["a", "a/b"]\n')
    r = cli("--vault", local_vault, "run", "--", "true", cwd=work)
    line = _one_error_line(r.stderr)
    assert r.returncode == 2 and "liferaft.toml: kept path 'a/b' is inside kept path 'a'" in line
    assert "--keep" not in line
    (work / "liferaft.toml").write_text('keep = [".."]\n')
    r = cli("--vault", local_vault, "run", "--", "true", cwd=work)
    line = _one_error_line(r.stderr)
    assert r.returncode == 2 and "liferaft.toml: kept path '..' holds the working folder" in line
    assert 'e.g. keep = ["checkpoints"]' in line and "--keep" not in line


def test_time_limit_zero_is_refused_not_taken_for_no_cap(tmp_path: Path, local_vault: str) -> None:
    for zero in ("0", "0s", "0h0m"):
        r = cli("--vault", local_vault, "run", "--keep", "a", "--time-limit", zero, "--", "true", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        line = _one_error_line(r.stderr)
        assert f"--time-limit {zero} must be more than 0" in line and "--time-limit off for no cap" in line, line
    r = cli("--vault", local_vault, "run", "--keep", "a", "--time-limit", "off", "--", "true", cwd=tmp_path)
    assert r.returncode == 0 and "no time cap (--time-limit off)" in r.stderr, r.stderr


def test_kept_path_outside_the_working_folder_is_not_restored_over_something_else(tmp_path: Path, local_vault: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "shared" / "out"
    outside.mkdir(parents=True)
    (outside / "data.txt").write_text("the run's data")
    marker = "import pathlib; pathlib.Path('started').write_text('x')"
    r = cli("--vault", local_vault, "run", "--keep", "../shared/out", "--", "python", "-c", marker, cwd=work)
    assert r.returncode == 0, r.stderr
    assert _newest(local_vault) is not None
    (work / "started").unlink()
    # something else now lives there, older than the snapshot
    (outside / "data.txt").write_text("someone else's file")
    old = time.time() - 3600
    os.utime(outside / "data.txt", (old, old))
    r = cli("--vault", local_vault, "run", "--keep", "../shared/out", "--", "python", "-c", marker, cwd=work)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "../shared/out (outside the working folder) holds files that differ" in line
    assert not (work / "started").exists()
    assert (outside / "data.txt").read_text() == "someone else's file"


def test_unreachable_vault_fails_before_the_command_starts_unless_offline_ok(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    vault = str(tmp_path / "a-file" / "vault")  # cannot be reached: its parent is a file
    marker = "import pathlib; pathlib.Path('started').write_text('x')"
    r = cli("--vault", vault, "run", "--keep", "ckpt", "--", "python", "-c", marker, cwd=work)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "the command was not started" in line and "--offline-ok" in line
    assert not (work / "started").exists()
    r = cli("--vault", vault, "run", "--keep", "started", "--offline-ok", "--", "python", "-c", marker, cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "started").exists()
    assert "running without it (--offline-ok)" in r.stderr and "the final snapshot failed" in r.stderr
    no_traceback(r.stderr)


def _read_only_mount(folder: Path) -> list[str]:
    """An argv prefix that runs a command with ``folder`` bind-mounted read-only over itself.

    A real read-only file system (EROFS), as root too (where chmod stops nothing), in a
    private mount namespace of that command alone: nothing is left mounted afterwards. As
    root ``unshare -m``; otherwise ``unshare -rm`` (an unprivileged user namespace).
    """
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if not sys.platform.startswith("linux") or unshare is None or mount is None:
        pytest.skip("a read-only bind mount needs Linux with unshare and mount (util-linux)")
    flags = "-m" if os.geteuid() == 0 else "-rm"
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    prefix = [unshare, flags, "--propagation", "private", "sh", "-c", script, "sh", str(folder)]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", f"open({str(folder / 'probe')!r}, 'w')"], capture_output=True, text=True, timeout=60
    )
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here (needs root or user namespaces): {probe.stderr.strip()[-200:]}")
    return prefix


def test_read_only_vault_fails_before_the_command_starts_unless_offline_ok(tmp_path: Path, local_vault: str) -> None:
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "state.json").write_text('{"step": 3}')
    liferaft.Vault(local_vault).snapshot([work / "ckpt"], run="work")
    shutil.rmtree(work / "ckpt")  # a fresh machine: the vault has the state
    read_only = _read_only_mount(Path(local_vault))
    marker = "import pathlib; pathlib.Path('started').write_text(pathlib.Path('ckpt/state.json').read_text())"
    base = [*read_only, sys.executable, "-m", "liferaft", "--vault", local_vault, "run", "--run", "work", "--keep", "ckpt"]
    r = subprocess.run([*base, "--", "python", "-c", marker], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert f"the vault at {local_vault} can be read but not written (Read-only file system)" in line, line
    assert "the command was not started" in line and "read-write mount" in line and "--offline-ok" in line, line
    assert not (work / "started").exists() and not (work / "ckpt").exists()
    # --offline-ok: warned, restored (it can be read), started; the command's status is kept
    # though its final snapshot (ckpt changed) cannot be written
    change = marker + "; pathlib.Path('ckpt/state.json').write_text('{\"step\": 4}')"
    r = subprocess.run([*base, "--offline-ok", "--", "python", "-c", change], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    no_traceback(r.stderr)
    assert "can be read but not written (Read-only file system); running without saving (--offline-ok)" in r.stderr, r.stderr
    assert (work / "started").read_text() == '{"step": 3}'  # restored before the start
    assert "the final snapshot failed" in r.stderr, r.stderr
    assert [s.step for s in liferaft.Vault(local_vault).snapshots(run="work")] == [None]  # nothing written


def test_vault_that_refuses_writes_fails_before_the_command_starts(tmp_path: Path, local_vault: str) -> None:
    # Portable (any OS, as root too): the vault's locks/ is a file, so a snapshot's first
    # write fails with a real OSError although every read works.
    work = tmp_path / "work"
    work.mkdir()
    marker = "import pathlib; pathlib.Path('started').write_text('x')"
    r = cli("--vault", local_vault, "run", "--keep", "started", "--", "python", "-c", marker, cwd=work)
    assert r.returncode == 0, r.stderr
    assert os.listdir(Path(local_vault) / "locks") == []  # the start's probe lock is gone
    (work / "started").unlink()
    (Path(local_vault) / "locks").rmdir()
    (Path(local_vault) / "locks").write_text("not a folder")
    before = sorted(p.relative_to(local_vault).as_posix() for p in Path(local_vault).rglob("*"))
    r = cli("--vault", local_vault, "run", "--keep", "started", "--", "python", "-c", marker, cwd=work)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "can be read but not written" in line and "the command was not started" in line and "--offline-ok" in line, line
    assert not (work / "started").exists()
    assert sorted(p.relative_to(local_vault).as_posix() for p in Path(local_vault).rglob("*")) == before


@pytest.mark.skipif(os.path.exists("/content/drive"), reason="a real Drive mount point exists here")
def test_unmounted_drive_vault_is_refused(tmp_path: Path) -> None:
    r = cli("--vault", "/content/drive/MyDrive/liferaft-test", "run", "--keep", "ckpt", "--", "true", cwd=tmp_path)
    assert r.returncode == 2
    assert "Google Drive is not mounted" in _one_error_line(r.stderr)
    assert not os.path.exists("/content/drive")  # nothing was created under the mount point


# ---------------------------------------------------------------- a vault on a bucket (moto: real S3 protocol on loopback)


_NO_MOTO = pytest.mark.skipif(
    importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None, reason="needs moto and s3fs"
)


@_NO_MOTO
def test_run_with_the_vault_on_a_bucket_resumes_on_a_fresh_machine(
    tmp_path: Path, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SkyPilot flow: preempted (SIGTERM), the machine is gone, the same command elsewhere resumes."""
    moto_server.apply(monkeypatch)
    url = moto_server.vault_url()
    prog = tmp_path / "progress.log"
    first = setup_work(tmp_path / "machine-1")
    args = ["--vault", url, "run", "--run", "sky", "--keep", "ckpt", "--every", "0.5", "--", "python", "trainer.py"]
    proc = start_run(args, first, _env(tmp_path, T_SIG_EXIT="0"))
    wait_for(lambda: sum(p[0] == "step" for p in progress(prog)) >= 10, what="training steps")
    proc.send_signal(signal.SIGTERM)
    rc, _out, err = finish(proc)
    assert rc == 0, err
    stopped_at = int(next(p for p in progress(prog) if p[0] == "stop")[2])
    second = setup_work(tmp_path / "machine-2")
    rc, _out, err = finish(start_run(args, second, _env(tmp_path, T_TOTAL=str(stopped_at + 2))))
    assert rc == 0, err
    step, env = starts(prog)[-1]
    assert step == stopped_at and env["LIFERAFT_RESUMED"] == "1", err
    assert moto_server.env()["AWS_SECRET_ACCESS_KEY"] not in err


@_NO_MOTO
def test_unreachable_bucket_fails_before_the_command_starts(tmp_path: Path, moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from servers import free_port

    moto_server.apply(monkeypatch, endpoint=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("LIFERAFT_RETRY_DEADLINE", "2")
    marker = "import pathlib; pathlib.Path('started').write_text('x')"
    r = cli("--vault", "s3://liferaft-tests/v", "run", "--keep", "ckpt", "--", "python", "-c", marker, cwd=tmp_path)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "the command was not started" in line and "--offline-ok" in line
    assert not (tmp_path / "started").exists()


def test_a_checkpointer_under_liferaft_run_joins_its_run(tmp_path: Path, local_vault: str) -> None:
    # The command sees LIFERAFT_RUN: a Checkpointer (and a snapshot) there names no run
    # and lands in the supervisor's run, not in one named after the working folder.
    work = tmp_path / "work"
    work.mkdir()
    script = (
        "import liferaft\n"
        "ck = liferaft.Checkpointer('checkpoints')\n"
        "ck.save(5, {'step': 5})\n"
        "ck.close()\n"
        "liferaft.Vault().snapshot(['notes.txt'])\n"
    )
    (work / "notes.txt").write_text("n")
    r = cli("--vault", local_vault, "run", "--run", "mnist", "--keep", "checkpoints", "--", sys.executable, "-c", script, cwd=work)
    assert r.returncode == 0, r.stderr
    snaps = liferaft.Vault(local_vault).snapshots()
    assert {s.run for s in snaps} == {"mnist"}, [(s.run, s.tags) for s in snaps]
    assert [s.step for s in snaps if s.tags.get("liferaft.kind") == "checkpoint"] == [5]
    assert any(s.roots and s.roots[0]["name"] == "notes.txt" for s in snaps)


def test_the_default_vault_on_a_runtime_that_vanishes_is_warned_about(tmp_path: Path) -> None:
    # On Colab or Kaggle the embedded default vault sits on the runtime's own disk: a run
    # "kept" there is lost by the very reset it is meant to survive. Colab's own modules
    # do not exist here: the platform is told by the variable Colab sets (a fake, said so).
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    env = {"COLAB_RELEASE_TAG": "release-colab_20261101-060135_RC00", "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    env = {**{k: v for k, v in os.environ.items() if k not in ("LIFERAFT_VAULT", "XDG_DATA_HOME")}, **env}
    warning = f"the vault is the default folder {home / 'data' / 'liferaft' / 'vault'}, on Google Colab's own disk, which is lost"
    fix = "a mounted Google Drive folder such as /content/drive/MyDrive/liferaft, or a gs:// or s3:// bucket"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    r = run("-m", "liferaft", "run", "--time-limit", "off", "--keep", "ck", "--", "true")
    assert r.returncode == 0 and f"liferaft: warning: {warning}" in r.stderr and fix in r.stderr, r.stderr
    r = run("-c", "import liferaft; liferaft.Checkpointer('ck', run='c')")
    assert r.returncode == 0 and f"CheckpointWarning: liferaft: {warning}" in r.stderr, r.stderr
    r = run("-c", "import liferaft; liferaft.attach('ck', run='a', quiet=True).close()")
    assert r.returncode == 0 and f"liferaft: warning: {warning}" in r.stderr, r.stderr
    # a vault of one's own: no warning
    r = run("-m", "liferaft", "--vault", str(tmp_path / "v"), "run", "--time-limit", "off", "--keep", "ck", "--", "true")
    assert r.returncode == 0 and "own disk" not in r.stderr, r.stderr


# ---------------------------------------------------------------- Ctrl-C


def _s3_ls(fs: Any, folder: str) -> list[str]:
    try:
        return [p for p in fs.ls(folder, refresh=True) if not p.endswith("/")]
    except FileNotFoundError:
        return []


@_NO_MOTO
def test_ctrl_c_during_the_final_snapshot_says_what_it_does_and_a_third_abandons_it_cleanly(
    tmp_path: Path, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C stops the command; one more says the final snapshot is being taken; a third
    gives it up: no session lock left, nothing committed, the uploads stopped at once."""
    from servers import Fault, FaultProxy

    moto_server.apply(monkeypatch)
    url = moto_server.vault_url()
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "stderr.log"
    # 6 MiB of checkpoint through a slow uplink (50 ms per 64 KiB): its upload lasts ~5 s
    script = CHECKPOINT_6MIB_THEN_WAIT
    raw = moto_server.raw_fs()
    prefix = url.removeprefix("s3://")
    with FaultProxy(moto_server.port, lambda _i: Fault("slow", 0, 0.05), lifetime=120) as proxy, open(log, "w") as err_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "liferaft",
                "--vault",
                url,
                "run",
                "--keep",
                "ckpt",
                "--every",
                "1h",
                "--",
                sys.executable,
                "-c",
                script,
            ],
            cwd=work,
            env={**os.environ, **moto_server.env(proxy.endpoint)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,
        )
        STARTED.append(proc)
        wait_for(lambda: (work / "ready").exists(), timeout=30, what="the command's checkpoint")
        proc.send_signal(signal.SIGINT)  # 1: passed on; the command stops, the final snapshot starts
        wait_for(lambda: _s3_ls(raw, f"{prefix}/locks"), timeout=15, what="the final snapshot's session lock")
        proc.send_signal(signal.SIGINT)  # 2: only says what is going on
        wait_for(lambda: "Ctrl-C again to abandon it" in log.read_text(), timeout=5, what="the line about the final snapshot")
        assert proc.poll() is None, log.read_text()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)  # 3: abandon it
        rc = proc.wait(timeout=15)
        took = time.monotonic() - t0
    err = log.read_text()
    no_traceback(err)
    assert rc == 128 + signal.SIGINT, err
    assert "taking the final snapshot (" in err and "the vault holds no snapshot of ckpt from this run yet" in err, err
    assert "abandoned the final snapshot after" in err and "what it had uploaded is removed by liferaft prune" in err, err
    assert "could not be removed" not in err, err
    assert took < 3.0, f"exit took {took:.1f}s after the third Ctrl-C: the upload was waited for\n{err}"
    time.sleep(0.5)
    assert _s3_ls(raw, f"{prefix}/locks") == [], "the session lock was left behind"
    assert _s3_ls(raw, f"{prefix}/snapshots") == [], "an abandoned snapshot was committed"


def test_ctrl_c_before_the_command_starts_says_what_was_and_was_not_done(tmp_path: Path) -> None:
    # A store that accepts connections and never answers (a frozen server): liferaft waits
    # to reach the vault, and the user gives up with Ctrl-C.
    import socket

    pytest.importorskip("s3fs")
    work = tmp_path / "work"
    work.mkdir()
    env = {
        "AWS_ENDPOINT_URL": "",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(30)
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{server.getsockname()[1]}"
        marker = "import pathlib; pathlib.Path('started').write_text('x')"
        proc = start_run(["--vault", "s3://bucket/v", "run", "--keep", "ckpt", "--", sys.executable, "-c", marker], work, env)
        conn, _ = server.accept()  # liferaft is reaching the vault now
        with conn:
            proc.send_signal(signal.SIGINT)
            rc, _out, err = finish(proc, timeout=30)
    assert rc == 128 + signal.SIGINT, err
    line = _one_error_line(err)
    assert "interrupted while reaching the vault at s3://bucket/v: the command was not started; nothing restored; nothing saved" in line
    assert not (work / "started").exists()


@pytest.mark.parametrize("how", ["--vault", "LIFERAFT_VAULT"])
def test_a_relative_vault_reaches_the_command_as_an_absolute_path(tmp_path: Path, how: str) -> None:
    # The command changes folder and opens "the" vault (LIFERAFT_VAULT): it must be the run's.
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "notes.txt").write_text("n")
    script = (
        "import os, liferaft\nos.chdir('sub')\nprint(os.environ['LIFERAFT_VAULT'])\nliferaft.Vault().snapshot(['notes.txt'], run='side')\n"
    )
    args = ["--vault", "vault"] if how == "--vault" else []
    env = {} if how == "--vault" else {"LIFERAFT_VAULT": "vault"}
    r = cli(*args, "run", "--keep", "ckpt", "--", sys.executable, "-c", script, cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(work / "vault"), r.stdout
    assert not (work / "sub" / "vault").exists(), "the command wrote to a second vault"
    assert [s.run for s in liferaft.Vault(str(work / "vault")).snapshots()] == ["side"]


def test_keep_in_liferaft_toml_means_the_same_paths_from_a_subfolder(tmp_path: Path) -> None:
    # liferaft.toml is found in a parent folder; its paths are the file's, as its vault's are.
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    (proj / "liferaft.toml").write_text('vault = "vault"\nrun = "m"\nkeep = ["ckpt"]\n')
    write = "import pathlib; p = pathlib.Path('../ckpt'); p.mkdir(exist_ok=True); (p / 'state').write_text('7')"
    r = cli("run", "--", sys.executable, "-c", write, cwd=proj / "scripts")
    assert r.returncode == 0, r.stderr
    assert "keeping ../ckpt" in r.stderr, r.stderr
    assert not (proj / "scripts" / "ckpt").exists()
    snaps = liferaft.Vault(str(proj / "vault")).snapshots(run="m")
    assert snaps and [r["source"] for r in snaps[-1].roots] == [str(proj / "ckpt")], snaps
    # from the project folder itself: the same path, restored there
    shutil.rmtree(proj / "ckpt")
    r = cli("run", "--", "true", cwd=proj)
    assert r.returncode == 0, r.stderr
    assert "keeping ckpt" in r.stderr and (proj / "ckpt" / "state").read_text() == "7", r.stderr


def test_a_kept_path_equal_to_the_snapshot_is_reported_in_good_english(tmp_path: Path, local_vault: str) -> None:
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "state").write_text("1")
    assert cli("--vault", local_vault, "run", "--keep", "ckpt", "--", "true", cwd=work).returncode == 0
    r = cli("--vault", local_vault, "run", "--keep", "ckpt", "--", "true", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "liferaft: ckpt already matches snapshot " in r.stderr, r.stderr


def test_credential_files_are_left_out_with_a_note_unless_include_secrets(tmp_path: Path, local_vault: str) -> None:
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "state").write_text("1")
    (work / "ckpt" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    r = cli("--vault", local_vault, "run", "--run", "a", "--keep", "ckpt", "--", "true", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "credential file left out of the snapshots (ckpt/kaggle.json); pass --include-secrets" in r.stderr, r.stderr
    vault = liferaft.Vault(local_vault)
    vault.restore(vault.snapshots(run="a")[-1].id, to=tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir()) == ["state"]
    r = cli("--vault", local_vault, "run", "--run", "b", "--keep", "ckpt", "--include-secrets", "--", "true", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "left out of the snapshots" not in r.stderr, r.stderr
    vault.restore(vault.snapshots(run="b")[-1].id, to=tmp_path / "b")
    assert (tmp_path / "b" / "ckpt" / "kaggle.json").read_text() == '{"username": "u", "key": "k"}'


def test_the_first_snapshot_reported_is_the_first_that_holds_files(tmp_path: Path, local_vault: str) -> None:
    # The syncer's first passes find the kept folder empty (the command has not saved yet):
    # "committed: 0 files" read as if nothing were being kept.
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    script = "import pathlib, time\ntime.sleep(1.5)\npathlib.Path('ckpt/state').write_text('1')\ntime.sleep(1.5)\n"
    r = cli("--vault", local_vault, "run", "--keep", "ckpt", "--every", "0.2", "--", sys.executable, "-c", script, cwd=work)
    assert r.returncode == 0, r.stderr
    committed = [ln for ln in r.stderr.splitlines() if " committed: " in ln]
    assert len(committed) == 1 and "committed: 1 file," in committed[0], r.stderr
