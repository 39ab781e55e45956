"""Vault speed and memory against the tools people use today, in one run on the same data.

    python bench/bench_vault.py                 # 1 GiB in 4 files, 50 000 files of 4 KiB
    python bench/bench_vault.py --gib 0.25 --small-files 10000   # quicker

Workloads and baselines (issue 2):
- 1 GiB of checkpoint-like random data in 4 files: `liferaft snapshot` vs `cp -r`
  (the page cache's limit: it never waits for the disk), `cp -r && sync`, the disk's
  floor for any durable copy (`dd oflag=direct conv=fsync`, one per file, at once),
  `tar czf` (what the old colab_utils did) and `zip -r`;
- the same snapshot again, unchanged;
- restore of that snapshot vs `cp -r`, warm (both sources in the page cache) and cold
  (neither: dropped with POSIX_FADV_DONTNEED, as on a machine that just started);
- 50 000 files of 4 KiB: snapshot and restore vs `zip -r` / `unzip -qq`;
- peak RSS of every liferaft process.
Every command runs as its own child process. Except in the cold pair, the page cache is
warm for all of them (the data was just written; a local vault writes its packs past the
page cache, so they are read once, untimed, before the warm restore), so the comparison
is CPU and write path, not cold reads.

On a VM whose host backs guest memory lazily (this one: the first touch of a page that
was free for a few seconds costs 2-10 us), a 1 GiB copy takes anywhere from 0.3 s to 4 s
depending on which tool meets unbacked pages first. So before each large timed command,
liferaft's and the baselines' alike, a child touches --prime-gib of memory and exits, and
every measure takes the best of --repeat runs. --prime-gib 0 shows the raw behaviour.

The unchanged snapshot is reported twice: as a new CLI process (interpreter start-up and
imports included; `liferaft --version` is shown beside it) and as the snapshot's own work,
measured in process against a first snapshot also measured in process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timing, compile_bytecode, drop, evict, liferaft_argv, run, sync, table, warm


def make_big(root: Path, total: int, files: int = 4) -> None:
    root.mkdir(parents=True)
    per = total // files
    block = 16 << 20
    for i in range(files):
        with open(root / f"shard-{i}.bin", "wb") as f:
            left = per
            while left:
                n = min(block, left)
                f.write(os.urandom(n))
                left -= n


def make_small(root: Path, count: int, size: int = 4096) -> None:
    root.mkdir(parents=True)
    per_dir = 1000
    for i in range(count):
        d = root / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir()
        # Text-like, so zip has something to compress, as real small files do.
        line = f"sample {i} label {i % 10} " * 8
        (d / f"{i:06d}.txt").write_bytes((line.encode() * (size // len(line) + 1))[:size])


IN_PROCESS = """
import sys, time, liferaft
vault = liferaft.Vault(sys.argv[1])
t = time.perf_counter()
snap = vault.snapshot([sys.argv[2]], run="big", skip_unchanged=True)
assert snap.unchanged, "expected an unchanged tree"
print(f"{time.perf_counter() - t:.6f}")
"""

IN_PROCESS_FIRST = """
import sys, time, liferaft
vault = liferaft.Vault(sys.argv[1])
t = time.perf_counter()
snap = vault.snapshot([sys.argv[2]], run="big", use_cache=False)
assert snap.stats["files_read"] == 4, snap.stats
print(f"{time.perf_counter() - t:.6f}")
"""


def prime(gib: float) -> None:
    """Have the host back this much guest memory again, just before a timed command."""
    if gib > 0:
        size = int(gib * (1 << 30))
        touch = f"b = bytearray({size}); b[::4096] = bytes(len(b) // 4096 + (len(b) % 4096 > 0))"
        subprocess.run([sys.executable, "-c", touch], check=False)


def run_timed_inside(name: str, argv: list[str], env: dict[str, str]) -> Timing:
    """A child that prints its own timing of the work (no interpreter start-up)."""
    full = dict(os.environ)
    full.update(env)
    out = subprocess.run(argv, env=full, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{name} failed: {out.stderr[-2000:]}", file=sys.stderr)
        return Timing(name, float("inf"), 0.0, out.returncode)
    return Timing(name, float(out.stdout.strip().splitlines()[-1]), 0.0, 0)


ALL: dict[str, list[float]] = {}  # every run's seconds, for the medians


def best(table: dict[str, Timing], key: str, timing: Timing) -> None:
    if timing.returncode == 0:
        ALL.setdefault(key, []).append(timing.seconds)
    if key not in table or (timing.returncode == 0 and timing.seconds < table[key].seconds):
        table[key] = timing


def median(key: str, results: dict[str, Timing]) -> float:
    runs = sorted(ALL.get(key) or [results[key].seconds])
    mid = len(runs) // 2
    return runs[mid] if len(runs) % 2 else (runs[mid - 1] + runs[mid]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the big workload in GiB")
    ap.add_argument("--small-files", type=int, default=50_000)
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--skip-slow-baselines", action="store_true", help="skip tar czf and zip on the big data")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each big-data measurement; the best counts")
    ap.add_argument(
        "--prime-gib",
        type=float,
        default=2.5,
        help="before each large timed command, touch this much memory in a child (0: never), so no tool meets unbacked VM pages",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="liferaft-bench-", dir=args.dir))
    env = {"LIFERAFT_CACHE_DIR": str(scratch / "cache")}
    compile_bytecode(env)
    results: dict[str, Timing] = {}
    try:
        big = scratch / "big"
        make_big(big, int(args.gib * (1 << 30)))
        sync()
        vault = scratch / "vault"
        t = results
        # The disk's floor for any durable copy: the bytes written past the page cache
        # (O_DIRECT) and fsynced, one dd per file. cp -r never waits for the disk.
        floor = scratch / "floor"
        floor_cmd = (
            f"mkdir -p '{floor}' && for f in '{big}'/*; do "
            f'dd if="$f" of=\'{floor}\'/"$(basename "$f")" bs=4M oflag=direct conv=fsync status=none & done; wait'
        )
        time.sleep(1.1)  # files younger than a second are not trusted by the stat cache
        for _attempt in range(args.repeat):
            prime(args.prime_gib)
            best(t, "cp", run("cp -r (page cache, not durable)", ["cp", "-r", str(big), str(scratch / "cp-copy")]))
            drop(scratch / "cp-copy")
            sync()
            prime(args.prime_gib)
            best(t, "cpsync", run("cp -r && sync (durable)", ["sh", "-c", f"cp -r '{big}' '{scratch / 'cp-copy'}' && sync"]))
            drop(scratch / "cp-copy")
            sync()
            prime(args.prime_gib)
            best(t, "floor", run("dd oflag=direct conv=fsync, 4 at once (durable write floor)", ["sh", "-c", floor_cmd]))
            drop(scratch / "floor")
            sync()
            drop(vault)
            drop(scratch / "cache")
            snap_argv = liferaft_argv("--vault", str(vault), "-q", "snapshot", str(big), "--run", "big")
            prime(args.prime_gib)
            best(t, "snap", run("liferaft snapshot", snap_argv, env=env))
            sync()
            best(t, "snap2", run("liferaft snapshot (unchanged)", snap_argv, env=env))
            best(t, "startup", run("liferaft --version (start-up alone)", liferaft_argv("--version"), env=env))
            best(
                t,
                "snap2api",
                run_timed_inside("Vault.snapshot (unchanged, in process)", [sys.executable, "-c", IN_PROCESS, str(vault), str(big)], env),
            )
            restore_argv = liferaft_argv("--vault", str(vault), "-q", "restore", "--run", "big", "--to", str(scratch / "restored"))
            warm(vault)  # a local vault's packs are written past the page cache; cp's source is cached
            prime(args.prime_gib)
            best(t, "restore", run("liferaft restore", restore_argv, env=env))
            drop(scratch / "restored")
            sync()
            # Cold: neither the vault nor cp's source in the page cache, as on a machine
            # that has just started (a persistent disk, a mounted volume).
            evict(big)
            prime(args.prime_gib)
            best(t, "cpcold", run("cp -r (cold source)", ["cp", "-r", str(big), str(scratch / "cp-copy")]))
            drop(scratch / "cp-copy")
            evict(vault)
            prime(args.prime_gib)
            best(t, "restorecold", run("liferaft restore (cold vault)", restore_argv, env=env))
            drop(scratch / "restored")
            sync()
            warm(big)
            drop(scratch / "vault-api")
            prime(args.prime_gib)
            best(
                t,
                "snapapi",
                run_timed_inside(
                    "Vault.snapshot (first, in process)",
                    [sys.executable, "-c", IN_PROCESS_FIRST, str(scratch / "vault-api"), str(big)],
                    env,
                ),
            )
            drop(scratch / "vault-api")
            sync()
        if not args.skip_slow_baselines:
            prime(args.prime_gib)
            t["tar"] = run("tar czf", ["tar", "czf", str(scratch / "big.tgz"), "-C", str(scratch), "big"])
            drop(scratch / "big.tgz")
            prime(args.prime_gib)
            t["zip"] = run("zip -r", ["zip", "-qr", str(scratch / "big.zip"), "big"], cwd=scratch)
            drop(scratch / "big.zip")
        drop(big)
        drop(vault)
        sync()

        small = scratch / "small"
        make_small(small, args.small_files)
        sync()
        prime(args.prime_gib)
        t["ssnap"] = run(
            "liferaft snapshot (small files)", liferaft_argv("--vault", str(vault), "-q", "snapshot", str(small), "--run", "small"), env=env
        )
        prime(args.prime_gib)
        t["zip_small"] = run("zip -r (small files)", ["zip", "-qr", str(scratch / "small.zip"), "small"], cwd=scratch)
        prime(args.prime_gib)
        t["srestore"] = run(
            "liferaft restore (small files)",
            liferaft_argv("--vault", str(vault), "-q", "restore", "--run", "small", "--to", str(scratch / "srestored")),
            env=env,
        )
        (scratch / "unz").mkdir()
        prime(args.prime_gib)
        t["unzip"] = run("unzip -qq (small files)", ["unzip", "-qq", str(scratch / "small.zip"), "-d", str(scratch / "unz")])
    finally:
        drop(scratch)

    if results.get("floor") and results["floor"].returncode != 0:
        del results["floor"]  # no O_DIRECT here (tmpfs, some FUSE mounts): no floor to show
    if any(x.returncode != 0 for x in results.values()):
        return 1
    gib = args.gib
    cp = results["cp"].seconds
    ratios = {
        "snapshot speed vs cp -r (goal >= 0.5)": cp / results["snap"].seconds,
        "snapshot speed vs cp -r && sync": results["cpsync"].seconds / results["snap"].seconds,
        **(
            {
                "snapshot speed vs the durable write floor (dd oflag=direct)": results["floor"].seconds / results["snap"].seconds,
                # What any durable copy could reach against cp -r on this disk: the
                # snapshot-vs-cp goal is out of reach wherever this is under 0.5.
                "the durable write floor's speed vs cp -r": cp / results["floor"].seconds,
            }
            if "floor" in results
            else {}
        ),
        "unchanged snapshot / first, snapshot work in process (goal <= 0.03)": results["snap2api"].seconds / results["snapapi"].seconds,
        "unchanged snapshot / first, as CLI processes (start-up included)": results["snap2"].seconds / results["snap"].seconds,
        "restore speed vs cp -r (goal >= 0.5)": cp / results["restore"].seconds,
        "cold: restore speed vs cp -r (goal >= 0.5)": results["cpcold"].seconds / results["restorecold"].seconds,
        "medians: snapshot speed vs cp -r": median("cp", results) / median("snap", results),
        "medians: restore speed vs cp -r": median("cp", results) / median("restore", results),
        "small files: snapshot speed vs zip -r": results["zip_small"].seconds / results["ssnap"].seconds,
        "small files: restore speed vs unzip": results["unzip"].seconds / results["srestore"].seconds,
    }
    if "tar" in results:
        ratios["snapshot speedup vs tar czf (goal >= 10)"] = results["tar"].seconds / results["snap"].seconds
        ratios["snapshot speedup vs zip -r"] = results["zip"].seconds / results["snap"].seconds
    peak = max(v.peak_rss_mib for k, v in results.items() if k in ("snap", "snap2", "restore", "restorecold", "ssnap", "srestore"))
    if args.json:
        print(
            json.dumps(
                {
                    "gib": gib,
                    "small_files": args.small_files,
                    "timings": {k: v.__dict__ for k, v in results.items()},
                    "ratios": ratios,
                    "peak_rss_mib": peak,
                },
                indent=2,
            )
        )
        return 0
    rows = [("workload", "best s", "median s", "MiB/s (best)", "peak RSS MiB")]
    sizes = dict.fromkeys(["cp", "cpsync", "floor", "snap", "snapapi", "snap2", "restore", "cpcold", "restorecold", "tar", "zip"], gib)
    for k, v in results.items():
        rate = f"{sizes[k] * 1024 / v.seconds:.0f}" if k in sizes else ""
        rss = f"{v.peak_rss_mib:.0f}" if v.peak_rss_mib else "(in process)"
        rows.append((v.name, f"{v.seconds:.3f}", f"{median(k, results):.3f}" if k in ALL else "", rate, rss))
    print(
        f"data: {gib:g} GiB in 4 random files; {args.small_files} files of 4 KiB; {os.cpu_count()} cores; "
        f"best of {args.repeat}; memory primed with {args.prime_gib:g} GiB before each large command"
    )
    print(table(rows))
    print()
    print(table([("ratio", "value")] + [(k, f"{v:.3f}") for k, v in ratios.items()]))
    print(f"peak RSS of liferaft (goal < 300 MiB): {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
