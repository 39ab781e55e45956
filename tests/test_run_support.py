"""Helpers for the ``liferaft run`` / ``attach`` tests: a real training script and process control.

No tests here; the trainer is a real subprocess, killed and signalled for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

# A stand-in for training. Knobs come from the environment:
#   T_PROGRESS   file (outside the work folder) where it logs "start", "step", "stop" lines
#   T_STEP_S     seconds per step; T_CKPT_EVERY its own checkpoint period (steps)
#   T_TOTAL      steps to run (0: until stopped)
#   T_SIG_EXIT   if set: on SIGTERM/SIGINT/SIGHUP/SIGUSR1 save, log and exit with this code
#   T_IGNORE_TERM  if set: ignore SIGTERM
#   T_CRASH_UNTIL  exit 1 at step 3 while LIFERAFT_RESTARTS is below this
TRAINER = r"""
import json, os, signal, sys, time
P = os.environ["T_PROGRESS"]
STEP_S = float(os.environ.get("T_STEP_S", "0.02"))
CKPT_EVERY = int(os.environ.get("T_CKPT_EVERY", "5"))
TOTAL = int(os.environ.get("T_TOTAL", "0"))
SIG_EXIT = os.environ.get("T_SIG_EXIT")
CRASH_UNTIL = int(os.environ.get("T_CRASH_UNTIL", "-1"))
RESTARTS = int(os.environ.get("LIFERAFT_RESTARTS", "0"))

def log(line):
    with open(P, "a") as f:
        f.write(line + "\n")

def save(step):
    with open("ckpt/state.json.tmp", "w") as f:
        json.dump({"step": step}, f)
    os.replace("ckpt/state.json.tmp", "ckpt/state.json")

os.makedirs("ckpt", exist_ok=True)
step = 0
if os.path.exists("ckpt/state.json"):
    with open("ckpt/state.json") as f:
        step = json.load(f)["step"]
env = {k: os.environ.get(k, "-") for k in ("LIFERAFT_RESUMED", "LIFERAFT_SNAPSHOT", "LIFERAFT_RUN", "LIFERAFT_RESTARTS")}
env.update(sid=os.getsid(0), pgid=os.getpgrp(), pid=os.getpid(), sigpipe=str(signal.getsignal(signal.SIGPIPE)))
log(f"start {step} " + json.dumps(env))
stop = []
def on_signal(n, f):
    stop.append(n)
    log(f"signal {n}")
if SIG_EXIT is not None:
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, on_signal)
if os.environ.get("T_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while not stop and (TOTAL == 0 or step < TOTAL):
    step += 1
    time.sleep(STEP_S)
    if step % CKPT_EVERY == 0:
        save(step)
    log(f"step {step} {time.time():.3f}")
    if RESTARTS < CRASH_UNTIL and step >= 3:
        log("crash")
        sys.exit(1)
save(step)
log(f"stop {stop[0] if stop else 0} {step}")
sys.exit(int(SIG_EXIT) if stop else 0)
"""


STARTED: list[subprocess.Popen[Any]] = []

#: A command for `liferaft run --keep ckpt`: writes a 6 MiB checkpoint, then the file
#: ``ready``, then waits; its own Ctrl-C ends it at once (exit 130).
CHECKPOINT_6MIB_THEN_WAIT = (
    "import os, signal, time\nsignal.signal(signal.SIGINT, lambda *_: os._exit(130))\nos.makedirs('ckpt', exist_ok=True)\n"
    "open('ckpt/big.bin', 'wb').write(os.urandom(6 << 20))\nopen('ready', 'w').close()\ntime.sleep(60)\n"
)


def setup_work(root: Path, name: str = "work") -> Path:
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "trainer.py").write_text(TRAINER)
    return work


def progress(path: Path) -> list[list[str]]:
    try:
        return [line.split(" ", 2) for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def last_step(path: Path) -> int:
    steps = [int(p[1]) for p in progress(path) if p[0] == "step"]
    return steps[-1] if steps else 0


def starts(path: Path) -> list[tuple[int, dict[str, str]]]:
    return [(int(p[1]), json.loads(p[2])) for p in progress(path) if p[0] == "start"]


def step_times(path: Path) -> dict[int, float]:
    """Step → wall time it was logged (the last time, if a step was run again after a restore)."""
    return {int(p[1]): float(p[2]) for p in progress(path) if p[0] == "step"}


def start_run(
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    *,
    capture: bool = True,
) -> subprocess.Popen[str]:
    """``liferaft run ...`` in its own session (a machine of its own), output captured."""
    full = dict(os.environ)
    full.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "liferaft", *args],
        cwd=cwd,
        env=full,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        text=True,
        start_new_session=True,
    )
    STARTED.append(proc)
    return proc


def kill_leftovers() -> None:
    """After a failed test: no supervised trainer may keep running on the shared machine."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_machine(proc)


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition", interval: float = 0.02) -> object:
    """Poll until ``cond()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_machine(proc: subprocess.Popen[str]) -> None:
    """The machine vanishes: SIGKILL to the supervisor's group and every descendant's group."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    groups = {proc.pid}
    for p in family:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=10)
    _gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"processes survived SIGKILL: {alive}"
    proc.communicate(timeout=10)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_machine(proc)
        raise
    return proc.returncode, out, err


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def newest_snapshot_step(vault: str, run: str, scratch: Path) -> tuple[str | None, int]:
    """(id, step in its ckpt/state.json) of the run's newest committed snapshot; (None, 0) if none."""
    import liferaft
    from liferaft.errors import NotAVault, VaultNotFound

    try:
        snaps = liferaft.Vault(vault).snapshots(run=run)
    except (VaultNotFound, NotAVault):
        return None, 0
    if not snaps:
        return None, 0
    out = scratch / f"check-{snaps[-1].id[:12]}"
    liferaft.Vault(vault).restore(snaps[-1].id, to=out)
    state = out / "ckpt" / "state.json"
    return snaps[-1].id, json.loads(state.read_text())["step"] if state.exists() else 0


def kill_campaign(
    root: Path,
    vault: str,
    *,
    rounds: int,
    rng: object,
    every: float = 0.5,
    step_s: float = 0.04,
    ckpt_every: int = 10,
    slack: float = 2.0,
    max_wait: float = 4.0,
    report: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Kill a supervised training at random moments, wipe its folder, run it again.

    Each new round must start from the step held by the newest snapshot committed before
    the kill, and the work lost (time from reaching that state to the kill) must be at
    most one interval plus the script's checkpoint period, plus ``slack`` for the time a
    pass takes on a loaded machine.
    """
    import shutil

    prog = root / "progress.log"
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {"T_PROGRESS": str(prog), "T_STEP_S": str(step_s), "T_CKPT_EVERY": str(ckpt_every)}
    bound = every + ckpt_every * step_s + slack
    expected, expected_id = 0, None
    results = []
    for i in range(rounds):
        work = setup_work(root)
        proc = start_run(
            ["--vault", vault, "run", "--run", "kill", "--keep", "ckpt", "--every", f"{every:g}", "--", "python", "trainer.py"], work, env
        )
        try:
            wait_for(lambda i=i: len(starts(prog)) > i, timeout=30, what=f"round {i}'s start")
        except AssertionError:
            kill_machine(proc)
            raise
        start_step, start_env = starts(prog)[-1]
        t_start = time.time()
        try:
            assert start_step == expected, f"round {i}: resumed from step {start_step}, the newest snapshot holds {expected}"
            assert start_env["LIFERAFT_RESUMED"] == ("1" if expected_id else "0"), start_env
            assert start_env["LIFERAFT_SNAPSHOT"] == (expected_id or ""), start_env
            time.sleep(rng.uniform(0.2, max_wait))  # type: ignore[attr-defined]
        finally:
            t_kill = time.time()
            kill_machine(proc)
        reached = last_step(prog)
        sid, held = newest_snapshot_step(vault, "kill", scratch)
        times = step_times(prog)
        since = times[held] if held > start_step else t_start
        lost = t_kill - since
        result = {"round": i, "started": start_step, "reached": reached, "held": held, "lost_s": lost}
        results.append(result)
        if report is not None:
            report(f"round {i}: started at {start_step}, killed at step {reached}, newest snapshot holds {held}, lost {lost:.2f}s")
        assert held <= reached, result
        assert lost <= bound, f"round {i}: lost {lost:.2f}s of work, more than {bound:.2f}s: {result}"
        shutil.rmtree(work)  # the machine is gone, and its disk with it
        expected, expected_id = held, sid
    return results


class Terminal:
    """``liferaft ...`` with a pseudo-terminal as its controlling terminal, as in an interactive shell."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        import threading

        full = dict(os.environ)
        full.update(env)
        master, slave = os.openpty()
        # a session leader that opens the terminal gets it as its controlling terminal
        wrapper = "import os, sys; os.setsid(); os.close(os.open(os.ttyname(0), os.O_RDWR)); os.execvp(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, sys.executable, "-m", "liferaft", *args],
            cwd=cwd,
            env=full,
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        STARTED.append(self.proc)
        os.close(slave)
        self.master = master
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            self.output += data

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_machine(self.proc)  # type: ignore[arg-type]
            raise
        self._reader.join(timeout=5)
        os.close(self.master)
        return rc, self.output.decode(errors="replace")
