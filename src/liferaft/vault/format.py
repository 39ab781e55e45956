"""Bytes on disk: packs, index fragments, trees and manifests, and their strict parsers.

Every parser here takes untrusted bytes (the vault may be damaged or hostile) and
either returns well-formed values or raises VaultCorrupt; nothing else escapes.
These are the functions the fuzz tests hammer.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from ..errors import LiferaftError, VaultCorrupt

FORMAT_VERSION = 1
HASH_LEN = 32  # BLAKE3 digest bytes

CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)

PACK_MAGIC = b"LRPACK01"
PACK_TRAILER = struct.Struct("<I8s")  # header length, magic
PACK_HEADER_MAGIC = b"LRPH"
PACK_ENTRY = struct.Struct("<32sBII")  # blob id, codec, stored length, raw length
PACK_HEADER_FIXED = struct.Struct("<4s16sI")  # magic, nonce, count
MAX_BLOB = 64 << 20
MAX_JSON = 256 << 20

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def hexdigest(data: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


_HEX = re.compile(r"[0-9a-f]*")


def is_hex_id(value: Any, length: int = 64) -> bool:
    # Not int(value, 16): it also takes "0x", signs, spaces, "_" and non-ASCII digits.
    return isinstance(value, str) and len(value) == length and _HEX.fullmatch(value) is not None


# ---------------------------------------------------------------- compression

_contexts = threading.local()  # zstd contexts are not thread-safe: one set per thread


def _cctx(level: int) -> zstandard.ZstdCompressor:
    per_level: dict[int, zstandard.ZstdCompressor] = _contexts.__dict__.setdefault("c", {})
    ctx = per_level.get(level)
    if ctx is None:
        ctx = per_level[level] = zstandard.ZstdCompressor(level=level)
    return ctx


def _dctx() -> zstandard.ZstdDecompressor:
    ctx: zstandard.ZstdDecompressor | None = getattr(_contexts, "d", None)
    if ctx is None:
        ctx = _contexts.d = zstandard.ZstdDecompressor()
    return ctx


def compress(data: bytes | memoryview, level: int = 3) -> bytes:
    return _cctx(level).compress(data)


def _declared_size(data: bytes | memoryview, what: str) -> int:
    """The content size a zstd frame header declares (-1: it does not say)."""
    try:
        return zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise VaultCorrupt(f"{what} does not decode: {err}") from None


def _stream_decompress(data: bytes | memoryview, limit: int, what: str) -> bytes:
    """Decode one frame that does not declare its size, allocating only what it yields
    (zstandard's one-shot decompress would allocate all of max_output_size first)."""
    chunks: list[bytes] = []
    total = 0
    try:
        with _dctx().stream_reader(data, read_across_frames=False) as reader:
            while True:
                chunk = reader.read(min(1 << 20, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise VaultCorrupt(f"{what} decodes to more than {limit} bytes")
    except zstandard.ZstdError as err:
        raise VaultCorrupt(f"{what} does not decode: {err}") from None
    return b"".join(chunks)


def decompress(data: bytes | memoryview, raw_length: int) -> bytes:
    if raw_length > MAX_BLOB * 4:
        raise VaultCorrupt(f"blob claims {raw_length} bytes, more than any liferaft writes")
    # zstandard allocates what a frame header declares before decoding a byte: check it first.
    declared = _declared_size(data, "compressed blob")
    if declared == -1:
        out = _stream_decompress(data, raw_length, "compressed blob")
    elif declared != raw_length:
        raise VaultCorrupt(f"blob declares {declared} bytes, expected {raw_length}")
    else:
        try:
            out = _dctx().decompress(data, max_output_size=raw_length)
        except zstandard.ZstdError as err:
            raise VaultCorrupt(f"compressed blob does not decode: {err}") from None
    if len(out) != raw_length:
        raise VaultCorrupt(f"blob decodes to {len(out)} bytes, expected {raw_length}")
    return out


SAMPLE = 16 << 10


def maybe_compress(data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
    """Compress only when it pays: a 16 KiB sample decides, so random bytes cost little."""
    n = len(data)
    if n < 256:
        return CODEC_RAW, data
    if n > SAMPLE and len(compress(data[:SAMPLE], 1)) > 0.9 * SAMPLE:
        return CODEC_RAW, data
    packed = compress(data, 3)  # a blob no larger than the sample is its own sample
    if len(packed) > 0.95 * n:
        return CODEC_RAW, data
    return CODEC_ZSTD, packed


def unpack_blob(blob_id: bytes, codec: int, stored: bytes | memoryview, raw_length: int) -> bytes | memoryview:
    """Decode a stored blob and check it against its id (a raw blob comes back as given)."""
    if codec == CODEC_ZSTD:
        data: bytes | memoryview = decompress(stored, raw_length)
    elif codec == CODEC_RAW:
        data = stored
        if len(data) != raw_length:
            raise VaultCorrupt(f"blob {blob_id.hex()[:12]} is {len(data)} bytes, expected {raw_length}")
    else:
        raise VaultCorrupt(f"blob {blob_id.hex()[:12]} has unknown codec {codec}")
    if digest(data) != blob_id:
        raise VaultCorrupt(f"blob {blob_id.hex()[:12]} does not match its hash")
    return data


# ---------------------------------------------------------------- packs


@dataclass(frozen=True)
class PackEntry:
    blob_id: bytes
    codec: int
    offset: int
    length: int
    raw_length: int


def build_pack_header(nonce: bytes, entries: list[PackEntry]) -> bytes:
    parts = [PACK_HEADER_FIXED.pack(PACK_HEADER_MAGIC, nonce, len(entries))]
    parts += [PACK_ENTRY.pack(e.blob_id, e.codec, e.length, e.raw_length) for e in entries]
    header = b"".join(parts)
    return header + PACK_TRAILER.pack(len(header), PACK_MAGIC)


def pack_id(header: bytes) -> str:
    """A pack's id: the BLAKE3 of its header (with trailer), which names every blob in it
    by hash and carries a random nonce. It covers the whole pack as a hash of all its
    bytes would (every other byte belongs to a blob whose id checks it) at the cost of
    hashing a few KiB instead of 16 MiB. Packs written before this was so are named by
    the hash of all their bytes; ``pack_matches_id`` accepts both."""
    return hexdigest(header)


def pack_matches_id(data: bytes | memoryview, pid: str) -> bool:
    """Whether a whole pack's bytes are the ones its id names (header hash, or all bytes)."""
    if len(data) >= PACK_TRAILER.size:
        hlen, _magic = PACK_TRAILER.unpack_from(data, len(data) - PACK_TRAILER.size)
        start = len(data) - PACK_TRAILER.size - hlen
        if start >= 0 and pack_id(bytes(data[start:])) == pid:
            return True
    return hexdigest(data) == pid


def parse_pack_header(tail: bytes, pack_size: int) -> list[PackEntry]:
    """Parse a pack's header from its last bytes (at least the whole header and trailer)."""
    if len(tail) < PACK_TRAILER.size:
        raise VaultCorrupt("pack too short for its trailer")
    hlen, magic = PACK_TRAILER.unpack_from(tail, len(tail) - PACK_TRAILER.size)
    if magic != PACK_MAGIC:
        raise VaultCorrupt("pack trailer has the wrong magic")
    if hlen < PACK_HEADER_FIXED.size or hlen + PACK_TRAILER.size > min(len(tail), pack_size):
        raise VaultCorrupt("pack header length out of range")
    start = len(tail) - PACK_TRAILER.size - hlen
    hmagic, _nonce, count = PACK_HEADER_FIXED.unpack_from(tail, start)
    if hmagic != PACK_HEADER_MAGIC:
        raise VaultCorrupt("pack header has the wrong magic")
    if PACK_HEADER_FIXED.size + count * PACK_ENTRY.size != hlen:
        raise VaultCorrupt("pack header count does not match its length")
    entries = []
    offset = 0
    pos = start + PACK_HEADER_FIXED.size
    data_end = pack_size - PACK_TRAILER.size - hlen
    for _ in range(count):
        blob_id, codec, length, raw_length = PACK_ENTRY.unpack_from(tail, pos)
        pos += PACK_ENTRY.size
        if codec not in CODECS:
            raise VaultCorrupt(f"pack entry with unknown codec {codec}")
        if offset + length > data_end:
            raise VaultCorrupt("pack entry runs past the data")
        entries.append(PackEntry(blob_id, codec, offset, length, raw_length))
        offset += length
    if offset != data_end:
        raise VaultCorrupt("pack data length does not match its header")
    return entries


# ---------------------------------------------------------------- JSON documents


def encode_doc(obj: Any, compressed: bool = True) -> bytes:
    try:
        raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:  # a name that is not UTF-8 (see fs_name): escaped, all ASCII
        raw = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return compress(raw, 3) if compressed else raw


def decode_doc(data: bytes, what: str) -> Any:
    if len(data) > MAX_JSON:
        raise VaultCorrupt(f"{what} is implausibly large ({len(data)} bytes)")
    if data[:4] == ZSTD_MAGIC:
        declared = _declared_size(data, what)
        if declared > MAX_JSON:
            raise VaultCorrupt(f"{what} claims {declared} bytes, more than any liferaft writes")
        data = _stream_decompress(data, MAX_JSON, what)
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise VaultCorrupt(f"{what} is not valid JSON: {err}") from None


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)  # an int beyond a float's range raises OverflowError here
    except OverflowError:
        return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


@functools.lru_cache(maxsize=1)
def _strict_json() -> json.JSONDecoder:
    """One decoder for every tree line: ``json.loads`` with an argument builds a new one
    per call, which is most of the cost of parsing a tree of small entries."""
    return json.JSONDecoder(parse_constant=_reject_constant)


def _int(value: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise VaultCorrupt(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _str(value: Any, what: str, maxlen: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > maxlen:
        raise VaultCorrupt(f"{what} must be a string")
    return value


# ---------------------------------------------------------------- index fragments

IndexEntry = tuple[str, int, int, int, int]  # pack id, codec, offset, length, raw length


def parse_index(data: bytes) -> dict[bytes, IndexEntry]:
    """Parse an index fragment into blob id → (pack, codec, offset, length, raw length)."""
    doc = decode_doc(data, "index fragment")
    if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION or not isinstance(doc.get("packs"), dict):
        raise VaultCorrupt("index fragment has the wrong shape")
    out: dict[bytes, IndexEntry] = {}
    for pack_id, pack in doc["packs"].items():
        if not is_hex_id(pack_id) or not isinstance(pack, dict):
            raise VaultCorrupt("index fragment names a bad pack id")
        size = _int(pack.get("size"), "pack size")
        blobs = pack.get("blobs")
        if not isinstance(blobs, list):
            raise VaultCorrupt("index fragment pack without blobs")
        for item in blobs:
            if not isinstance(item, list) or len(item) != 5 or not is_hex_id(item[0]):
                raise VaultCorrupt("index fragment entry has the wrong shape")
            codec = _int(item[1], "codec", 0, max(CODECS))
            offset = _int(item[2], "offset", 0, size)
            length = _int(item[3], "length", 0, size)
            raw_length = _int(item[4], "raw length", 0, MAX_BLOB * 4)
            if offset + length > size:
                raise VaultCorrupt("index fragment entry runs past its pack")
            out[bytes.fromhex(item[0])] = (pack_id, codec, offset, length, raw_length)
    return out


def build_index(packs: dict[str, tuple[int, list[PackEntry]]], nonce: str) -> bytes:
    doc = {
        "v": FORMAT_VERSION,
        "nonce": nonce,
        "packs": {
            pid: {
                "size": size,
                "blobs": [[e.blob_id.hex(), e.codec, e.offset, e.length, e.raw_length] for e in entries],
            }
            for pid, (size, entries) in packs.items()
        },
    }
    return encode_doc(doc)


# ---------------------------------------------------------------- trees

TYPE_FILE = "f"
TYPE_DIR = "d"
TYPE_LINK = "l"


@dataclass
class Entry:
    """One thing in a snapshot's tree. ``path`` is relative and ``/`` separated."""

    path: str
    type: str
    mode: int = 0o644
    mtime_ns: int = 0
    size: int = 0
    blobs: list[str] = field(default_factory=list)
    target: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"p": self.path, "t": self.type, "m": self.mode, "n": self.mtime_ns}
        if self.type == TYPE_FILE:
            d["s"] = self.size
            d["b"] = self.blobs
        elif self.type == TYPE_LINK:
            d["l"] = self.target
        return d


def fs_name(name: str, what: str = "name") -> str:
    """Check a name read from a vault can be given back to the file system as it was.

    A file name is bytes on POSIX, and not always UTF-8 (a Latin-1 archive, a Windows
    share): Python reads an undecodable byte as a lone surrogate U+DC80-U+DCFF
    ("surrogateescape"), and a tree or manifest stores it as a ``\\udcXX`` JSON escape, so
    the name comes back byte for byte. Any other lone surrogate names no file, and escapes
    of bytes that do form UTF-8 would be a second spelling of a name (two tree entries for
    one file): both are refused."""
    try:
        name.encode()
    except UnicodeEncodeError:
        try:
            same = name.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape") == name
        except UnicodeEncodeError:
            same = False
        if not same:
            raise VaultCorrupt(f"{what} {name!r:.80} is no file name's bytes") from None
    return name


def check_rel_path(path: Any, what: str = "path") -> str:
    """Refuse anything that could leave the restore target: absolute, ``..``, odd names."""
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise VaultCorrupt(f"{what} is empty or not a string")
    if "\x00" in path or "\\" in path:
        raise VaultCorrupt(f"{what} {path!r:.80} has a NUL or a backslash")
    fs_name(path, what)
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise VaultCorrupt(f"{what} {path!r:.80} is absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise VaultCorrupt(f"{what} {path!r:.80} has an empty, '.' or '..' component")
    return path


@functools.lru_cache(maxsize=2)
def _compact_json(ascii: bool = False) -> json.JSONEncoder:
    return json.JSONEncoder(separators=(",", ":"), ensure_ascii=ascii)  # one for all lines, as above


def encode_tree(entries: list[Entry]) -> bytes:
    encode = _compact_json().encode
    lines = [encode(e.to_json()) for e in entries]
    if not lines:
        return b""
    try:
        return ("\n".join(lines) + "\n").encode()
    except UnicodeEncodeError:  # names that are not UTF-8 (see fs_name): those lines escaped
        escape = _compact_json(True).encode
        out = []
        for line, e in zip(lines, entries, strict=True):
            try:
                out.append(line.encode())
            except UnicodeEncodeError:
                out.append(escape(e.to_json()).encode())
        return b"\n".join(out) + b"\n"


def parse_tree(data: bytes) -> list[Entry]:
    """Parse a tree (JSON lines) and check it is a well-formed, escape-free tree."""
    if len(data) > MAX_JSON:
        raise VaultCorrupt("tree is implausibly large")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise VaultCorrupt("tree is not UTF-8") from None
    entries: list[Entry] = []
    kinds: dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): names may hold U+2028
        if not line:
            continue
        try:
            d = _strict_json().decode(line)
        except (ValueError, RecursionError) as err:
            raise VaultCorrupt(f"tree line {lineno} is not JSON: {err}") from None
        if not isinstance(d, dict):
            raise VaultCorrupt(f"tree line {lineno} is not an object")
        path = check_rel_path(d.get("p"), f"tree line {lineno} path")
        kind = d.get("t")
        if kind not in (TYPE_FILE, TYPE_DIR, TYPE_LINK):
            raise VaultCorrupt(f"tree entry {path!r} has unknown type {kind!r:.20}")
        if path in kinds:
            raise VaultCorrupt(f"tree lists {path!r} twice")
        parent = path.rpartition("/")[0]
        if parent and kinds.get(parent) != TYPE_DIR:
            raise VaultCorrupt(f"tree entry {path!r} is not inside a directory listed before it")
        entry = Entry(path, kind, _int(d.get("m"), "mode", 0, 0o7777), _int(d.get("n"), "mtime", -(1 << 62)))
        if kind == TYPE_FILE:
            entry.size = _int(d.get("s"), "size")
            blobs = d.get("b")
            if not isinstance(blobs, list) or not all(is_hex_id(b) for b in blobs):
                raise VaultCorrupt(f"tree entry {path!r} has bad blob ids")
            if entry.size and not blobs:
                raise VaultCorrupt(f"tree entry {path!r} has bytes but no blobs")
            entry.blobs = blobs
        elif kind == TYPE_LINK:
            entry.target = _str(d.get("l"), f"link target of {path!r}")
            if not entry.target or "\x00" in entry.target:
                raise VaultCorrupt(f"link {path!r} has an empty target")
            fs_name(entry.target, f"link target of {path!r}")
        kinds[path] = kind
        entries.append(entry)
    return entries


def link_escapes(path: str, target: str) -> bool:
    """True when a link at ``path`` (tree-relative) pointing to ``target`` leaves the tree."""
    if target.startswith("/") or "\\" in target or (len(target) > 1 and target[1] == ":"):
        return True
    depth = len(path.split("/")) - 1  # folders above the link, inside the tree
    named = False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if named:  # "x/..": x may itself be a link, so this ".." can land anywhere
                return True
            depth -= 1
            if depth < 0:
                return True
        else:
            named = True
            depth += 1
    return False


# ---------------------------------------------------------------- manifests

RUN_MAX = 200

# Besides C0/C1 controls and line breaks: the bidi overrides and isolates, which make a
# name read differently from what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_run_name(run: str) -> str:
    """Refuse a run name the vault would refuse, or one that breaks a listing (a newline, ESC).

    >>> check_run_name("mnist")
    'mnist'
    """
    if not isinstance(run, str) or not run or len(run) > RUN_MAX:
        raise LiferaftError(f"bad run name {str(run)[:40]!r}", f"use 1 to {RUN_MAX} characters, e.g. --run mnist")
    bad = next((c for c in run if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI_CONTROLS), None)
    if bad is not None:
        raise LiferaftError(f"run name {run[:40]!r} holds the control character {bad!r}", "use printable characters, e.g. --run mnist")
    return run


def parse_manifest(data: bytes, snapshot_id: str | None = None) -> dict[str, Any]:
    """Parse and validate a snapshot manifest; ``snapshot_id`` must be the hash of its bytes."""
    if snapshot_id is not None and hexdigest(data) != snapshot_id:
        raise VaultCorrupt(f"snapshot {snapshot_id[:12]} does not match its hash")
    doc = decode_doc(data, "snapshot manifest")
    if not isinstance(doc, dict):
        raise VaultCorrupt("snapshot manifest is not an object")
    if doc.get("v") != FORMAT_VERSION:
        raise VaultCorrupt(f"snapshot manifest has unknown version {doc.get('v')!r:.20}")
    _str(doc.get("run"), "run", RUN_MAX)
    if doc.get("step") is not None:
        _int(doc["step"], "step", -(1 << 62))
    _int(doc.get("time_ns"), "time_ns")
    _str(doc.get("host", ""), "host")
    if doc.get("parent") is not None and not is_hex_id(doc["parent"]):
        raise VaultCorrupt("snapshot parent is not an id")
    for key in ("tags", "metrics"):
        value = doc.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise VaultCorrupt(f"snapshot {key} must be an object")
    for k, v in doc.get("metrics", {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
            raise VaultCorrupt(f"metric {k!r:.40} is not a finite number")
    roots = doc.get("roots")
    if not isinstance(roots, list):
        raise VaultCorrupt("snapshot roots must be a list")
    names = set()
    for root in roots:
        if not isinstance(root, dict):
            raise VaultCorrupt("snapshot root is not an object")
        name = check_rel_path(root.get("name"), "root name")
        if "/" in name:
            raise VaultCorrupt(f"root name {name!r:.80} has a '/'")
        if name in names:
            raise VaultCorrupt(f"root {name!r} listed twice")
        names.add(name)
        _str(root.get("source", ""), "root source")
        if root.get("type") not in (TYPE_FILE, TYPE_DIR, TYPE_LINK):
            raise VaultCorrupt(f"root {name!r} has a bad type")
    tree = doc.get("tree")
    if not isinstance(tree, list) or not all(is_hex_id(b) for b in tree):
        raise VaultCorrupt("snapshot tree must be a list of blob ids")
    return doc
