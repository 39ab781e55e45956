"""``liferaft demo``: a run's files survive a machine reset, on the default vault."""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RUN = "liferaft-demo"


def _train(work: Path, steps: range) -> None:
    """A stand-in for training: each step writes a checkpoint and a log line."""
    ckpt = work / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    for step in steps:
        weights = bytes((step * 31 + i) % 251 for i in range(256 << 10))
        (ckpt / f"step-{step}.bin").write_bytes(weights)
        with open(work / "checkpoints" / "log.txt", "a") as log:
            log.write(f"step {step} loss {1.0 / (step + 1):.4f}\n")


def run_demo(vault_url: str | None = None, say: Callable[[str], None] = print) -> None:
    from .api import Vault

    vault = Vault(vault_url)
    base = Path(tempfile.mkdtemp(prefix="liferaft-demo-"))
    work = base / "machine-1"
    try:
        say(f"vault: {vault.url} ({vault.choice.source})")
        _train(work, range(1, 6))
        t0 = time.monotonic()
        snap = vault.snapshot([work / "checkpoints"], run=RUN, step=5)
        say(
            f"1. trained 5 steps, snapshot {snap.short_id} in {time.monotonic() - t0:.2f}s ({snap.stats['stored_bytes'] / 1024:.0f} KiB stored)"
        )
        reference = base / "reference"
        shutil.copytree(work, reference, symlinks=True)
        shutil.rmtree(work)
        say("2. machine reset: the work folder is gone")
        fresh = base / "machine-2"
        result = vault.restore(run=RUN, to=fresh)
        assert result is not None
        same = filecmp.dircmp(reference / "checkpoints", fresh / "checkpoints")
        ok = not (same.diff_files or same.left_only or same.right_only)
        say(
            f"3. fresh machine: restored step {result.snapshot.step}, {result.files} files, every byte verified: {'identical' if ok else 'DIFFERENT'}"
        )
        _train(fresh, range(6, 9))
        snap2 = vault.snapshot([fresh / "checkpoints"], run=RUN, step=8)
        say(
            f"4. resumed to step 8; the new snapshot stored only {snap2.stats['stored_bytes'] / 1024:.0f} KiB (the rest was already in the vault)"
        )
        say("try it on your own files:  liferaft snapshot checkpoints --run myrun --step 100")
        say("                          liferaft restore --run myrun --to /tmp/back")
        if not ok:
            raise SystemExit(1)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        os.environ.pop("LIFERAFT_DEMO", None)
