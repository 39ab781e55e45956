"""Cloud vault speed against the raw client, on each loopback server, in one run.

    python bench/bench_cloud.py                                  # 512 MiB in 4 files, 20 000 files of 4 KiB
    python bench/bench_cloud.py --mib 128 --small-files 5000     # quicker
    python bench/bench_cloud.py --servers moto gcs --runs 3

Servers (tests/servers.py): moto server (S3), ``rclone serve s3`` (S3), fake-gcs-server
(GCS), each on 127.0.0.1. Workloads (issue 5):

- big: N MiB of random data in 4 files. ``Vault.snapshot`` into a fresh vault vs the raw
  fsspec client (s3fs / gcsfs) putting the same 4 files (``fs.put(dir, prefix,
  recursive=True)``, its own multipart / concurrency). Goal: liferaft >= 0.8x the raw rate.
- small: 20 000 files of 4 KiB. ``Vault.snapshot`` vs putting them one by one with the
  raw client (``fs.put_file`` per file: what syncing a folder to a bucket does). Goal:
  liferaft >= 20x faster. One-by-one is slow (tens of ms a file), so by default it runs on
  a sample of ``--sample`` files and the time is scaled to all of them (said in the output).
- history: a vault with ``--history`` snapshots, each adding a file (one manifest and one
  index fragment each). What every command pays before its work: opening the vault and
  reading all manifests and the index, on a fresh machine (empty cache folder), on the
  same machine again (its local copies), and on a fresh machine after ``prune`` merged
  the fragments; the raw client listing both folders is the floor.

Both sides run in this process with the same client settings, after a warm-up of each
(this VM pays dearly for the first touch of fresh memory); best of ``--runs``. Each run
writes to a fresh vault / prefix, deleted afterwards. Loopback servers measure the
client and the server's own cost, not a WAN: the ratios are what this bench is for.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import liferaft  # noqa: E402
from servers import _CLEARED, KINDS, StoreServer, start_server  # noqa: E402


def make_big(root: Path, total: int, files: int = 4) -> None:
    root.mkdir(parents=True)
    per = total // files
    for i in range(files):
        with open(root / f"shard-{i}.bin", "wb") as f:
            left = per
            while left:
                n = min(16 << 20, left)
                f.write(os.urandom(n))
                left -= n


def make_small(root: Path, count: int, size: int = 4096) -> list[Path]:
    root.mkdir(parents=True)
    out = []
    for i in range(count):
        d = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir()
        p = d / f"{i:06d}.txt"
        line = f"sample {i} label {i % 10} " * 8
        p.write_bytes((line.encode() * (size // len(line) + 1))[:size])
        out.append(p)
    return out


def point_at(server: StoreServer) -> None:
    for name in _CLEARED:
        os.environ.pop(name, None)
    os.environ.update(server.env())


def cleanup(fs: Any, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def liferaft_snapshot(server: StoreServer, src: Path, raw: Any) -> float:
    url = server.vault_url()
    seconds = timed(lambda: liferaft.Vault(url).snapshot([src], run="bench", skip_unchanged=False))
    cleanup(raw, url.split("://", 1)[1])
    return seconds


def raw_put_tree(server: StoreServer, src: Path, raw: Any) -> float:
    prefix = f"{server.bucket}/raw-{uuid.uuid4().hex[:12]}"
    seconds = timed(lambda: raw.put(str(src), prefix, recursive=True))
    cleanup(raw, prefix)
    return seconds


def raw_put_one_by_one(server: StoreServer, files: list[Path], base: Path, raw: Any) -> float:
    prefix = f"{server.bucket}/raw-{uuid.uuid4().hex[:12]}"

    def go() -> None:
        for f in files:
            raw.put_file(str(f), f"{prefix}/{f.relative_to(base).as_posix()}")

    seconds = timed(go)
    cleanup(raw, prefix)
    return seconds


def bench_history(server: StoreServer, raw: Any, count: int, runs: int, scratch: Path) -> dict[str, Any]:
    url = server.vault_url()
    prefix = url.split("://", 1)[1]
    saved = os.environ["LIFERAFT_CACHE_DIR"]
    work = scratch / f"history-{server.kind}"
    work.mkdir()
    vault = liferaft.Vault(url)
    for i in range(count):
        (work / f"metrics-{i}.txt").write_text(f"step {i}\n" * 100)
        vault.snapshot([work], run="history", step=i)
    fresh_dirs = iter(range(10**6))

    def start(cache: Path) -> float:
        os.environ["LIFERAFT_CACHE_DIR"] = str(cache)

        def go() -> None:
            v = liferaft.Vault(url)
            assert len(v.snapshots()) == count
            v.repository().index()

        return timed(go)

    def fresh() -> float:
        return start(scratch / f"fresh-machine-{next(fresh_dirs)}")

    try:
        cold = min(fresh() for _ in range(runs))
        start(scratch / "same-machine")
        warm = min(start(scratch / "same-machine") for _ in range(runs))
        listing = min(
            timed(lambda: (raw.ls(f"{prefix}/snapshots", refresh=True), raw.ls(f"{prefix}/index", refresh=True))) for _ in range(runs)
        )
        os.environ["LIFERAFT_CACHE_DIR"] = str(scratch / "pruner")
        liferaft.Vault(url).prune(wait=0)
        fragments = len(raw.ls(f"{prefix}/index", refresh=True))
        merged = min(fresh() for _ in range(runs))
    finally:
        os.environ["LIFERAFT_CACHE_DIR"] = saved
        cleanup(raw, prefix)
    return {
        "snapshots": count,
        "cold_s": cold,
        "warm_s": warm,
        "merged_cold_s": merged,
        "fragments_after_prune": fragments,
        "raw_list_s": listing,
    }


def bench_one(server: StoreServer, big: Path, small: Path, small_files: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    point_at(server)
    server.make_bucket(server.bucket)
    raw = server.raw_fs()
    big_bytes = sum(p.stat().st_size for p in big.iterdir())
    out: dict[str, Any] = {"server": server.kind}
    if big_bytes:
        liferaft_snapshot(server, big, raw)  # warm-ups: pack buffers, connections, server caches
        raw_put_tree(server, big, raw)
        lf = min(liferaft_snapshot(server, big, raw) for _ in range(args.runs))
        rw = min(raw_put_tree(server, big, raw) for _ in range(args.runs))
        out["big"] = {
            "bytes": big_bytes,
            "liferaft_s": lf,
            "raw_s": rw,
            "liferaft_mib_s": big_bytes / lf / 2**20,
            "raw_mib_s": big_bytes / rw / 2**20,
            "ratio": rw / lf,
        }
    if small_files:
        sample = small_files[: args.sample] if args.sample else small_files
        raw_put_one_by_one(server, sample[:50], small, raw)  # warm-up
        lf = min(liferaft_snapshot(server, small, raw) for _ in range(args.small_runs))
        rw_sample = raw_put_one_by_one(server, sample, small, raw)
        rw = rw_sample * len(small_files) / len(sample)
        out["small"] = {
            "files": len(small_files),
            "liferaft_s": lf,
            "raw_s": rw,
            "raw_sampled_files": len(sample),
            "liferaft_files_s": len(small_files) / lf,
            "raw_files_s": len(sample) / rw_sample,
            "speedup": rw / lf,
        }
    if args.history:
        out["history"] = bench_history(server, raw, args.history, args.runs, args.scratch)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="size of the big workload in MiB (4 files); 0 skips it")
    ap.add_argument("--small-files", type=int, default=20_000, help="number of 4 KiB files; 0 skips them")
    ap.add_argument("--sample", type=int, default=1000, help="files put one by one for the baseline, scaled up (0: all)")
    ap.add_argument("--runs", type=int, default=3, help="best of this many runs (big workload)")
    ap.add_argument("--small-runs", type=int, default=2, help="best of this many liferaft runs (small workload)")
    ap.add_argument("--history", type=int, default=200, help="snapshots in the start-up workload; 0 skips it")
    ap.add_argument("--servers", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="liferaft-bench-cloud-", dir=args.dir))
    args.scratch = scratch
    os.environ["LIFERAFT_CACHE_DIR"] = str(scratch / "cache")
    servers: list[StoreServer] = []
    results = []
    try:
        big = scratch / "big"
        if args.mib:
            make_big(big, args.mib << 20)
        else:
            big.mkdir()
        small = scratch / "small"
        small_files = make_small(small, args.small_files) if args.small_files else []
        for kind in args.servers:
            server = start_server(kind)
            servers.append(server)
            results.append(bench_one(server, big, small, small_files, args))
            server.stop()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"loopback servers, {os.cpu_count()} CPUs; best of {args.runs} (big) / {args.small_runs} (small) after a warm-up")
    for r in results:
        if "big" in r:
            b = r["big"]
            verdict = "ok" if b["ratio"] >= 0.8 else "BELOW GOAL"
            print(
                f"{r['server']:>6}  big   {b['bytes'] / 2**20:.0f} MiB in 4 files: liferaft {b['liferaft_s']:.2f}s ({b['liferaft_mib_s']:.0f} MiB/s)"
                f"  raw put {b['raw_s']:.2f}s ({b['raw_mib_s']:.0f} MiB/s)  ratio {b['ratio']:.2f}x (goal >= 0.8: {verdict})"
            )
        if "small" in r:
            s = r["small"]
            verdict = "ok" if s["speedup"] >= 20 else "BELOW GOAL"
            scaled = "" if s["raw_sampled_files"] == s["files"] else f", scaled from {s['raw_sampled_files']} files"
            print(
                f"{r['server']:>6}  small {s['files']} x 4 KiB: liferaft {s['liferaft_s']:.2f}s ({s['liferaft_files_s']:.0f} files/s)"
                f"  raw one by one {s['raw_s']:.1f}s ({s['raw_files_s']:.0f} files/s{scaled})  {s['speedup']:.0f}x faster (goal >= 20: {verdict})"
            )
        if "history" in r:
            h = r["history"]
            print(
                f"{r['server']:>6}  start with {h['snapshots']} snapshots (open, all manifests, index): fresh machine {h['cold_s']:.2f}s"
                f"  same machine again {h['warm_s']:.2f}s ({h['cold_s'] / h['warm_s']:.1f}x)"
                f"  fresh machine after prune ({h['fragments_after_prune']} fragment(s)) {h['merged_cold_s']:.2f}s"
                f"  raw listing of both folders {h['raw_list_s']:.2f}s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
