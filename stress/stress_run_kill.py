"""A long SIGKILL campaign against ``liferaft run``: kill the machine at random moments, wipe, resume.

    python stress/stress_run_kill.py --count 200            # 200 machine resets
    python stress/stress_run_kill.py --count 50 --every 0.2 --seed 7

Each round starts ``liferaft run --keep ckpt --every E -- python trainer.py`` in a fresh
folder, kills every process with SIGKILL after a random time, checks that the next
round resumes from exactly the newest committed snapshot and that the work lost was at
most one interval plus the script's checkpoint period (plus --slack for a pass on a busy
machine), then deletes the folder. Ends with ``liferaft verify --read-data`` on the vault.
The same campaign, shorter, is tests/test_run_kill.py.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_run_support import kill_campaign


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=50, help="machine resets")
    ap.add_argument("--every", type=float, default=0.5, help="liferaft run --every")
    ap.add_argument("--max-wait", type=float, default=3.0, help="longest life of a machine, seconds")
    ap.add_argument("--slack", type=float, default=2.0, help="allowed time for a pass on top of the bound")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    root = Path(tempfile.mkdtemp(prefix="liferaft-stress-kill-", dir=args.dir))
    vault = str(root / "vault")
    print(f"seed {seed}; scratch {root}", flush=True)
    t0 = time.monotonic()
    results = kill_campaign(
        root, vault, rounds=args.count, rng=random.Random(seed), every=args.every, slack=args.slack, max_wait=args.max_wait, report=print
    )
    lost = [r["lost_s"] for r in results]
    resumed = sum(1 for r in results if r["started"] > 0)
    print(
        f"{len(results)} resets in {time.monotonic() - t0:.0f}s: {resumed} resumed from a snapshot; work lost max {max(lost):.2f}s, mean {sum(lost) / len(lost):.2f}s"
    )
    check = subprocess.run([sys.executable, "-m", "liferaft", "--vault", vault, "verify", "--read-data"], capture_output=True, text=True)
    print(check.stdout.strip() or check.stderr.strip())
    if check.returncode == 0:
        shutil.rmtree(root, ignore_errors=True)
    return check.returncode


if __name__ == "__main__":
    sys.exit(main())
