"""``liferaft demo``: a training run survives a machine reset, in well under a minute.

A tiny pure-Python training runs under ``liferaft run``; the "machine" is then reset
(every process killed with SIGKILL, the work folder deleted); the same command on a
fresh folder restores the newest snapshot and the training resumes where it was.
Everything goes to the default vault (or ``--vault``) under the run ``liferaft-demo``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import LiferaftError

RUN = "liferaft-demo"
STEPS = 400
STEP_SECONDS = 0.02
CKPT_EVERY = 20  # the script's own checkpoint period, in steps
SYNC_EVERY = 1.0  # liferaft run --every

FROZEN_SEED, FROZEN_SIZE = 1, 256 << 10  # the script's frozen weights: the same bytes in every demo

TRAIN_PY = f'''"""A tiny training: linear regression by SGD, pure Python. Checkpoints every {CKPT_EVERY} steps."""
import json, os, random, time

STEPS, CKPT = {STEPS}, "checkpoints/model.json"
os.makedirs("checkpoints", exist_ok=True)
if not os.path.exists("checkpoints/embeddings.bin"):  # frozen weights: written once, uploaded once
    with open("checkpoints/embeddings.bin", "wb") as f:
        f.write(random.Random({FROZEN_SEED}).randbytes({FROZEN_SIZE}))
truth = [random.Random(0).uniform(-2, 2) for _ in range(8)]
w, step = [0.0] * 8, 0
if os.path.exists(CKPT):
    with open(CKPT) as f:
        state = json.load(f)
    w, step = state["w"], state["step"]
    print(f"resumed from step {{step}}", flush=True)
else:
    print("starting from scratch", flush=True)
while step < STEPS:
    rng = random.Random(step)
    x = [rng.gauss(0, 1) for _ in range(8)]
    err = sum(a * b for a, b in zip(w, x)) - sum(a * b for a, b in zip(truth, x))
    w = [wi - 0.02 * err * xi for wi, xi in zip(w, x)]
    step += 1
    print(f"step {{step}} loss {{err * err:.4f}}", flush=True)
    time.sleep({STEP_SECONDS})
    if step % {CKPT_EVERY} == 0 or step == STEPS:  # temp file + rename: never half-written
        with open(CKPT + ".tmp", "w") as f:
            json.dump({{"step": step, "w": w}}, f)
        os.replace(CKPT + ".tmp", CKPT)
print("training done", flush=True)
'''


class _Machine:
    """One ``liferaft run`` in its own session, its output collected line by line."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.last_step = 0
        self.resumed_from: int | None = None
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = re.match(r"step (\d+) ", line)
            if m:
                self.last_step = int(m.group(1))
            m = re.match(r"resumed from step (\d+)", line)
            if m:
                self.resumed_from = int(m.group(1))
            elif line.startswith("starting from scratch"):
                self.resumed_from = 0

    def reset(self) -> None:
        """The machine vanishes: SIGKILL to every process, supervisor and training alike."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                os.killpg(os.getpgid(p.pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=5)
        self._reader.join(timeout=5)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.reset()
            raise LiferaftError("the demo's second run did not finish in time", "run it again; if it persists, report it") from None
        self._reader.join(timeout=5)
        return rc


def _frozen_blob() -> bytes:
    """The id of the frozen file's one blob (a file under 1 MiB is one blob: its hash)."""
    from .vault import format as fmt

    return bytes.fromhex(fmt.hexdigest(random.Random(FROZEN_SEED).randbytes(FROZEN_SIZE)))


def run_demo(vault_url: str | None = None, say: Callable[[str], None] = print, *, seed: int | None = None) -> None:
    """Run the demo and tell its story through ``say``.

    >>> from liferaft.demo import run_demo
    >>> run_demo()     # doctest: +SKIP
    """
    from .api import Vault
    from .keep.units import format_duration, format_size

    vault = Vault(vault_url)
    if vault.url.startswith("memory://"):
        raise LiferaftError(
            "the demo needs a vault that other processes can reach, not memory://", "give a folder: liferaft --vault /tmp/v demo"
        )
    repo = vault.repository(create=True)
    # An earlier demo's frozen file stays in the vault (forgotten, not pruned): then it is
    # not uploaded again, and the story must not say it was.
    frozen_known = _frozen_blob() in repo.index()
    old = vault.snapshots(run=RUN)
    if old:
        vault.forget_ids([s.id for s in old])  # each demo starts from scratch
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="liferaft-demo-"))
    work = base / "work"
    argv = [
        *(sys.executable, "-m", "liferaft", "--vault", vault.url, "run"),
        *("--run", RUN, "--keep", "checkpoints", "--every", f"{SYNC_EVERY:g}", "--grace", "5", "--time-limit", "off"),
        *("--", sys.executable, "train.py"),
    ]
    shown = f"liferaft run --keep checkpoints --every {SYNC_EVERY:g} -- python train.py"
    t_demo = time.monotonic()
    try:
        say(f"vault: {vault.url} ({vault.choice.source}); run {RUN!r}")
        say(f"a tiny training ({STEPS} steps, its own checkpoint every {CKPT_EVERY} steps) under:  {shown}")
        work.mkdir()
        (work / "train.py").write_text(TRAIN_PY)

        # 1. the first machine trains until a random moment
        kill_at = rng.randint(STEPS * 45 // 100, STEPS * 65 // 100)
        first = _Machine(argv, work)
        deadline = time.monotonic() + 40
        while first.last_step < kill_at and first.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        committed = len(vault.snapshots(run=RUN))
        t_kill = time.monotonic()
        first.reset()
        before = first.last_step
        if first.proc.returncode not in (-signal.SIGKILL, 128 + signal.SIGKILL) or before == 0:
            tail = "\n".join(first.lines[-5:])
            raise LiferaftError(f"the demo's first run stopped on its own (status {first.proc.returncode}):\n{tail}", "report this")
        say(f"1. machine 1 trained to step {before} in {format_duration(t_kill - t_demo)}; {committed} snapshot(s) committed meanwhile")

        # 2. the machine is reset
        shutil.rmtree(work)
        work.mkdir()
        (work / "train.py").write_text(TRAIN_PY)  # the code comes back from git; the state does not
        say("2. machine reset: every process killed with SIGKILL, the work folder deleted")

        # 3. a fresh machine runs the same command
        second = _Machine(argv, work)
        rc = second.finish(timeout=60)
        restored = next((line for line in second.lines if "restored checkpoints from snapshot" in line), "")
        if rc != 0 or second.resumed_from is None:
            tail = "\n".join(second.lines[-8:])
            raise LiferaftError(f"the demo's second run failed (status {rc}):\n{tail}", "report this")
        resumed = second.resumed_from
        m = re.search(r"snapshot ([0-9a-f]{12})", restored)
        snap = f"snapshot {m.group(1)}" if m else "nothing (no snapshot was committed before the reset)"
        say(f"3. machine 2, same command: restored {snap}; the training printed 'resumed from step {resumed}'")
        lost = before - resumed
        bound = int(SYNC_EVERY / STEP_SECONDS) + CKPT_EVERY
        say(
            f"   work lost: {lost} steps (~{format_duration(lost * STEP_SECONDS)}); the bound is one interval "
            f"({SYNC_EVERY:g}s ≈ {int(SYNC_EVERY / STEP_SECONDS)} steps) + the script's checkpoint period ({CKPT_EVERY} steps)"
        )
        snaps = vault.snapshots(run=RUN)
        uploaded = sum(int(s.stats.get("stored_bytes", 0)) for s in snaps)
        final = snaps[-1].short_id if snaps else "-"
        frozen = f"the frozen {FROZEN_SIZE >> 10} KiB file"
        how = f"{frozen} was in the vault already, from an earlier demo" if frozen_known else f"{frozen} once"
        say(
            f"4. finished step {second.last_step}; final snapshot {final}; {format_size(uploaded)} uploaded in {len(snaps)} snapshots "
            f"({how}, then only what changed); demo took {format_duration(time.monotonic() - t_demo)}"
        )
        say("")
        say("try it on your own script:")
        say("  liferaft run --keep checkpoints -- python train.py        # restore, sync every 60s, survive SIGTERM")
        say("  liferaft run --keep checkpoints --restarts 3 -- python train.py")
        say(f"  liferaft snapshots --run {RUN}                        # what this demo committed")
        say(f"  liferaft restore --run {RUN} --to /tmp/back           # its files, verified")
        say('  in a notebook:  raft = liferaft.attach(keep=["checkpoints"])')
        if lost < 0 or lost > 2 * bound:  # slack for a loaded machine; tests check the real bound
            raise LiferaftError(f"lost {lost} steps, more than the bound of {bound}", "report this: it is a bug")
    finally:
        shutil.rmtree(base, ignore_errors=True)
