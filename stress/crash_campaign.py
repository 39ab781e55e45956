#!/usr/bin/env python3
"""Crash campaign: SIGKILL real ``liferaft`` processes at random moments and check the vault.

Guarantee 1 (atomic commit): a kill -9 at any point leaves the vault at its previous
committed state plus garbage that ``prune`` removes; never a half snapshot. This script
proves it the blunt way:

* snapshot phase: a tree (a chunked file > 1 MiB, a second chunked file, hundreds of
  small files, a link) is mutated before every step and snapshotted by a real
  ``python -m liferaft snapshot`` subprocess, which is SIGKILLed after a random delay
  or as soon as the parent sees a chosen point of the commit (a pack, index or
  manifest temp file appearing, the pack/index/manifest appearing, the session lock
  going away), plus a random sub-millisecond slack. After every kill:
  ``verify(read_data=True)`` is ok, no committed snapshot went missing, at most one new
  snapshot appeared and it is the step just attempted, the newest snapshot restores
  without fallback to the exact bytes, modes and mtimes the tree had at its step, and
  so does one older snapshot picked at random. At the end (and every ``prune_every``
  steps) ``prune`` must take the killed writers' sessions (and a killed prune's lock)
  for dead at once, since their pids are gone on this machine, remove all garbage
  (orphan packs, ``.tmp-*`` files, dead sessions) and leave every snapshot restorable.
* restore phase: ``python -m liferaft restore ID --to DIR`` is killed at random into a
  fresh folder, into a folder holding an older version of every file, or into the
  folder a previous kill left behind. Every name in the target is a whole file of one
  of the versions (or a ``.liferaft-*.tmp`` temp file); a rerun restores exactly and
  removes the temp files that the killed restores left.
* creation phase (script only): the very first snapshot into an empty folder is
  killed while it writes ``config.json``; the next snapshot must work.

Run it as ``python stress/crash_campaign.py --count 200 --seed 1``; it prints a summary
and exits 1 on any violation. ``tests/test_crash.py`` runs a short campaign.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN = "crash"
ROOT_NAME = "work"
RESTORE_TEMP = re.compile(r"^\.liferaft-(?:[0-9a-f]{8}-[0-9]+-)?[0-9a-f]{12}\.tmp$")
VAULT_TEMP = ".tmp-"
SNAPSHOT_EVENTS = ("pack_tmp", "pack", "index_tmp", "index", "manifest_tmp", "manifest", "lock_gone")
WATCH = {"pack_tmp": "packs", "pack": "packs", "index_tmp": "index", "index": "index", "manifest_tmp": "snapshots", "manifest": "snapshots"}

State = dict[str, tuple[Any, ...]]


def liferaft(*args: str) -> list[str]:
    return [sys.executable, "-m", "liferaft", *args]


# ---------------------------------------------------------------- trees


def tree_digest(root: Path) -> State:
    """Type, content hash, mode and mtime of everything below ``root`` (links not followed)."""
    out: State = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    h = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", h, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


def diff_states(got: State, want: State, limit: int = 3) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(p for p in set(got) & set(want) if got[p] != want[p])
    parts = []
    if missing:
        parts.append(f"missing {missing[:limit]}")
    if extra:
        parts.append(f"extra {extra[:limit]}")
    if changed:
        parts.append("changed " + ", ".join(f"{p}: {got[p][:3]} != {want[p][:3]}" for p in changed[:limit]))
    return "; ".join(parts) or "equal"


class Tree:
    """A working folder shaped like a training run's output, mutated step by step."""

    def __init__(self, root: Path, rng: random.Random, *, small_files: int = 300, big: int = 5 << 20, mid: int = 3 << 19) -> None:
        self.root = root
        self.rng = rng
        self.small_files = small_files
        self.big = big
        self.mid = mid
        self.serial = 0

    def _bytes(self, n: int) -> bytes:
        if self.rng.random() < 0.3:  # some compressible content, too
            line = f"step {self.serial} loss {self.rng.random():.6f}\n".encode()
            return (line * (n // len(line) + 1))[:n]
        return self.rng.randbytes(n)

    def _write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def _small(self) -> list[Path]:
        return sorted(p for p in (self.root / "small").rglob("*") if p.is_file() and not p.is_symlink())

    def build(self) -> None:
        self.root.mkdir(parents=True)
        self._write("big.bin", self.rng.randbytes(self.big))
        self._write("mid.bin", self.rng.randbytes(self.mid))
        for i in range(self.small_files):
            self._write(f"small/d{i % 12:02d}/f{i:04d}.dat", self._bytes(self.rng.randint(0, 6000)))
        self._write("empty.txt", b"")
        (self.root / "emptydir").mkdir()
        os.symlink("small/d00", self.root / "latest")

    def mutate(self, step: int) -> None:
        """Change the tree so that every step's state differs (stat cache must notice)."""
        rng = self.rng
        self.serial = step
        self._write("step.txt", f"{step}\n".encode())
        small = self._small()
        for p in rng.sample(small, min(len(small), rng.randint(1, 6))):
            p.write_bytes(self._bytes(rng.randint(0, 6000)))
        for p in rng.sample(small, min(len(small), rng.randint(0, 2))):
            p.unlink()
        for _ in range(rng.randint(0, 3)):
            self._write(f"small/d{rng.randrange(12):02d}/n{step:04d}-{rng.randrange(10**6)}.dat", self._bytes(rng.randint(0, 6000)))
        if rng.random() < 0.15:
            for j in range(rng.randint(1, 4)):
                self._write(f"small/new{step:04d}/g{j}.dat", self._bytes(rng.randint(1, 3000)))
        if rng.random() < 0.1 and small:
            os.chmod(rng.choice(small), rng.choice((0o600, 0o644, 0o755)))
        if rng.random() < 0.1:
            link = self.root / "latest"
            link.unlink()
            os.symlink(f"small/d{rng.randrange(12):02d}", link)
        big = self.root / "big.bin"
        r = rng.random()
        if r < 0.25:  # a fine-tune touching a region of the weights
            size = big.stat().st_size
            with open(big, "r+b") as f:
                f.seek(rng.randrange(size))
                f.write(rng.randbytes(rng.randint(1 << 10, 128 << 10)))
        elif r < 0.45:  # an event file growing
            with open(big, "ab") as f:
                f.write(rng.randbytes(rng.randint(16 << 10, 384 << 10)))
        if big.stat().st_size > 2 * self.big:
            big.write_bytes(rng.randbytes(self.big))
        if rng.random() < 0.05:
            self._write("mid.bin", rng.randbytes(self.mid))
        blob = self.root / "blob.bin"
        if rng.random() < 0.2:  # a fresh checkpoint file: makes the pack write longer
            blob.write_bytes(rng.randbytes(rng.randint(1 << 20, 3 << 20)))
        elif blob.exists() and rng.random() < 0.3:
            blob.unlink()


def scratch_dir(workdir: Path) -> Path:
    """Where checks restore to: memory when the machine has it (restores are the check's cost)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="liferaft-crash-", dir=shm)) / "scratch"
    return workdir / "scratch"


# ---------------------------------------------------------------- watching a child


def scan(folder: Path) -> set[str]:
    """Every non-folder name below ``folder``, relative, temp files included."""
    out: set[str] = set()
    base = str(folder)
    cut = len(base) + 1
    stack = [base]
    while stack:
        d = stack.pop()
        try:
            it = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in it:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
            except OSError:
                continue
            out.add(e.path[cut:])
    return out


def _is_session(name: str) -> bool:
    return name.startswith("locks/session-") and name.endswith(".json")


def snapshot_events(before: set[str], now: set[str], seen: set[str]) -> set[str]:
    """Which points of a snapshot's commit the vault shows (``seen`` accumulates)."""
    new = now - before
    ev = set()
    for n in new:
        top = n.split("/", 1)[0]
        leaf = n.rsplit("/", 1)[-1]
        tmp = leaf.startswith(VAULT_TEMP)
        if top == "locks" and _is_session(n):
            ev.add("lock")
        elif top == "packs":
            ev.add("pack_tmp" if tmp else "pack")
        elif top == "index":
            ev.add("index_tmp" if tmp else "index")
        elif top == "snapshots":
            ev.add("manifest_tmp" if tmp else "manifest")
    if "lock" in seen and not any(_is_session(n) for n in new):
        ev.add("lock_gone")
    seen |= ev
    return ev


@dataclass
class Plan:
    kind: str  # "none", "delay" (seconds after the start signal), "event" (+ slack seconds)
    delay: float = 0.0
    event: str = ""

    def __str__(self) -> str:
        if self.kind == "delay":
            return f"delay {self.delay * 1000:.1f}ms"
        if self.kind == "event":
            return f"on {self.event} +{self.delay * 1000:.2f}ms"
        return "uncut"


@dataclass
class Outcome:
    rc: int
    killed: bool
    work_s: float | None  # start signal → exit, for uncut runs
    stderr: str


def _kill_at(proc: subprocess.Popen[bytes], until: float) -> bool:
    """SIGKILL ``proc`` at perf_counter() ``until`` (spinning the last ms); False if it exited first."""
    while time.perf_counter() < until - 0.0015:
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    while time.perf_counter() < until:
        pass
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return True


def run_child(
    cmd: list[str],
    plan: Plan,
    events: Callable[[], set[str]],
    start_event: str,
    *,
    poll: float = 0.0003,
    timeout: float = 120.0,
) -> Outcome:
    """Start ``cmd``; kill it with SIGKILL as ``plan`` says; wait for it to be gone.

    ``events()`` returns the points the child has reached (as seen from outside);
    ``start_event`` is the one the delay of a "delay" plan counts from.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    t0 = time.monotonic()
    started: float | None = None
    killed = False
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"{' '.join(cmd)} did not finish in {timeout:.0f}s")
            if plan.kind == "none" and started is not None:
                time.sleep(poll * 4)
                continue
            ev = events()
            if started is None and start_event in ev:
                started = time.perf_counter()
            if plan.kind == "delay" and started is not None:
                killed = _kill_at(proc, started + plan.delay)
                break
            if plan.kind == "event" and plan.event in ev:
                killed = _kill_at(proc, time.perf_counter() + plan.delay)
                break
            time.sleep(poll)
        _out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    end = time.perf_counter()
    rc = proc.returncode
    work = end - started if (started is not None and rc == 0 and not killed) else None
    return Outcome(rc, rc == -signal.SIGKILL, work, (err or b"").decode(errors="replace")[-2000:])


def prune_stage(before: set[str], after: set[str]) -> str:
    """How far a killed prune got, from what it added and removed."""

    def kind(names: set[str], top: str) -> int:
        return sum(1 for n in names if n.startswith(top) and not n.rsplit("/", 1)[-1].startswith(VAULT_TEMP))

    added, removed = after - before, before - after
    if kind(removed, "packs/"):
        return "deleting packs"
    if kind(removed, "index/"):
        return "old index fragments removed"
    if kind(added, "index/"):
        return "new index fragment written"
    if kind(added, "packs/"):
        return "repacking"
    return "marking / before any write"


def restore_stage(killed: bool, temps: int, renamed: int) -> str:
    if not killed:
        return "exited"
    if not temps:
        return "after renames" if renamed else "before temps"
    return "mid-rename" if renamed else "filling temps"


# ---------------------------------------------------------------- report


@dataclass
class Report:
    seed: int
    kills: int = 0
    uncut: int = 0
    late_kills: int = 0  # the kill was sent but the process had already finished
    committed: int = 0
    verify_runs: int = 0
    restores_checked: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    mid_write: Counter[str] = field(default_factory=Counter)
    plans: Counter[str] = field(default_factory=Counter)
    prunes: list[dict[str, Any]] = field(default_factory=list)
    prune_kills: int = 0
    prune_stages: Counter[str] = field(default_factory=Counter)
    restore_kills: int = 0
    restore_stages: Counter[str] = field(default_factory=Counter)
    restore_reruns: int = 0
    stale_restore_temps: int = 0
    creation_kills: int = 0
    creation_stages: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def violate(self, msg: str) -> None:
        self.violations.append(msg)

    def summary(self) -> str:
        lines = [f"crash campaign seed={self.seed}: {self.seconds:.1f}s"]
        if self.kills or self.uncut:
            lines += [
                f"  snapshot: {self.kills} kills, {self.uncut} uncut runs, {self.late_kills} kills after exit, "
                f"{self.committed} snapshots committed, {self.verify_runs} verify(read_data) runs all checked, "
                f"{self.restores_checked} restores compared",
                "  where snapshot kills landed: " + ", ".join(f"{k}={v}" for k, v in sorted(self.stages.items())),
                "  kills inside a vault write (temp file left): "
                + (", ".join(f"{k}={v}" for k, v in sorted(self.mid_write.items())) or "none")
                + f" (total {sum(self.mid_write.values())})",
                "  plans: " + ", ".join(f"{k}={v}" for k, v in sorted(self.plans.items())),
            ]
        if self.prune_stages:
            lines.append(f"  prune kills: {self.prune_kills}; " + ", ".join(f"{k}={v}" for k, v in sorted(self.prune_stages.items())))
        for p in self.prunes:
            lines.append("  prune: " + ", ".join(f"{k}={v}" for k, v in p.items()))
        if self.restore_kills or self.restore_reruns:
            lines.append(
                f"  restore: {self.restore_kills} kills, {self.restore_reruns} reruns compared, "
                f"{self.stale_restore_temps} stale .liferaft-*.tmp files left after reruns; landed: "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.restore_stages.items()))
            )
        if self.creation_kills or self.creation_stages:
            lines.append(
                f"  creation: {self.creation_kills} kills; " + ", ".join(f"{k}={v}" for k, v in sorted(self.creation_stages.items()))
            )
        lines.append(f"  violations: {len(self.violations)}")
        lines.extend(f"    - {v}" for v in self.violations[:20])
        if self.violations:
            lines.append(f"  reproduce the plan with: python stress/crash_campaign.py --seed {self.seed}")
        return "\n".join(lines)


# ---------------------------------------------------------------- vault checks


def dangling_index_entries(vault: Path) -> int:
    """Index entries naming a pack that is not in the vault: the commit order forbids them."""
    from liferaft.api import Vault

    index = Vault(str(vault)).repository().index(reload=True)
    packs = {n.rsplit("/", 1)[-1] for n in scan(vault / "packs")}
    return sum(1 for e in index.values() if e[0] not in packs)


def garbage(vault: Path) -> dict[str, int]:
    """Orphan packs (holding no blob a snapshot needs), temp files, session and prune locks."""
    from liferaft.api import Vault
    from liferaft.vault.repository import iter_referenced

    repo = Vault(str(vault)).repository()
    snaps = repo.snapshots()
    index = repo.index(reload=True)
    live_packs = {index[b][0] for _s, b in iter_referenced(repo, snaps) if b in index}
    names = scan(vault)
    packs = {n.rsplit("/", 1)[-1] for n in names if n.startswith("packs/") and not n.rsplit("/", 1)[-1].startswith(VAULT_TEMP)}
    dangling = {e[0] for e in index.values()} - packs
    return {
        "orphan_packs": len(packs - live_packs),
        "index_entries_to_missing_packs": len(dangling),
        "temp_files": sum(1 for n in names if n.rsplit("/", 1)[-1].startswith(VAULT_TEMP)),
        "sessions": sum(1 for n in names if _is_session(n)),
        "prune_lock": int("locks/prune.json" in names),
    }


# ---------------------------------------------------------------- snapshot campaign


class SnapshotCampaign:
    def __init__(
        self,
        workdir: Path,
        report: Report,
        rng: random.Random,
        *,
        count: int,
        prune_every: int = 0,
        prune_kills: bool = True,
        keep_last: int = 8,
        log: Callable[[str], None] = print,
    ) -> None:
        self.workdir = workdir
        self.vault = workdir / "vault"
        self.tree = Tree(workdir / ROOT_NAME, rng)
        self.scratch = scratch_dir(workdir)
        self.report = report
        self.rng = rng
        self.count = count
        self.prune_every = prune_every
        self.keep_last = keep_last
        self.prune_kills = prune_kills
        self.prune_time = 0.12  # seconds a prune takes (lock to exit), updated from uncut ones
        self.log = log
        self.states: dict[int, State] = {}
        self.committed: dict[str, int] = {}  # snapshot id → step
        self.work_times: list[float] = []
        self.killed_pids: set[int] = set()

    # -- plan

    def plan(self) -> Plan:
        r = self.rng.random()
        if r < 0.1:
            return Plan("none")
        if r < 0.5:
            recent = sorted(self.work_times[-7:])
            est = recent[len(recent) // 2] if recent else 0.1
            return Plan("delay", delay=self.rng.uniform(0, 1.3 * est))
        slack = 0.0 if self.rng.random() < 0.4 else self.rng.uniform(0, 0.0015)
        return Plan("event", delay=slack, event=self.rng.choice(SNAPSHOT_EVENTS))

    def cmd(self, step: int) -> list[str]:
        return liferaft("--vault", str(self.vault), "-q", "snapshot", str(self.tree.root), "--run", RUN, "--step", str(step))

    # -- one step

    def attempt(self, step: int, plan: Plan) -> tuple[Outcome, set[str], set[str]]:
        before = scan(self.vault)
        # Watch only the folders the plan needs, as fast as we can: the index and
        # manifest writes take well under a millisecond.
        parts = ["locks", WATCH[plan.event]] if plan.kind == "event" and plan.event in WATCH else ["locks"]
        seen: set[str] = set()

        def events() -> set[str]:
            now = set().union(*({f"{part}/{n}" for n in scan(self.vault / part)} for part in parts))
            return snapshot_events(before, now, seen)

        out = run_child(self.cmd(step), plan, events, "lock", poll=0.0 if plan.kind == "event" else 0.0003)
        return out, before, scan(self.vault)

    def classify(self, out: Outcome, before: set[str], after: set[str]) -> str:
        new = after - before
        if not out.killed:
            return "exited"
        leaves = [n for n in new if not n.rsplit("/", 1)[-1].startswith(VAULT_TEMP)]
        for n in new:
            if n.rsplit("/", 1)[-1].startswith(VAULT_TEMP):
                self.report.mid_write[n.split("/", 1)[0] if "/" in n else "root"] += 1
        has = {n.split("/", 1)[0] for n in leaves}
        session_open = any(_is_session(n) for n in new)
        if "snapshots" in has:
            return "after commit, session open" if session_open else "after commit, session closed"
        if "index" in has:
            return "index written, no manifest"
        if "packs" in has:
            return "packs written, no index"
        if session_open:
            return "session open, no pack yet"
        return "before session"

    def check(self, step: int, out: Outcome, tag: str) -> None:
        from liferaft.api import Vault

        rep = self.report
        where = f"step {step} ({tag})"
        if not out.killed and out.rc != 0:
            rep.violate(f"{where}: snapshot exited {out.rc}: {out.stderr.strip().splitlines()[-1:] or ''}")
        vault = Vault(str(self.vault))
        report = vault.verify(read_data=True)
        rep.verify_runs += 1
        if not report.ok:
            rep.violate(f"{where}: verify failed: {report.damage[:3]}")
        if report.warnings:
            rep.violate(f"{where}: verify warns (a torn object under its final name?): {report.warnings[:3]}")
        dangling = dangling_index_entries(self.vault)
        if dangling:
            rep.violate(f"{where}: {dangling} index entries name packs the vault does not hold")
        snaps = vault.snapshots(run=RUN)
        ids = {s.id: s.step for s in snaps}
        lost = set(self.committed) - set(ids)
        if lost:
            rep.violate(f"{where}: committed snapshot(s) vanished: {sorted(i[:12] for i in lost)}")
        new = {i: s for i, s in ids.items() if i not in self.committed}
        if len(new) > 1 or any(s != step for s in new.values()):
            rep.violate(f"{where}: unexpected new snapshots {[(i[:12], s) for i, s in new.items()]}")
        if out.rc == 0 and not new:
            rep.violate(f"{where}: the snapshot command succeeded but no snapshot was committed")
        if new:
            rep.committed += 1
        self.committed.update({i: s for i, s in new.items() if s == step})
        # The newest snapshot must restore (no fallback) to exactly its step's tree.
        if snaps:
            newest = snaps[-1]
            res = self._restore(vault, None, where)
            if res is not None and res.snapshot.id != newest.id:
                rep.violate(f"{where}: restore picked {res.snapshot.short_id}, not the newest {newest.short_id}; fallbacks {res.fallbacks}")
            older = [s for s in snaps if s.id != newest.id]
            if older:
                self._restore(vault, self.rng.choice(older).id, where)

    def _restore(self, vault: Any, sid: str | None, where: str) -> Any:
        import warnings

        shutil.rmtree(self.scratch, ignore_errors=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = vault.restore(sid, run=RUN, to=self.scratch)
        except Exception as err:
            self.report.violate(f"{where}: restore of {sid or 'newest'} failed: {type(err).__name__}: {err}")
            return None
        if res is None:
            self.report.violate(f"{where}: restore found nothing to restore")
            return None
        self.report.restores_checked += 1
        if res.fallbacks:
            self.report.violate(f"{where}: restore fell back: {res.fallbacks}")
        step = res.snapshot.step
        want = self.states.get(step)
        got = tree_digest(self.scratch / ROOT_NAME)
        if want is None or got != want:
            self.report.violate(
                f"{where}: snapshot {res.snapshot.short_id} (step {step}) restores to a different tree: {diff_states(got, want or {})}"
            )
        return res

    # -- prune

    def check_all(self, where: str, *, expect: set[str]) -> None:
        """verify(read_data) is ok, the snapshot list is ``expect``, every snapshot restores exactly."""
        from liferaft.api import Vault

        rep = self.report
        report = Vault(str(self.vault)).verify(read_data=True)
        rep.verify_runs += 1
        if not report.ok or report.warnings:
            rep.violate(f"{where}: verify: {report.damage[:3]} {report.warnings[:3]}")
        if dangling_index_entries(self.vault):
            rep.violate(f"{where}: index entries name packs the vault does not hold")
        vault = Vault(str(self.vault))
        snaps = vault.snapshots(run=RUN)
        if {s.id for s in snaps} != expect:
            rep.violate(f"{where}: the snapshot list changed: {len(snaps)} listed, {len(expect)} expected")
        for snap in snaps:
            self._restore(vault, snap.id, where)

    def kill_prune(self, label: str) -> None:
        """Kill ``liferaft prune`` at a random moment: the vault must not notice."""
        rep = self.report
        before = scan(self.vault)
        if self.rng.random() < 0.4:
            plan = Plan("delay", delay=self.rng.uniform(0, 1.3 * self.prune_time))
        else:
            slack = 0.0 if self.rng.random() < 0.5 else self.rng.uniform(0, 0.001)
            plan = Plan("event", delay=slack, event=self.rng.choice(("repack", "new_index", "deleting", "deleting", "deleting")))

        def events() -> set[str]:
            now = set().union(*({f"{part}/{n}" for n in scan(self.vault / part)} for part in ("locks", "packs", "index")))
            ev = {"lock"} if "locks/prune.json" in now else set()
            added = {n for n in now - before if not n.rsplit("/", 1)[-1].startswith(VAULT_TEMP)}
            if any(n.startswith("packs/") for n in added):
                ev.add("repack")
            if any(n.startswith("index/") for n in added):
                ev.add("new_index")
            if any(n.startswith(("packs/", "index/")) and not n.rsplit("/", 1)[-1].startswith(VAULT_TEMP) for n in before - now):
                ev.add("deleting")
            return ev

        out = run_child(liferaft("--vault", str(self.vault), "-q", "prune", "--wait", "5"), plan, events, "lock", poll=0.0)
        after = scan(self.vault)
        if out.work_s:
            self.prune_time = out.work_s
        if not out.killed:
            stage = "exited"
            if out.rc != 0:
                rep.violate(f"{label}: prune exited {out.rc}: {out.stderr.strip()[-300:]}")
        else:
            rep.prune_kills += 1
            stage = prune_stage(before, after)
        rep.prune_stages[stage] += 1
        self.log(f"{label}: prune {plan} → {stage}")
        self.check_all(f"{label}, prune killed ({stage})", expect=set(self.committed))

    def prune_phase(self, label: str, *, forget: bool) -> None:
        from liferaft.api import Vault
        from liferaft.vault import maintenance

        rep = self.report
        if forget:
            Vault(str(self.vault)).forget(run=RUN, keep_last=self.keep_last)
            listed = {s.id for s in Vault(str(self.vault)).snapshots(run=RUN)}
            self.committed = {i: s for i, s in self.committed.items() if i in listed}
        # No lock is aged by hand: every writer and prune that held one was killed here,
        # and a lock whose pid is gone in this pid scope is dead at once.
        before = garbage(self.vault)
        if self.prune_kills:
            self.kill_prune(label)
        try:
            pr = maintenance.prune(Vault(str(self.vault)).repository(), wait=10.0, temp_age=0)
        except Exception as err:
            rep.violate(f"{label}: prune failed: {type(err).__name__}: {err}")
            return
        after = garbage(self.vault)
        rep.prunes.append(
            {
                "when": label,
                **{f"before_{k}": v for k, v in before.items() if v},
                "packs_deleted": pr.packs_deleted,
                "packs_repacked": pr.packs_repacked,
                "temp_deleted": pr.temp_deleted,
                **{f"after_{k}": v for k, v in after.items() if v},
            }
        )
        if pr.waiting_on:
            rep.violate(f"{label}: prune still waits on writers that are gone: {pr.waiting_on}")
        leftover = {k: v for k, v in after.items() if v}
        if leftover:
            rep.violate(f"{label}: prune left garbage: {leftover}")
        self.check_all(label, expect=set(self.committed))
        again = maintenance.prune(Vault(str(self.vault)).repository(), wait=10.0, temp_age=0)
        if again.packs_deleted or again.packs_repacked or again.index_rewritten:
            rep.violate(f"{label}: a second prune still found work: {again.to_json()}")

    # -- the campaign

    def run(self) -> None:
        try:
            self._run()
        finally:
            shutil.rmtree(self.scratch.parent if self.scratch.parent != self.workdir else self.scratch, ignore_errors=True)

    def _run(self) -> None:
        rep = self.report
        self.tree.build()
        self.states[0] = tree_digest(self.tree.root)
        out, _b, _a = self.attempt(0, Plan("none"))
        if out.rc != 0:
            rep.violate(f"the first snapshot failed: rc {out.rc}: {out.stderr.strip()[-500:]}")
            return
        if out.work_s:
            self.work_times.append(out.work_s)
        self.check(0, out, "uncut")
        for step in range(1, self.count + 1):
            self.tree.mutate(step)
            self.states[step] = tree_digest(self.tree.root)
            plan = self.plan()
            rep.plans[plan.kind if plan.kind != "event" else f"on_{plan.event}"] += 1
            out, before, after = self.attempt(step, plan)
            stage = self.classify(out, before, after)
            if out.killed:
                rep.kills += 1
                rep.stages[stage] += 1
            else:
                rep.uncut += 1
                if plan.kind != "none":
                    rep.late_kills += 1
            if out.work_s:
                self.work_times.append(out.work_s)
            n_before = len(rep.violations)
            self.check(step, out, f"{plan}, {stage}")
            self.log(f"step {step:3d}: {plan!s:>22} → {stage}" + ("  VIOLATION" if len(rep.violations) > n_before else ""))
            if self.prune_every and step % self.prune_every == 0 and step != self.count:
                self.prune_phase(f"prune after step {step}", forget=True)
        self.prune_phase("final prune", forget=False)
        # The vault is still usable: one more snapshot, uncut, restores exactly.
        self.tree.mutate(self.count + 1)
        self.states[self.count + 1] = tree_digest(self.tree.root)
        out, _b, _a = self.attempt(self.count + 1, Plan("none"))
        self.check(self.count + 1, out, "after prune")


# ---------------------------------------------------------------- restore campaign


class RestoreCampaign:
    """Kill ``liferaft restore --to DIR`` and check the target holds only whole files."""

    def __init__(
        self, workdir: Path, report: Report, rng: random.Random, *, count: int, small_files: int = 400, log: Callable[[str], None] = print
    ) -> None:
        self.workdir = workdir
        self.vault = workdir / "rvault"
        self.rng = rng
        self.tree = Tree(workdir / "rsrc" / ROOT_NAME, rng, small_files=small_files, big=3 << 20, mid=3 << 20)
        self.report = report
        self.count = count
        self.log = log
        self.n = 0
        self.work_times: list[float] = []

    def _snapshot(self, step: int) -> tuple[str, State]:
        state = tree_digest(self.tree.root)
        res = subprocess.run(
            liferaft("--vault", str(self.vault), "--json", "snapshot", str(self.tree.root), "--run", "restore-src", "--step", str(step)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if res.returncode != 0:
            raise RuntimeError(f"snapshot for the restore campaign failed: {res.stderr}")
        return json.loads(res.stdout)["id"], state

    def _rewrite_all(self) -> None:
        """Every file gets new bytes and a new mtime; some go, some come."""
        rng = self.rng
        files = sorted(p for p in self.tree.root.rglob("*") if p.is_file() and not p.is_symlink())
        for p in files:
            if rng.random() < 0.05 and p.name.endswith(".dat"):
                p.unlink()
                continue
            size = p.stat().st_size
            p.write_bytes(rng.randbytes(max(0, size + rng.randint(-500, 500))))
            os.utime(p, ns=(1_600_000_000_000_000_000 + rng.randrange(10**15),) * 2)
        for i in range(40):
            q = self.tree.root / "small" / "fresh" / f"h{i:03d}.dat"
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(rng.randbytes(rng.randint(0, 5000)))
        link = self.tree.root / "latest"
        link.unlink()
        os.symlink("small/d01", link)

    def _target(self) -> Path:
        self.n += 1
        return self.workdir / "rtargets" / f"t{self.n:03d}"

    def _events(self, root: Path, old: State) -> Callable[[], set[str]]:
        """ "temp": the restore has made its first temp file; "final": it has begun renaming
        temps to their final names (a temp of its own went away, or a new name appeared)."""
        most = 0

        def events() -> set[str]:
            nonlocal most
            ev = set()
            names = scan(root)
            temps = sum(1 for n in names if RESTORE_TEMP.match(n.rsplit("/", 1)[-1]) and n not in old)
            if temps:
                ev.add("temp")
            most = max(most, temps)
            if temps < most or any(not RESTORE_TEMP.match(n.rsplit("/", 1)[-1]) and n not in old for n in names):
                ev.add("final")
            return ev

        return events

    def check_target(self, root: Path, allowed: dict[str, set[tuple[Any, ...]]], where: str) -> set[str]:
        """Every name is a whole version of its file (or a temp file); return the temps."""
        got = tree_digest(root) if root.exists() else {}
        temps = set()
        for rel, st in got.items():
            name = rel.rsplit("/", 1)[-1]
            if RESTORE_TEMP.match(name):
                temps.add(rel)
                if st[0] not in ("file", "link"):
                    self.report.violate(f"{where}: temp {rel} is a {st[0]}")
                continue
            ok = allowed.get(rel)
            if ok is None:
                self.report.violate(f"{where}: {rel} is in neither version")
            elif st[0] == "dir":
                if not any(o[0] == "dir" for o in ok):
                    self.report.violate(f"{where}: {rel} is a folder where the snapshot has a {next(iter(ok))[0]}")
            elif st not in ok:
                self.report.violate(f"{where}: {rel} under its final name is not a whole version of the file: {st[:3]}")
        return temps

    def run(self) -> None:
        from liferaft.api import Vault

        rep = self.report
        self.tree.build()
        id_a, state_a = self._snapshot(1)
        self._rewrite_all()
        id_b, state_b = self._snapshot(2)

        def restore_cmd(sid: str, target: Path) -> list[str]:
            # --force: the older version's random mtimes may be newer than these, and
            # replacing it is the point (the refusal itself is tested in test_cli.py).
            return liferaft("--vault", str(self.vault), "-q", "restore", sid, "--to", str(target), "--force")

        # Calibrate: an uncut restore, timed from its first temp file to its exit.
        target = self._target()
        out = run_child(restore_cmd(id_b, target), Plan("none"), self._events(target / ROOT_NAME, {}), "temp", poll=0.0005)
        if out.rc != 0 or tree_digest(target / ROOT_NAME) != state_b:
            rep.violate(f"restore: an uncut restore failed or differs: rc {out.rc} {out.stderr[-300:]}")
            return
        if out.work_s:
            self.work_times.append(out.work_s)

        allowed: dict[str, set[tuple[Any, ...]]] = {}
        target = self._target()
        for k in range(self.count):
            r = self.rng.random()
            scenario = "fresh" if r < 0.4 else "over old" if r < 0.8 else "again"
            if scenario == "again" and not target.exists():
                scenario = "fresh"
            if scenario != "again":
                target = self._target()
                allowed = {p: {s} for p, s in state_b.items()}
            if scenario == "over old":
                Vault(str(self.vault)).restore(id_a, to=target)
                for p, s in state_a.items():
                    allowed.setdefault(p, set()).add(s)
            old = tree_digest(target / ROOT_NAME) if target.exists() else {}
            est = sorted(self.work_times)[len(self.work_times) // 2]
            if self.rng.random() < 0.4:
                plan = Plan("event", delay=self.rng.uniform(0, 0.004), event="final")
            else:
                plan = Plan("delay", delay=self.rng.uniform(0, 1.2 * est))
            out = run_child(restore_cmd(id_b, target), plan, self._events(target / ROOT_NAME, old), "temp", poll=0.0005)
            where = f"restore kill {k} ({scenario}, {plan})"
            if not out.killed and out.rc != 0:
                rep.violate(f"{where}: restore exited {out.rc}: {out.stderr.strip()[-300:]}")
            temps = len(self.check_target(target / ROOT_NAME, allowed, where) - set(old))
            now = tree_digest(target / ROOT_NAME) if (target / ROOT_NAME).exists() else {}
            renamed = sum(1 for p, s in now.items() if s[0] == "file" and s == state_b.get(p) and old.get(p) != s)
            stage = restore_stage(out.killed, temps, renamed)
            rep.restore_kills += int(out.killed)
            if out.work_s:
                self.work_times.append(out.work_s)
            rep.restore_stages[stage] += 1
            self.log(f"restore {k:3d}: {scenario:>8} {plan!s:>18} → {stage} ({temps} temps, {renamed} files renamed)")
            if self.rng.random() < 0.6 or k == self.count - 1:
                self.rerun(restore_cmd(id_b, target), target, state_b, state_a, where)

    def rerun(self, cmd: list[str], target: Path, state_b: State, state_a: State, where: str) -> None:
        rep = self.report
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        rep.restore_reruns += 1
        if res.returncode != 0:
            rep.violate(f"{where}: rerun of restore failed: {res.stderr.strip()[-300:]}")
            return
        got = tree_digest(target / ROOT_NAME)
        mine = {p: s for p, s in got.items() if p in state_b}
        if mine != state_b:
            rep.violate(f"{where}: rerun restored something else: {diff_states(mine, state_b)}")
        for p in got:
            if p in state_b:
                continue
            if RESTORE_TEMP.match(p.rsplit("/", 1)[-1]):
                rep.stale_restore_temps += 1
                rep.violate(f"{where}: after the rerun a killed restore's temp file {p} is still there")
            elif p not in state_a:
                rep.violate(f"{where}: after the rerun {p} exists in neither version")


# ---------------------------------------------------------------- creation


def creation_campaign(workdir: Path, report: Report, rng: random.Random, *, count: int, log: Callable[[str], None] = print) -> None:
    """Kill the first snapshot into an empty folder while it writes config.json."""
    src = workdir / "csrc"
    Tree(src, rng, small_files=20, big=2 << 20, mid=1 << 10).build()
    for k in range(count):
        vault = workdir / f"cvault{k:03d}"
        vault.mkdir()

        def events(vault: Path = vault) -> set[str]:
            names = scan(vault)
            ev = set()
            if any(n.startswith(VAULT_TEMP) for n in names):
                ev.add("config_tmp")
            if "config.json" in names:
                ev.add("config")
            return ev

        plan = (
            Plan("event", delay=0.0, event="config_tmp")
            if rng.random() < 0.7
            else Plan("event", delay=rng.uniform(0, 0.001), event="config")
        )
        cmd = liferaft("--vault", str(vault), "-q", "snapshot", str(src), "--run", RUN)
        out = run_child(cmd, plan, events, "config_tmp", poll=0.0)
        names = scan(vault)
        if not out.killed:
            stage = "exited"
        else:
            stage = "config written" if "config.json" in names else "config temp left" if names else "nothing written"
        report.creation_stages[stage] += 1
        report.creation_kills += int(out.killed)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            report.violate(f"creation kill {k} ({stage}): the next snapshot into that folder fails: {res.stderr.strip()[-300:]}")
        log(f"creation {k:3d}: {plan!s:>22} → {stage}, next snapshot rc {res.returncode}")
        shutil.rmtree(vault, ignore_errors=True)


# ---------------------------------------------------------------- main


def campaign(
    workdir: Path,
    *,
    seed: int,
    count: int,
    restore_count: int,
    creation_count: int = 0,
    prune_every: int = 0,
    prune_kills: bool = True,
    restore_files: int = 400,
    log: Callable[[str], None] = print,
) -> Report:
    report = Report(seed)
    rng = random.Random(seed)
    t0 = time.monotonic()
    try:
        if count:
            SnapshotCampaign(
                workdir / "snap",
                report,
                random.Random(rng.getrandbits(64)),
                count=count,
                prune_every=prune_every,
                prune_kills=prune_kills,
                log=log,
            ).run()
        if restore_count:
            RestoreCampaign(
                workdir / "restore", report, random.Random(rng.getrandbits(64)), count=restore_count, small_files=restore_files, log=log
            ).run()
        if creation_count:
            creation_campaign(workdir / "create", report, random.Random(rng.getrandbits(64)), count=creation_count, log=log)
    finally:
        report.seconds = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="snapshot attempts (most are killed)")
    ap.add_argument("--restore-count", type=int, default=None, help="restore attempts (default: count / 4)")
    ap.add_argument("--creation-count", type=int, default=20, help="kills of a vault's very first snapshot")
    ap.add_argument("--prune-every", type=int, default=40, help="forget + prune every N steps (0: only at the end)")
    ap.add_argument("--no-prune-kills", action="store_true", help="do not kill a prune before each checked prune")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill plan (default: random, printed)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the vaults here (default: a temp folder, removed on success)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per attempt")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"crash campaign: seed {seed}", flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="liferaft-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["LIFERAFT_CACHE_DIR"] = str(workdir / "cache")
    os.environ.pop("LIFERAFT_VAULT", None)
    restore_count = args.restore_count if args.restore_count is not None else max(1, args.count // 4)
    report = campaign(
        workdir,
        seed=seed,
        count=args.count,
        restore_count=restore_count,
        creation_count=args.creation_count,
        prune_every=args.prune_every,
        prune_kills=not args.no_prune_kills,
        log=(lambda s: print(s, flush=True)) if args.verbose else (lambda s: None),
    )
    print(report.summary())
    if report.violations:
        print(f"vaults kept in {workdir}", file=sys.stderr)
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
