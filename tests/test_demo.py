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
