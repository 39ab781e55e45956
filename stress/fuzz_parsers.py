#!/usr/bin/env python3
"""Fuzz every parser of stored bytes for longer than the test suite does.

Two engines, the same contract as ``tests/test_fuzz.py``: each parser returns
well-formed values or raises ``VaultCorrupt`` (the config parser also
``VaultFormatTooNew``), never anything else.

    python stress/fuzz_parsers.py --count 20000             # hypothesis: ~20000 random examples per property
    python stress/fuzz_parsers.py --count 5000 -k tree       # only the properties whose name has "tree"
    python stress/fuzz_parsers.py --atheris tree --seconds 120   # coverage-guided (pip install atheris)
    python stress/fuzz_parsers.py --atheris all --seconds 600    # every target, the time shared

Hypothesis mode runs the properties of tests/test_fuzz.py under pytest with
``LIFERAFT_FUZZ_SCALE`` (examples = count/200 times the suite's) and
``LIFERAFT_FUZZ_RANDOM=1`` (a fresh random seed each run; hypothesis prints the seed
and the smallest failing input). Its exit status is pytest's.

Atheris mode drives one parser with libFuzzer from a seed corpus of valid
encodings. A crash writes ``crash-<sha1>`` in the working folder and exits non-zero;
replay it with ``--atheris TARGET --replay FILE``. No input is skipped: the bug
classes fuzzing found (zstd frames that lie about their size, ids only int() reads
as hex, config nesting/Infinity) are fixed, and fuzzed like everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("manifest", "index", "tree", "pack", "doc", "blob", "decompress", "config", "paths")
BASE_EXAMPLES = 200  # the suite's count for the main fuzz properties


def run_hypothesis(count: int, keyword: str | None, extra: list[str]) -> int:
    env = dict(os.environ, LIFERAFT_FUZZ_SCALE=str(max(count, 1) / BASE_EXAMPLES), LIFERAFT_FUZZ_RANDOM="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "0", str(ROOT / "tests" / "test_fuzz.py")]
    if keyword:
        cmd += ["-k", keyword]
    cmd += ["-o", "addopts=-ra --strict-markers", "--hypothesis-show-statistics", *extra]
    print("+", " ".join(cmd), f"(LIFERAFT_FUZZ_SCALE={env['LIFERAFT_FUZZ_SCALE']})", flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


# ---------------------------------------------------------------- atheris


def _load() -> Any:
    """tests/test_fuzz.py's well-formedness checks and references (it imports conftest)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]
    import test_fuzz

    return test_fuzz


def seeds(target: str) -> list[bytes]:
    """Valid encodings to start from (libFuzzer mutates them)."""
    from liferaft.vault import format as fmt

    tree = [
        fmt.Entry("r", "d", 0o755, 1),
        fmt.Entry("r/a.txt", "f", 0o644, 2, 5, ["ab" * 32]),
        fmt.Entry("r/sub", "d", 0o700, 3),
        fmt.Entry("r/sub/ln", "l", 0o777, 4, target="../a.txt"),
        fmt.Entry("r/empty", "f", 0o600, 5),
    ]
    manifest = {
        "v": 1,
        "run": "mnist",
        "step": 1200,
        "tags": {"k": "v"},
        "metrics": {"loss": 0.31},
        "time_ns": 1_700_000_000_000_000_000,
        "host": "colab",
        "parent": "cd" * 32,
        "roots": [{"name": "r", "source": "/content/r", "type": "d"}],
        "tree": ["ef" * 32],
        "stats": {"files": 2},
    }
    entries = [fmt.PackEntry(fmt.digest(b"hello"), 0, 0, 5, 5), fmt.PackEntry(fmt.digest(b"x" * 300), 1, 5, 0, 300)]
    packed = fmt.compress(b"x" * 300)
    entries[1] = fmt.PackEntry(entries[1].blob_id, 1, 5, len(packed), 300)
    pack = b"hello" + packed + fmt.build_pack_header(b"\1" * 16, entries)
    index = fmt.build_index({"12" * 32: (len(pack), entries)}, "00ff")
    config = json.dumps(
        {"format": 1, "id": "0" * 32, "hash": "blake3", "pack_size": 32 << 20,
         "chunker": {"name": "fastcdc2020", "min": 262144, "avg": 1048576, "max": 4194304, "seed": 7, "small_file": 1048576}},
    ).encode()  # fmt: skip
    blob = b"liferaft " * 50
    return {
        "manifest": [fmt.encode_doc(manifest, compressed=False), fmt.encode_doc(manifest)],
        "index": [index, fmt.encode_doc({"v": 1, "packs": {}}, compressed=False)],
        "tree": [fmt.encode_tree(tree)],
        "pack": [b"\1" + pack, b"\0" + (len(pack)).to_bytes(4, "little") + pack],
        "doc": [fmt.encode_doc(manifest), fmt.encode_doc([1, 2, {"a": None}], compressed=False)],
        "blob": [b"\x81" + len(blob).to_bytes(3, "little") + fmt.compress(blob), b"\x80" + (5).to_bytes(3, "little") + b"hello"],
        "decompress": [len(blob).to_bytes(3, "little") + fmt.compress(blob)],
        "config": [config],
        "paths": [b"r/sub/ln\n../a.txt", b"a/../b\n/etc/passwd"],
    }[target]


def harness(target: str) -> Any:
    tf = _load()
    from liferaft.errors import VaultCorrupt, VaultFormatTooNew
    from liferaft.vault import format as fmt
    from liferaft.vault.repository import Repository

    def run(data: bytes) -> None:
        if target == "manifest":
            tf.check_manifest(fmt.parse_manifest(data))
        elif target == "index":
            tf.check_index(fmt.parse_index(data))
        elif target == "tree":
            tf.check_tree(fmt.parse_tree(data))
        elif target == "doc":
            fmt.decode_doc(data, "document")
        elif target == "pack":
            if len(data) < 5:
                return
            tail = data[5:] if data[0] & 1 == 0 else data[1:]
            size = int.from_bytes(data[1:5], "little") if data[0] & 1 == 0 else len(tail)
            tf.check_pack(fmt.parse_pack_header(tail, size), size, len(tail))
        elif target in ("blob", "decompress"):
            head = 4 if target == "blob" else 3
            if len(data) < head:
                return
            raw_length = int.from_bytes(data[head - 3 : head], "little")
            stored = data[head:]
            if target == "decompress":
                out = fmt.decompress(stored, raw_length)
                assert len(out) == raw_length
            else:
                codec = data[0] & 0x7F
                codec = codec if codec < 4 else codec + 250
                plain = stored if codec != fmt.CODEC_ZSTD else None
                if plain is None:
                    try:
                        plain = fmt.decompress(stored, raw_length)
                    except VaultCorrupt:
                        plain = b""
                blob_id = fmt.digest(plain) if data[0] & 0x80 else bytes(32)
                out = fmt.unpack_blob(blob_id, codec, stored, raw_length)
                assert len(out) == raw_length and fmt.digest(out) == blob_id
        elif target == "config":
            config = Repository._parse_config(data, "fuzz://vault")
            assert isinstance(config, dict) and isinstance(config["format"], int)
        elif target == "paths":
            text = data.decode("utf-8", "replace")
            path, _, link_target = text.partition("\n")
            try:
                fmt.check_rel_path(path)
                accepted = True
            except VaultCorrupt:
                accepted = False
            assert accepted == tf.reference_safe(path), repr(path)
            if accepted and link_target:
                escapes = fmt.link_escapes(path, link_target)
                if tf.reference_escapes(path, link_target):
                    assert escapes, (path, link_target)
                if tf._climbs_only_first(link_target):
                    assert escapes == tf.reference_escapes(path, link_target), (path, link_target)

    def one(data: bytes) -> None:
        try:
            run(data)
        except (VaultCorrupt, VaultFormatTooNew) as err:
            assert "\n" not in str(err), repr(err)

    return one


def run_atheris(target: str, seconds: int, runs: int, replay: str | None) -> int:
    if target == "all":
        share = max(1, seconds // len(TARGETS))
        worst = 0
        for t in TARGETS:
            cmd = [sys.executable, __file__, "--atheris", t, "--seconds", str(share)]
            if runs:
                cmd += ["--runs", str(runs)]
            print("+", " ".join(cmd), flush=True)
            worst = max(worst, subprocess.call(cmd))
        return worst
    if replay:
        harness(target)(Path(replay).read_bytes())
        print(f"{replay}: no failure")
        return 0
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris (or use the hypothesis mode)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "src"))
    with atheris.instrument_imports(include=["liferaft"]):  # coverage of liferaft only: fast to set up
        import liferaft.vault.format
        import liferaft.vault.repository  # noqa: F401
    one = harness(target)
    corpus = Path(tempfile.mkdtemp(prefix=f"liferaft-fuzz-{target}-"))
    for i, seed in enumerate(seeds(target)):
        (corpus / f"seed-{i}").write_bytes(seed)
    args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        "-rss_limit_mb=3072",
        "-timeout=20",
        "-max_len=65536",
        "-print_final_stats=1",
    ]
    if runs:
        args.append(f"-runs={runs}")
    atheris.Setup(args, one)
    atheris.Fuzz()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=3000, help="hypothesis examples per main property (the suite uses 200)")
    ap.add_argument("-k", dest="keyword", help="only properties whose name matches (pytest -k)")
    ap.add_argument("--atheris", choices=[*TARGETS, "all"], help="coverage-guided fuzzing of one parser instead")
    ap.add_argument("--seconds", type=int, default=60, help="atheris: time budget (shared by all targets with 'all')")
    ap.add_argument("--runs", type=int, default=0, help="atheris: stop after this many inputs (0: time only)")
    ap.add_argument("--replay", metavar="FILE", help="atheris: run one saved input (a crash file) through the target")
    opts, extra = ap.parse_known_args()
    if opts.atheris:
        return run_atheris(opts.atheris, opts.seconds, opts.runs, opts.replay)
    return run_hypothesis(opts.count, opts.keyword, extra)


if __name__ == "__main__":
    sys.exit(main())
