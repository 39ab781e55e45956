"""Fuzzing every parser of stored bytes (in the spirit of restic's fuzz tests).

Each parser in ``liferaft.vault.format`` (and the config parser) takes bytes an
attacker or a failing disk may have written. Fed random bytes, mutated valid
documents and structurally mutated JSON, each must return well-formed values or
raise ``VaultCorrupt`` (the config parser also ``VaultFormatTooNew``): never another
exception, never a hang, never memory out of proportion to what it was asked for.

Examples are few and derandomized here so the suite is fast and reproducible;
``stress/fuzz_parsers.py`` runs the same properties with many more random examples
(``LIFERAFT_FUZZ_SCALE``, ``LIFERAFT_FUZZ_RANDOM``).

The bug classes fuzzing found (zstd frames that lie about their size, ids only
``int(x, 16)`` reads as hex, names and link targets holding U+0085/U+2028/U+2029,
config nesting, Infinity and values of the wrong type) are fixed; the broad
properties generate them again, and each keeps a targeted test of its own.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
import struct
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import liferaft
from conftest import make_tree
from liferaft.backends import open_backend
from liferaft.errors import LiferaftError, VaultCorrupt, VaultFormatTooNew
from liferaft.vault import format as fmt
from liferaft.vault.repository import Repository, info_from_manifest, pack_name

SCALE = float(os.environ.get("LIFERAFT_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("LIFERAFT_FUZZ_RANDOM") == "1"


def fuzz(n: int, **kw: Any) -> settings:
    """Settings for a property: ``n`` examples (times ``LIFERAFT_FUZZ_SCALE``), no deadline."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        **kw,
    )


MiB = 1 << 20
SLACK = 16 * MiB  # interpreter noise on top of what a call may legitimately allocate
CALL_SECONDS = 10.0  # per call, on a shared 2-core machine; a hang takes far longer
HEX_RE = re.compile(r"[0-9a-f]{64}")


def guarded(
    fn: Callable[..., Any], *args: Any, mem: int = 64 * MiB, allowed: tuple[type[BaseException], ...] = (VaultCorrupt,)
) -> tuple[Any, BaseException | None]:
    """Run one parser call: only ``allowed`` errors, bounded time and traced memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result, err = fn(*args), None
    except allowed as e:
        result, err = None, e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    assert elapsed < CALL_SECONDS, f"{fn.__name__} took {elapsed:.1f}s"
    assert peak < mem + SLACK, f"{fn.__name__} allocated {peak >> 20} MiB"
    if err is not None:
        assert str(err) and "\n" not in str(err), f"error is not one line: {err!r}"
    return result, err


# ---------------------------------------------------------------- strategies

hex_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10
)

TRICKY: list[Any] = [
    None, True, False, 0, -1, 1, 7, 0o7777, 0o10000, 2**31, 2**32, 2**62, 2**62 + 1, 2**64, -(2**63), 10**30, 0.5, -0.0, 1e308,
    "", ".", "..", "../x", "../../etc/passwd", "/abs", "a/b", "a//b", "a/", "a\x00b", "a\\b", "c:", "c:/x", "x" * 5000,
    "f" * 64, "F" * 64, "g" * 64, "a" * 63, "a" * 65, "d", "f", "l", "h", [], {}, [1], {"a": 1}, ["f" * 64], [[]],
]  # fmt: skip
values = st.sampled_from(TRICKY).map(copy.deepcopy) | json_values | hex_ids  # copies: mutations must not reach TRICKY

# Strings that int(x, 16) accepts but bytes.fromhex does not: never valid ids.
HEXISH = [
    "0x" + "a" * 62,
    "0X" + "b" * 62,
    "+" + "c" * 63,
    "-" + "d" * 63,
    " " + "e" * 63,
    "f" * 63 + "\t",
    "a" + "_a" * 31 + "a",
    "٣" * 64,
    "０" * 64,
]
hexish = st.sampled_from(HEXISH) | st.builds(lambda h, p: p + h[len(p) :], hex_ids, st.sampled_from(["0x", "+", "-", " ", "\n", "٠"]))

LINE_BREAKS = "\x85\u2028\u2029"  # str.splitlines breaks here; json.dumps does not escape them
name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00")  # line breaks included
entry_names = st.text(name_chars, min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))
names_with_breaks = st.builds(
    lambda a, b, c: a + b + c, st.text("abc", max_size=3), st.sampled_from(LINE_BREAKS), st.text("xyz", max_size=3)
)


def _root_ok(name: str) -> bool:
    return not (len(name) > 1 and name[1] == ":")


@st.composite
def entries_trees(draw: st.DrawFn, names: st.SearchStrategy[str] = entry_names) -> list[fmt.Entry]:
    """A valid tree: roots first, every entry inside a folder listed before it."""
    entries: list[fmt.Entry] = []
    seen: set[str] = set()
    dirs: list[str] = []

    def add(path: str) -> None:
        kind = draw(st.sampled_from("ffdl"))
        mode = draw(st.integers(0, 0o7777))
        mtime = draw(st.integers(-(1 << 62), 1 << 62))
        if kind == fmt.TYPE_DIR:
            entries.append(fmt.Entry(path, kind, mode, mtime))
            dirs.append(path)
        elif kind == fmt.TYPE_FILE:
            blobs = draw(st.lists(hex_ids, max_size=3))
            size = draw(st.integers(1, 1 << 40)) if blobs else 0
            entries.append(fmt.Entry(path, kind, mode, mtime, size, blobs))
        else:
            target = draw(st.text(min_size=1, max_size=30).filter(lambda t: "\x00" not in t))
            entries.append(fmt.Entry(path, kind, mode, mtime, target=target))
        seen.add(path)

    for root in draw(st.lists(names.filter(_root_ok), min_size=1, max_size=3, unique=True)):
        add(root)
    for _ in range(draw(st.integers(0, 12))):
        if not dirs:
            break
        path = f"{draw(st.sampled_from(dirs))}/{draw(names)}"
        if path not in seen:
            add(path)
    return entries


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    roots = [
        {"name": n, "source": draw(st.text(max_size=30)), "type": draw(st.sampled_from("fdl"))}
        for n in draw(st.lists(entry_names.filter(_root_ok), max_size=3, unique=True))
    ]
    return {
        "v": fmt.FORMAT_VERSION,
        "run": draw(st.text(max_size=fmt.RUN_MAX)),
        "step": draw(st.none() | st.integers(-(1 << 62), 1 << 62)),
        "tags": draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        "metrics": draw(st.dictionaries(st.text(max_size=8), st.integers() | st.floats(allow_nan=False, allow_infinity=False), max_size=3)),
        "time_ns": draw(st.integers(0, 1 << 62)),
        "host": draw(st.text(max_size=20)),
        "parent": draw(st.none() | hex_ids),
        "roots": roots,
        "tree": draw(st.lists(hex_ids, max_size=4)),
        "stats": draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    }


@st.composite
def index_docs(draw: st.DrawFn) -> dict[str, Any]:
    packs = {}
    for pid in draw(st.lists(hex_ids, max_size=3, unique=True)):
        size = draw(st.integers(0, 1 << 40))
        blobs = []
        for bid in draw(st.lists(hex_ids, max_size=4)):
            offset = draw(st.integers(0, size))
            length = draw(st.integers(0, size - offset))
            blobs.append([bid, draw(st.sampled_from(fmt.CODECS)), offset, length, draw(st.integers(0, fmt.MAX_BLOB * 4))])
        packs[pid] = {"size": size, "blobs": blobs}
    return {"v": fmt.FORMAT_VERSION, "nonce": draw(st.text("0123456789abcdef", max_size=16)), "packs": packs}


def _config_doc() -> dict[str, Any]:
    return {
        "format": fmt.FORMAT_VERSION,
        "id": uuid.uuid4().hex,
        "hash": "blake3",
        "chunker": {"name": "fastcdc2020", "min": 256 << 10, "avg": 1 << 20, "max": 4 << 20, "seed": 12345, "small_file": 1 << 20},
        "compression": "zstd",
        "pack_size": 32 << 20,
        "created": "2026-01-01T00:00:00Z",
        "created_by": "liferaft 0",
    }


def _slots(doc: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((doc, k))
            _slots(v, out)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((doc, i))
            _slots(v, out)
    return out


@st.composite
def mutated_docs(draw: st.DrawFn, base: st.SearchStrategy[Any], pool: st.SearchStrategy[Any] = values) -> Any:
    """A valid document with 1-3 values replaced, keys deleted or added."""
    doc = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc, [])
        if not slots or draw(st.integers(0, 15)) == 0:
            doc = draw(pool)
            continue
        container, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if op == "replace":
            container[key] = draw(pool)
        elif op == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.text(max_size=4))] = draw(pool)
        else:
            container.insert(key, draw(pool))
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with bit flips, byte sets, cuts, insertions or duplications."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate", "dup"]))
        n = len(data)
        if op in ("flip", "set") and n:
            i = draw(st.integers(0, n - 1))
            data[i] = data[i] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(st.integers(0, 255))
        elif op == "cut" and n:
            i = draw(st.integers(0, n - 1))
            del data[i : i + draw(st.integers(1, 16))]
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del data[draw(st.integers(0, n)) :]
        elif op == "dup" and n:
            i = draw(st.integers(0, n - 1))
            data[i:i] = data[i : i + draw(st.integers(1, 32))]
    return bytes(data)


def encoded(doc_strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Documents as stored: plain JSON or zstd-compressed JSON."""
    return st.builds(lambda d, c: fmt.encode_doc(d, compressed=c), doc_strategy, st.booleans())


# ---------------------------------------------------------------- zstd frames (for decompress and decode_doc)


def declared_size(data: bytes) -> int:
    """The content size a zstd frame header declares, or -1."""
    if data[:4] != fmt.ZSTD_MAGIC:
        return -1
    try:
        return zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        return -1


@st.composite
def zstd_frames(draw: st.DrawFn, lo: int = 0, hi: int = 1 << 20) -> bytes:
    """A hand-made zstd frame: random header flags, a declared content size in [lo, hi], random blocks."""
    single = draw(st.booleans())
    fcs_flag = draw(st.integers(0 if single else 1, 3))
    dict_flag = draw(st.integers(0, 3))
    fhd = (fcs_flag << 6) | (single << 5) | (draw(st.booleans()) << 2) | dict_flag
    out = bytearray(fmt.ZSTD_MAGIC) + bytes([fhd])
    if not single:
        out.append(draw(st.integers(0, 255)))
    out += draw(st.binary(min_size=(0, 1, 2, 4)[dict_flag], max_size=(0, 1, 2, 4)[dict_flag]))
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width:
        top = (1 << (8 * width)) - 1
        if width == 2:
            size = draw(st.integers(max(lo, 256), min(hi, top + 256))) if max(lo, 256) <= min(hi, top + 256) else 256
            out += struct.pack("<H", size - 256)
        else:
            out += draw(st.integers(lo, min(hi, top))).to_bytes(width, "little")
    for _ in range(draw(st.integers(0, 3))):
        last = draw(st.booleans())
        btype = draw(st.integers(0, 3))
        bsize = draw(st.integers(0, 64))
        out += ((bsize << 3) | (btype << 1) | last).to_bytes(3, "little")
        out += draw(st.binary(min_size=0, max_size=bsize if btype != 1 else 1))
    return bytes(out)


def valid_frames() -> st.SearchStrategy[tuple[bytes, bytes]]:
    return st.binary(max_size=3000).map(lambda b: (b * 3, fmt.compress(b * 3)))


# ---------------------------------------------------------------- well-formedness checks


def _usable_id(value: Any) -> bytes:
    assert isinstance(value, str) and HEX_RE.fullmatch(value), f"not a usable id: {value!r:.80}"
    raw = bytes.fromhex(value)
    assert len(raw) == 32
    return raw


def check_tree(entries: list[fmt.Entry]) -> None:
    kinds: dict[str, str] = {}
    for e in entries:
        assert fmt.check_rel_path(e.path) == e.path
        assert e.path not in kinds
        parent = e.path.rpartition("/")[0]
        assert not parent or kinds.get(parent) == fmt.TYPE_DIR
        assert e.type in (fmt.TYPE_FILE, fmt.TYPE_DIR, fmt.TYPE_LINK)
        assert isinstance(e.mode, int) and 0 <= e.mode <= 0o7777
        assert isinstance(e.mtime_ns, int) and not isinstance(e.mtime_ns, bool)
        if e.type == fmt.TYPE_FILE:
            assert isinstance(e.size, int) and e.size >= 0
            for b in e.blobs:
                _usable_id(b)
            assert e.blobs or e.size == 0
        if e.type == fmt.TYPE_LINK:
            assert isinstance(e.target, str) and e.target and "\x00" not in e.target
        kinds[e.path] = e.type


def check_manifest(doc: Any) -> None:
    assert isinstance(doc, dict) and doc["v"] == fmt.FORMAT_VERSION
    names = set()
    for root in doc["roots"]:
        assert isinstance(root, dict)
        name = fmt.check_rel_path(root["name"])
        assert "/" not in name and name not in names
        names.add(name)
        assert root["type"] in (fmt.TYPE_FILE, fmt.TYPE_DIR, fmt.TYPE_LINK)
        assert isinstance(root.get("source", ""), str)
    for b in doc["tree"]:
        _usable_id(b)
    if doc.get("parent") is not None:
        _usable_id(doc["parent"])
    info = info_from_manifest("0" * 64, doc)  # what listing a snapshot does with it
    json.dumps(info.to_json())
    assert isinstance(info.run, str) and isinstance(info.time_ns, int)


def check_index(out: Any) -> None:
    assert isinstance(out, dict)
    for bid, entry in out.items():
        assert isinstance(bid, bytes) and len(bid) == 32
        pack_id, codec, offset, length, raw = entry
        _usable_id(pack_id)
        assert pack_name(pack_id).startswith(f"packs/{pack_id[:2]}/")
        assert codec in fmt.CODECS
        assert offset >= 0 and length >= 0 and 0 <= raw <= fmt.MAX_BLOB * 4


def check_pack(entries: Any, pack_size: int, tail_len: int) -> None:
    assert isinstance(entries, list)
    header = fmt.PACK_HEADER_FIXED.size + len(entries) * fmt.PACK_ENTRY.size
    offset = 0
    for e in entries:
        assert isinstance(e, fmt.PackEntry) and len(e.blob_id) == 32 and e.codec in fmt.CODECS
        assert e.offset == offset and e.length >= 0 and e.raw_length >= 0
        offset += e.length
    assert offset == pack_size - header - fmt.PACK_TRAILER.size
    assert header + fmt.PACK_TRAILER.size <= min(pack_size, tail_len)


# ---------------------------------------------------------------- decode_doc


def doc_mem(data: bytes) -> int:
    """What decoding a stored JSON document may allocate: about what it decodes to.

    A frame that declares more than MAX_JSON is refused before anything is allocated;
    one that declares less, or nothing, is decoded in steps, never given the whole cap.
    """
    declared = declared_size(data)
    return 8 * MiB + 32 * len(data) + (declared if 0 <= declared <= fmt.MAX_JSON else 0)


def _doc_ok(data: bytes) -> None:
    guarded(fmt.decode_doc, data, "document", mem=doc_mem(data))


@fuzz(200)
@given(st.binary(max_size=4096) | encoded(json_values) | mutated_bytes(encoded(json_values)) | zstd_frames(hi=1 << 16))
@example(b"[" * 100_000)
@example(b'{"a":' * 50_000)
@example(b"1" * 5000)
@example(b"1e999999")
@example(b"\xff\xfe[\x00]\x00")
@example(b'"\\ud800"')
@example(fmt.ZSTD_MAGIC)
def test_decode_doc_fuzz(data: bytes) -> None:
    _doc_ok(data)


# ---------------------------------------------------------------- manifests


@fuzz(200)
@given(
    st.binary(max_size=2048)
    | encoded(manifests())
    | mutated_bytes(encoded(manifests()))
    | encoded(mutated_docs(manifests()))
    | encoded(values)
)
def test_parse_manifest_fuzz(data: bytes) -> None:
    doc, _err = guarded(fmt.parse_manifest, data, mem=doc_mem(data))
    if doc is not None:
        check_manifest(doc)


@fuzz(40)
@given(manifests())
def test_parse_manifest_round_trip(doc: dict[str, Any]) -> None:
    data = fmt.encode_doc(doc, compressed=False)
    assert fmt.parse_manifest(data, fmt.hexdigest(data)) == doc
    check_manifest(doc)


@fuzz(30)
@given(manifests(), st.binary(min_size=1, max_size=4))
def test_parse_manifest_refuses_a_wrong_name(doc: dict[str, Any], junk: bytes) -> None:
    data = fmt.encode_doc(doc, compressed=False)
    with pytest.raises(VaultCorrupt):
        fmt.parse_manifest(data + b" " + junk.hex().encode(), fmt.hexdigest(data))


# ---------------------------------------------------------------- index fragments


@fuzz(200)
@given(
    st.binary(max_size=2048)
    | encoded(index_docs())
    | mutated_bytes(encoded(index_docs()))
    | encoded(mutated_docs(index_docs()))
    | encoded(values)
)
def test_parse_index_fuzz(data: bytes) -> None:
    out, _err = guarded(fmt.parse_index, data, mem=doc_mem(data))
    if out is not None:
        check_index(out)


@fuzz(40)
@given(
    st.lists(
        st.tuples(
            hex_ids,
            st.lists(
                st.tuples(st.binary(min_size=32, max_size=32), st.sampled_from(fmt.CODECS), st.integers(0, 1000), st.integers(0, 1000)),
                max_size=4,
            ),
        ),
        max_size=3,
        unique_by=lambda t: t[0],
    )
)
def test_parse_index_round_trip(spec: list[tuple[str, list[tuple[bytes, int, int, int]]]]) -> None:
    packs = {}
    expected = {}
    for pid, blobs in spec:
        entries, offset = [], 0
        for bid, codec, length, raw in blobs:
            entries.append(fmt.PackEntry(bid, codec, offset, length, raw))
            expected[bid] = (pid, codec, offset, length, raw)
            offset += length
        packs[pid] = (offset + 100, entries)
    out = fmt.parse_index(fmt.build_index(packs, "00ff"))
    # a blob id listed twice keeps its last place, as parse_index documents by building a dict
    assert out == expected
    check_index(out)


# ---------------------------------------------------------------- trees


def tree_lines(entries: list[fmt.Entry]) -> list[dict[str, Any]]:
    return [e.to_json() for e in entries]


def encode_lines(lines: Any) -> bytes:
    if not isinstance(lines, list):
        lines = [lines]
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8", "surrogatepass")


@fuzz(200)
@given(
    st.binary(max_size=2048)
    | st.builds(fmt.encode_tree, entries_trees())
    | mutated_bytes(st.builds(fmt.encode_tree, entries_trees()))
    | st.builds(encode_lines, mutated_docs(st.builds(tree_lines, entries_trees())))
)
@example(b'{"p":"a","t":"d","m":0,"n":0}\n{"p":"a/b","t":"f","m":0,"n":0,"s":0,"b":[]}\n')
@example(b'{"p":"a","t":"l","m":0,"n":0,"l":"x"}\n{"p":"a/b","t":"f","m":0,"n":0,"s":0,"b":[]}\n')
@example(b'{"p":"a","t":"f","m":0,"n":0,"s":0,"b":[]}\n{"p":"a","t":"d","m":0,"n":0}\n')
@example(b'{"p":"a","t":"d","m":0,"n":-4611686018427387905}\n')
@example(b'{"p":"a","t":"d","m":true,"n":0}\n')
def test_parse_tree_fuzz(data: bytes) -> None:
    out, _err = guarded(fmt.parse_tree, data)
    if out is not None:
        check_tree(out)


@fuzz(80)
@given(entries_trees())
def test_parse_tree_round_trip(entries: list[fmt.Entry]) -> None:
    assert fmt.parse_tree(fmt.encode_tree(entries)) == entries
    check_tree(entries)


@fuzz(20)
@given(entries_trees(names=names_with_breaks))
def test_parse_tree_round_trip_with_unicode_line_breaks(entries: list[fmt.Entry]) -> None:
    assume(any(c in e.path for e in entries for c in LINE_BREAKS))
    assert fmt.parse_tree(fmt.encode_tree(entries)) == entries


# ---------------------------------------------------------------- pack headers


@st.composite
def packs(draw: st.DrawFn) -> bytes:
    entries, data = [], bytearray()
    for blob in draw(st.lists(st.binary(max_size=200), max_size=5)):
        plain = blob * draw(st.integers(1, 3))
        codec, stored = fmt.maybe_compress(plain)
        entries.append(fmt.PackEntry(fmt.digest(plain), codec, len(data), len(stored), len(plain)))
        data += stored
    return bytes(data) + fmt.build_pack_header(draw(st.binary(min_size=16, max_size=16)), entries)


@st.composite
def pack_inputs(draw: st.DrawFn) -> tuple[bytes, int]:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=1024)), draw(st.integers(-5, 1 << 33))
    pack = draw(packs() if choice == 1 else mutated_bytes(packs()))
    size = len(pack) if draw(st.integers(0, 3)) else draw(st.integers(-5, 2 * len(pack) + 10))
    keep = draw(st.integers(0, len(pack)))
    return pack[len(pack) - keep :] if draw(st.integers(0, 3)) == 0 else pack, size


@fuzz(200)
@given(pack_inputs())
@example((struct.pack("<4s16sI", b"LRPH", b"\0" * 16, 0xFFFFFFFF) + struct.pack("<I8s", 24, b"LRPACK01"), 36))
@example((struct.pack("<I8s", 0xFFFFFFFF, b"LRPACK01"), 1 << 40))
def test_parse_pack_header_fuzz(arg: tuple[bytes, int]) -> None:
    tail, size = arg
    out, _err = guarded(fmt.parse_pack_header, tail, size)
    if out is not None:
        check_pack(out, size, len(tail))


@fuzz(60)
@given(packs())
def test_parse_pack_header_round_trip(pack: bytes) -> None:
    entries = fmt.parse_pack_header(pack, len(pack))
    check_pack(entries, len(pack), len(pack))
    for e in entries:
        plain = fmt.unpack_blob(e.blob_id, e.codec, pack[e.offset : e.offset + e.length], e.raw_length)
        assert fmt.digest(plain) == e.blob_id


# ---------------------------------------------------------------- decompress and unpack_blob


raw_lengths = (
    st.integers(0, 1 << 16)
    | st.integers(0, fmt.MAX_BLOB * 4 + 10)
    | st.sampled_from([0, 1, fmt.MAX_BLOB, fmt.MAX_BLOB * 4, fmt.MAX_BLOB * 4 + 1])
)


@st.composite
def blob_inputs(draw: st.DrawFn) -> tuple[bytes, int, bytes | None, int]:
    """(stored bytes, claimed raw length, the plain bytes when known, the codec they suggest)."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        data = draw(st.binary(max_size=2048))
        return data, draw(st.just(len(data)) | raw_lengths), data, fmt.CODEC_RAW
    if choice == 1:
        plain, frame = draw(valid_frames())
        lengths = st.sampled_from([len(plain), len(plain) + 1, max(0, len(plain) - 1)]) | raw_lengths
        return draw(mutated_bytes(st.just(frame))), draw(lengths), plain, fmt.CODEC_ZSTD
    if choice == 2:
        return draw(zstd_frames(hi=1 << 16)), draw(raw_lengths), None, fmt.CODEC_ZSTD
    plain, frame = draw(valid_frames())
    return frame, len(plain), plain, fmt.CODEC_ZSTD


def _blob_mem(data: bytes, raw_length: int) -> int:
    """A frame must declare exactly ``raw_length`` (or nothing) to be decoded at all."""
    declared = declared_size(data)
    return min(raw_length, fmt.MAX_BLOB * 4) + (declared if 0 <= declared <= raw_length else 0) + 4 * len(data)


@fuzz(200)
@given(blob_inputs())
def test_decompress_fuzz(arg: tuple[bytes, int, bytes | None, int]) -> None:
    data, raw_length, _plain, _codec = arg
    out, _err = guarded(fmt.decompress, data, raw_length, mem=_blob_mem(data, raw_length))
    if out is not None:
        assert isinstance(out, bytes) and len(out) == raw_length


@fuzz(200)
@given(blob_inputs(), st.integers(0, 5), st.integers(-1, 300), st.integers(0, 3))
def test_unpack_blob_fuzz(arg: tuple[bytes, int, bytes | None, int], pick: int, odd_codec: int, id_pick: int) -> None:
    data, raw_length, plain, suggested = arg
    codec = suggested if pick < 4 else 1 - suggested if pick == 4 else odd_codec
    true_id = id_pick != 0
    # the id a writer would have used, so a success is reachable; else one nothing matches
    blob_id = fmt.digest(plain if true_id and plain is not None else data + b"!")
    out, _err = guarded(fmt.unpack_blob, blob_id, codec, data, raw_length, mem=_blob_mem(data, raw_length))
    if out is not None:
        assert len(out) == raw_length and fmt.digest(out) == blob_id  # bytes, or the given view for raw blobs


@fuzz(50)
@given(st.binary(max_size=5000), st.booleans())
def test_unpack_blob_round_trip(plain: bytes, squeeze: bool) -> None:
    codec, stored = (fmt.CODEC_ZSTD, fmt.compress(plain)) if squeeze else fmt.maybe_compress(plain)
    assert fmt.unpack_blob(fmt.digest(plain), codec, stored, len(plain)) == plain
    with pytest.raises(VaultCorrupt):
        fmt.unpack_blob(fmt.digest(plain + b"x"), codec, stored, len(plain))


# ---------------------------------------------------------------- config.json


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=1024))
    if choice == 1:
        return draw(mutated_bytes(st.just(json.dumps(_config_doc(), indent=2).encode())))
    return json.dumps(draw(mutated_docs(st.just(_config_doc()))), ensure_ascii=draw(st.booleans())).encode()


@fuzz(200)
@given(config_bytes())
def test_parse_config_fuzz(raw: bytes) -> None:
    config, err = guarded(Repository._parse_config, raw, "memory://fuzz", allowed=(VaultCorrupt, VaultFormatTooNew))
    if config is not None:
        assert isinstance(config, dict)
        assert isinstance(config["format"], int) and config["format"] <= fmt.FORMAT_VERSION
        for key in ("min", "avg", "max", "seed", "small_file"):
            int(config["chunker"][key])
    elif isinstance(err, VaultFormatTooNew):
        assert "upgrade" in str(err)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"format": 1, "id": "x", "chunker": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        json.dumps({**_config_doc(), "chunker": {**_config_doc()["chunker"], "min": float("inf")}}).encode(),
        b'{"format": 1, "id": "x", "chunker": {"min": 1e999, "avg": 1, "max": 1, "seed": 1, "small_file": 1}}',
    ],
    ids=["deep-list", "deep-chunker", "infinity", "1e999"],
)
def test_parse_config_refuses_deep_nesting_and_infinity(raw: bytes) -> None:
    _config, err = guarded(Repository._parse_config, raw, "memory://fuzz", allowed=(VaultCorrupt, VaultFormatTooNew))
    assert isinstance(err, VaultCorrupt)


def _snapshot_with_config(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Open a vault whose config.json an attacker edited and take a snapshot (files small and big)."""
    doc = _config_doc()
    change(doc)
    url = f"memory://fuzz-config/{uuid.uuid4().hex}"
    open_backend(url).put("config.json", json.dumps(doc).encode())
    work = make_tree(tmp_path / "w", {"small.txt": b"s" * 100, "big.bin": os.urandom(3 * MiB // 2)})
    try:
        snap = liferaft.Vault(url).snapshot([work], run="cfg")
    except LiferaftError as err:
        assert "\n" not in str(err)
        return
    result = liferaft.Vault(url).restore(snap.id, to=tmp_path / "back")
    assert result is not None and (tmp_path / "back/w/big.bin").read_bytes() == (work / "big.bin").read_bytes()


def _set_chunker(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["chunker"].__setitem__(key, value)


@pytest.mark.parametrize(
    "change",
    [lambda doc: doc.__setitem__("pack_size", 0), lambda doc: doc.__setitem__("pack_size", -1), lambda doc: doc.__setitem__("id", 7)],
    ids=["pack-size-0", "pack-size-negative", "id-a-number"],
)
def test_odd_config_still_snapshots_or_is_refused(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    _snapshot_with_config(tmp_path, change)


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc.__setitem__("pack_size", "big"),
        lambda doc: doc.__setitem__("pack_size", None),
        _set_chunker("small_file", "1048576"),
        _set_chunker("min", "262144"),
        _set_chunker("avg", 1.5),
        _set_chunker("min", 0),
        _set_chunker("seed", -5),
        _set_chunker("max", 1 << 40),
    ],
    ids=["pack-size-string", "pack-size-null", "small-file-string", "min-string", "avg-float", "min-zero", "seed-negative", "max-huge"],
)
def test_hostile_config_is_refused_not_crashed(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    _snapshot_with_config(tmp_path, change)


# ---------------------------------------------------------------- ids


@fuzz(200)
@given(hex_ids | st.text(max_size=70) | st.text("0123456789abcdefABCDEF", min_size=62, max_size=66) | st.sampled_from(TRICKY))
def test_is_hex_id_accepts_lowercase_hex_only(value: Any) -> None:
    assert fmt.is_hex_id(value) == (isinstance(value, str) and bool(HEX_RE.fullmatch(value)))


@fuzz(20)
@given(hexish)
def test_is_hex_id_refuses_what_only_int_accepts(value: str) -> None:
    assume(not HEX_RE.fullmatch(value))
    assert not fmt.is_hex_id(value)


@fuzz(20)
@given(hexish)
def test_parse_index_with_hexish_blob_ids(value: str) -> None:
    assume(not HEX_RE.fullmatch(value))
    doc = {"v": 1, "packs": {"a" * 64: {"size": 10, "blobs": [[value, 0, 0, 1, 1]]}}}
    guarded(fmt.parse_index, fmt.encode_doc(doc))


@fuzz(20)
@given(hexish)
def test_parse_tree_and_manifest_return_usable_ids(value: str) -> None:
    assume(not HEX_RE.fullmatch(value))
    tree = encode_lines([{"p": "r", "t": "f", "m": 0, "n": 0, "s": 1, "b": [value]}])
    out, _err = guarded(fmt.parse_tree, tree)
    if out is not None:
        check_tree(out)
    manifest = {"v": 1, "run": "r", "time_ns": 0, "roots": [], "tree": [value]}
    doc, _err = guarded(fmt.parse_manifest, fmt.encode_doc(manifest, compressed=False))
    if doc is not None:
        check_manifest(doc)


# ---------------------------------------------------------------- zstd frames that lie about their size


def _rle_frame(declared: int) -> bytes:
    """A 16-byte zstd frame declaring ``declared`` bytes, holding one RLE block of one byte."""
    return fmt.ZSTD_MAGIC + bytes([0xE0]) + struct.pack("<Q", declared) + ((1 << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\0"


@pytest.mark.parametrize("declared", [1 << 30, 1 << 40, 1 << 50], ids=["1GiB", "1TiB", "1PiB"])
@pytest.mark.parametrize("parser", ["decompress", "decode_doc", "parse_index", "parse_manifest"])
def test_declared_frame_size_is_refused_before_allocating(parser: str, declared: int) -> None:
    frame = _rle_frame(declared)
    if parser == "decompress":
        _out, err = guarded(fmt.decompress, frame, 5, mem=5)
    elif parser == "decode_doc":
        _out, err = guarded(fmt.decode_doc, frame, "document", mem=MiB)
    else:
        _out, err = guarded(getattr(fmt, parser), frame, mem=MiB)
    assert isinstance(err, VaultCorrupt)  # refused from the header alone


@pytest.mark.parametrize("frame", [b"(\xb5/\xfd\x00\x00", fmt.ZSTD_MAGIC + b"\x00\x58" + b"\x01\x00\x00"], ids=["empty", "raw-block"])
def test_frame_without_a_size_is_not_given_the_whole_cap(frame: bytes) -> None:
    assert declared_size(frame) == -1
    guarded(fmt.decode_doc, frame, "document", mem=8 * MiB)


def test_decompress_within_bounds_still_works() -> None:
    """The control for the two tests above: honest frames decode, with or without a declared size."""
    plain = b"liferaft " * 1000
    for frame in (fmt.compress(plain), zstandard.ZstdCompressor(write_content_size=False).compress(plain)):
        out, err = guarded(fmt.decompress, frame, len(plain), mem=2 * len(plain))
        assert err is None and out == plain
    doc = {"v": 1, "x": list(range(100))}
    out, err = guarded(fmt.decode_doc, fmt.encode_doc(doc), "document", mem=MiB)
    assert err is None and out == doc


# ---------------------------------------------------------------- paths and links


COMPONENTS = ["a", "b", "sub", "é", " ", "...", ".a", "a.", ".", "..", "", "c:", "a\\b", "\\", "x\x00", "a:b", "\u2028", "~"]
paths = st.builds(
    lambda lead, parts, trail: lead + "/".join(parts) + trail,
    st.sampled_from(["", "", "", "/", "//"]),
    st.lists(st.sampled_from(COMPONENTS) | st.text(max_size=4), min_size=0, max_size=6),
    st.sampled_from(["", "", "", "/"]),
)


def reference_safe(p: Any) -> bool:
    """A tree path is safe when it is relative, already normal and never climbs (posixpath terms),
    and carries nothing another platform reads differently (NUL, backslash, drive letter)."""
    if not isinstance(p, str) or not p or len(p) > 4096 or "\x00" in p or "\\" in p:
        return False
    if p.startswith("/") or (len(p) > 1 and p[1] == ":"):
        return False
    return posixpath.normpath(p) == p and p not in (".", "..") and not p.startswith("../")


@fuzz(300)
@given(paths | st.text(max_size=20) | st.sampled_from([None, 1, b"a", ["a"], "x" * 4096, "x" * 4097, "a/" * 2048]))
def test_check_rel_path_accepts_exactly_the_safe_paths(p: Any) -> None:
    try:
        fmt.check_rel_path(p)
        accepted = True
    except VaultCorrupt as err:
        assert "\n" not in str(err)
        accepted = False
    assert accepted == reference_safe(p), p
    if accepted:
        base = "/base/target"
        assert posixpath.normpath(posixpath.join(base, p)).startswith(base + "/")
        assert posixpath.normpath(posixpath.join(base, p)) == f"{base}/{p}"


targets = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["", "", "", "/", "./"]),
    st.lists(st.sampled_from(["..", "..", ".", "", "a", "b", "sub", "c:", "a\\b"]) | st.text(max_size=3), max_size=8),
)
tree_paths = st.lists(st.sampled_from(["r", "a", "sub", "x y", "é"]), min_size=1, max_size=5).map("/".join)


def reference_escapes(path: str, target: str) -> bool:
    """Where the link points if no component of the target is itself a link (posixpath.normpath)."""
    if target.startswith("/") or "\\" in target or (len(target) > 1 and target[1] == ":"):
        return True
    where = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return where == ".." or where.startswith("../")


def _climbs_only_first(target: str) -> bool:
    parts = [p for p in target.split("/") if p not in ("", ".")]
    seen_name = False
    for part in parts:
        if part != "..":
            seen_name = True
        elif seen_name:
            return False
    return True


@fuzz(300)
@given(tree_paths, targets)
@example("r/l", "../x")
@example("r/l", "../../x")
@example("l", "..")
@example("r/a/l", "b/../../..")
@example("r/l", "c:x")
def test_link_escapes_matches_normpath(path: str, target: str) -> None:
    escapes = fmt.link_escapes(path, target)
    ref = reference_escapes(path, target)
    if ref:
        assert escapes, f"{path} -> {target} leaves the tree but was let through"
    if _climbs_only_first(target):
        # no '..' after a name: the lexical answer is also the answer on disk
        assert escapes == ref, f"{path} -> {target}"
