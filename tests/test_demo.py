"""``liferaft demo``: the README's first command tells its story in well under a minute."""

from __future__ import annotations

import re
import time
from pathlib import Path

import liferaft
from conftest import cli
from liferaft.demo import CKPT_EVERY, RUN, STEP_SECONDS, STEPS, SYNC_EVERY


def test_demo_survives_a_machine_reset(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = cli("demo", cwd=tmp_path, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert took < 60, f"the demo took {took:.0f}s"
    before = int(re.search(r"machine 1 trained to step (\d+)", out).group(1))  # type: ignore[union-attr]
    resumed = int(re.search(r"resumed from step (\d+)", out).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"work lost: (\d+) steps", out).group(1))  # type: ignore[union-attr]
    assert 0 < resumed <= before and lost == before - resumed
    # one interval plus the script's own checkpoint period, and slack for a pass on a busy machine
    assert lost <= (SYNC_EVERY + 1.5) / STEP_SECONDS + CKPT_EVERY, out
    assert "every process killed with SIGKILL, the work folder deleted" in out
    assert re.search(r"finished step \d+; final snapshot [0-9a-f]{12}; [\d.]+ KiB uploaded in \d+ snapshots", out), out
    assert "liferaft run --keep checkpoints -- python train.py" in out
    # the story is true: the default vault holds the demo's run, ending at the last step
    snaps = liferaft.Vault().snapshots(run=RUN)
    assert snaps
    back = tmp_path / "back"
    liferaft.Vault().restore(snaps[-1].id, to=back)
    assert f'"step": {STEPS}' in (back / "checkpoints" / "model.json").read_text()
    assert not list(Path(tmp_path).glob("liferaft-demo-*"))
    first, said = _uploaded(out)
    assert first >= 256 << 10 and said == "the frozen 256 KiB file once"

    # A second demo: the frozen file's blob is still in the vault (forgotten, not pruned),
    # so only what changed is uploaded; it said "(the frozen 256 KiB file once, ...)".
    r = cli("demo", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    second, said = _uploaded(r.stdout)
    assert second < 256 << 10 and said == "the frozen 256 KiB file was in the vault already", r.stdout
    added = sum(s.stats["stored_bytes"] for s in liferaft.Vault().snapshots(run=RUN))
    assert abs(added - second) <= 0.05 * 1024, (added, second)  # the figure is what its snapshots added


def _uploaded(out: str) -> tuple[float, str]:
    """The demo's "N KiB uploaded" in bytes, and what it says of the frozen file."""
    m = re.search(r"; ([\d.]+) (B|KiB|MiB) uploaded in \d+ snapshots \((the frozen 256 KiB file [^,]+),", out)
    assert m, out
    return float(m.group(1)) * {"B": 1, "KiB": 1024, "MiB": 1 << 20}[m.group(2)], m.group(3)
