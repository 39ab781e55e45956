"""SIGKILL of the whole machine at random moments: the next machine resumes from the newest snapshot.

Real processes, real SIGKILL to every process group, the work folder wiped in between.
``stress/stress_run_kill.py --count N`` runs the same campaign for longer.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_run_support import kill_campaign, kill_leftovers


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    kill_leftovers()


def test_sigkill_at_random_moments_then_wipe_resumes_from_the_newest_snapshot(tmp_path: Path, local_vault: str) -> None:
    seed = int(os.environ.get("LIFERAFT_TEST_SEED") or random.randrange(1 << 30))
    lines: list[str] = []
    try:
        results = kill_campaign(tmp_path, local_vault, rounds=4, rng=random.Random(seed), report=lines.append)
    except AssertionError as err:
        raise AssertionError(f"seed {seed} (rerun with LIFERAFT_TEST_SEED={seed}): {err}\n" + "\n".join(lines)) from None
    assert len(results) == 4
    # the campaign made progress across machines: some round resumed from a snapshot
    assert any(r["started"] > 0 for r in results), lines
