"""How long `Checkpointer.save` blocks training, against a synchronous save, and peak memory.

    python bench/bench_checkpoint.py               # a 1 GiB state, 3 timed saves each
    python bench/bench_checkpoint.py --gib 0.25    # quicker

Issue 4's goal: `save` blocks at most 5 % of a synchronous save (torch.save to a file and
a vault snapshot of it), and peak RSS stays within state size + 256 MiB.

Each mode runs in its own child process on a state of float32 torch tensors (64 MiB
each) and a fresh local vault:
- async: `ck.save(step, state)` (timed: that is what blocks training), then `ck.wait()`
  (the background write + commit, reported as the total);
- sync: `torch.save(state, f)` + `vault.snapshot([f])`, the usual way done in line.
Before each timed save every tensor is changed in place, so no save is deduplicated
against the one before. One untimed warm-up save comes first in each mode: on some VMs
the first touch of fresh memory costs seconds per GiB, and the Checkpointer allocates its
host staging buffers on the first save and reuses them afterwards; the first save's
figure is reported apart. The best of the timed runs counts (and the median is shown).
Peak RSS is the child's own (wait4), also given above its RSS once the state existed
(the state itself is host memory here; on a GPU it would not be).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import drop, table

MIB = 1 << 20


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_state(gib: float) -> dict:
    import torch

    per = 64 * MIB // 4
    n = max(1, round(gib * 1024 / 64))
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(per, generator=gen) for i in range(n)}


def bump(state: dict) -> None:
    for t in state.values():
        t.add_(1.0)


def child(mode: str, gib: float, runs: int, scratch: Path) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    state = make_state(gib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    base_rss = rss_mib()
    blocks: list[float] = []
    totals: list[float] = []
    first: dict[str, float] = {}
    if mode == "async":
        import liferaft

        ck = liferaft.Checkpointer(scratch / "checkpoints", run="bench", vault=scratch / "vault", keep_last=2, prune=True)
        for i in range(runs + 1):
            bump(state)
            t0 = time.perf_counter()
            ck.save(i, state)
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
            if i == 0:
                first = {"block_s": t1 - t0, "total_s": t2 - t0}
            else:
                blocks.append(t1 - t0)
                totals.append(t2 - t0)
        ck.close()
    else:
        import liferaft

        vault = liferaft.Vault(scratch / "vault")
        folder = scratch / "sync"
        folder.mkdir()
        for i in range(runs + 1):
            bump(state)
            path = folder / f"ckpt-{i}.pt"
            t0 = time.perf_counter()
            torch.save(state, path)
            vault.snapshot([path], run="bench", step=i)
            t1 = time.perf_counter()
            if i == 0:
                first = {"block_s": t1 - t0, "total_s": t1 - t0}
            else:
                blocks.append(t1 - t0)
                totals.append(t1 - t0)
            if i:
                (folder / f"ckpt-{i - 1}.pt").unlink()
    return {
        "mode": mode,
        "state_mib": nbytes / MIB,
        "base_rss_mib": base_rss,
        "first": first,
        "block_best_s": min(blocks),
        "block_median_s": statistics.median(blocks),
        "total_best_s": min(totals),
        "total_median_s": statistics.median(totals),
    }


def run_child(mode: str, gib: float, runs: int, scratch: Path) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--gib", str(gib), "--runs", str(runs), "--dir", str(scratch)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} child failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    ap.add_argument("--runs", type=int, default=3, help="timed saves per mode (after one warm-up)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", choices=["async", "sync"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.gib, args.runs, args.dir)))
        return 0
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="liferaft-bench-ck-"))
    results = {}
    try:
        for mode in ("sync", "async"):
            d = scratch / mode
            drop(d)
            d.mkdir(parents=True)
            results[mode] = run_child(mode, args.gib, args.runs, d)
            drop(d)
    finally:
        if args.dir is None:
            drop(scratch)
    a, s = results["async"], results["sync"]
    ratio = a["block_best_s"] / s["block_best_s"]
    state = a["state_mib"]
    extra = a["peak_rss_mib"] - a["base_rss_mib"]
    if args.json:
        print(json.dumps({"results": results, "block_ratio": ratio, "async_rss_above_state_mib": extra}, indent=2))
        return 0
    rows = [
        ("", "blocks training (best / median)", "until committed (best)", "first save (blocks / total)", "peak RSS", "RSS added"),
        (
            "sync: torch.save + vault.snapshot",
            f"{s['block_best_s']:.2f} s / {s['block_median_s']:.2f} s",
            f"{s['total_best_s']:.2f} s",
            f"{s['first']['block_s']:.2f} s",
            f"{s['peak_rss_mib']:.0f} MiB",
            f"{s['peak_rss_mib'] - s['base_rss_mib']:.0f} MiB",
        ),
        (
            "liferaft Checkpointer.save",
            f"{a['block_best_s']:.3f} s / {a['block_median_s']:.3f} s",
            f"{a['total_best_s']:.2f} s",
            f"{a['first']['block_s']:.2f} s / {a['first']['total_s']:.2f} s",
            f"{a['peak_rss_mib']:.0f} MiB",
            f"{extra:.0f} MiB",
        ),
    ]
    print(f"state: {state:.0f} MiB of float32 tensors; {args.runs} timed saves per mode after one warm-up\n")
    print(table(rows))
    print(f"\nsave blocks {100 * ratio:.1f} % of a synchronous save (goal: at most 5 %)")
    print(f"RSS the Checkpointer adds above the state: {extra:.0f} MiB = state + {extra - state:.0f} MiB (goal: state + 256 MiB at most)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
