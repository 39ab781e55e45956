"""Checkpoint folders on local disk: ``step-N/`` with a manifest of hashes.

``step-N/liferaft-checkpoint.json`` lists every file of the checkpoint with its size and
BLAKE3 hash (and, for states saved by :meth:`Checkpointer.save`, the layout of the
state). A folder is a checkpoint only when its manifest is there and checks out: a folder
written half-way (a crash, or a framework that writes in place) is never taken for one.

Folders are written under ``.liferaft/tmp-PID-NONCE-step-N`` and renamed into place once
complete, so ``step-N/`` appears whole or not at all. Files are not fsynced: a process
crash keeps the page cache, a machine that vanishes takes the disk with it, and any torn
file fails its hash on restore, which then falls back to the vault or an older checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from ..platform import pid_alive
from .state import PICKLE, TENSORS, CheckpointDamaged, Staged, hash_file, write_bytes, write_tensors

MANIFEST = "liferaft-checkpoint.json"
WORK = ".liferaft"
FORMAT = "liferaft-checkpoint"
VERSION = 1


@dataclass
class Manifest:
    """A parsed, checksum-verified ``liferaft-checkpoint.json``."""

    run: str
    step: int
    time_ns: int
    metrics: dict[str, float]
    files: dict[str, tuple[int, str]]  # relative path → (size, blake3)
    state: Any = None  # layout of a saved state; None for a folder a framework wrote
    arrays: dict[str, tuple[str, str]] = field(default_factory=dict)  # name → (lib, dtype)
    pickled: list[str] = field(default_factory=list)
    has_state: bool = False
    checksum: str = ""

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "run": self.run,
            "step": self.step,
            "time_ns": self.time_ns,
            "metrics": self.metrics,
            "files": {k: {"size": s, "blake3": h} for k, (s, h) in sorted(self.files.items())},
        }
        if self.has_state:
            doc["state"] = self.state
            doc["arrays"] = {k: list(v) for k, v in self.arrays.items()}
            doc["pickled"] = self.pickled
        return doc


def _checksum(doc: Mapping[str, Any]) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return blake3.blake3(body.encode()).hexdigest()


def encode_manifest(m: Manifest) -> bytes:
    doc = m.to_doc()
    doc["checksum"] = m.checksum = _checksum(doc)
    return json.dumps(doc, indent=1).encode()


def parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointDamaged(f"{where}: {MANIFEST} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointDamaged(f"{where}: {MANIFEST} is not a liferaft checkpoint manifest")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise CheckpointDamaged(f"{where}: {MANIFEST} has version {doc.get('version')!r}; upgrade liferaft to read it")
    if doc.get("checksum") != _checksum(doc):
        raise CheckpointDamaged(f"{where}: {MANIFEST} does not match its checksum")
    try:
        files = {str(k): (int(v["size"]), str(v["blake3"])) for k, v in doc["files"].items()}
        for rel in files:
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or "" in parts or "\x00" in rel:
                raise ValueError(rel)
        m = Manifest(
            run=str(doc["run"]),
            step=int(doc["step"]),
            time_ns=int(doc["time_ns"]),
            metrics={str(k): float(v) for k, v in dict(doc.get("metrics") or {}).items()},
            files=files,
            state=doc.get("state"),
            arrays={str(k): (str(v[0]), str(v[1])) for k, v in dict(doc.get("arrays") or {}).items()},
            pickled=[str(p) for p in doc.get("pickled") or []],
            has_state="state" in doc,
            checksum=str(doc["checksum"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise CheckpointDamaged(f"{where}: {MANIFEST} is malformed") from None
    return m


def read_manifest(folder: Path) -> Manifest:
    try:
        raw = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointDamaged(f"{folder.name} has no {MANIFEST} (written only in part)") from None
    except OSError as err:
        raise CheckpointDamaged(f"{folder.name}: {MANIFEST} cannot be read ({err.strerror})") from None
    return parse_manifest(raw, folder.name)


def write_manifest(folder: Path, m: Manifest) -> None:
    """Write the manifest inside ``folder`` (temp name, then rename)."""
    tmp = folder / f".{MANIFEST}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.write_bytes(encode_manifest(m))
    os.replace(tmp, folder / MANIFEST)


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


# ------------------------------------------------------------------ names


class Naming:
    """Folder names ``PREFIX + step`` inside one checkpoints folder."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self._re = re.compile(re.escape(prefix) + r"(0|[1-9][0-9]*)")

    def name(self, step: int) -> str:
        return f"{self.prefix}{step}"

    def path(self, step: int) -> Path:
        return self.directory / self.name(step)

    def step_of(self, name: str) -> int | None:
        m = self._re.fullmatch(name)
        return int(m.group(1)) if m else None

    def work(self) -> Path:
        return self.directory / WORK

    def scan(self) -> dict[int, Path]:
        """Step → folder, for every folder whose name fits (manifest or not)."""
        out: dict[int, Path] = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return out
        for de in entries:
            step = self.step_of(de.name)
            if step is not None and de.is_dir(follow_symlinks=False):
                out[step] = Path(de.path)
        return out

    def temp_dir(self, step: int, kind: str = "tmp") -> Path:
        work = self.work()
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"{kind}-{os.getpid()}-{secrets.token_hex(4)}-{self.name(step)}"
        path.mkdir()
        return path

    def clean_work(self) -> int:
        """Remove temp and trash folders left by processes that are gone; return how many."""
        removed = 0
        try:
            entries = list(os.scandir(self.work()))
        except FileNotFoundError:
            return 0
        for de in entries:
            parts = de.name.split("-", 2)
            if len(parts) < 3 or parts[0] not in ("tmp", "trash", "fetch") or not parts[1].isdigit():
                continue
            if pid_alive(int(parts[1])):
                continue
            shutil.rmtree(de.path, ignore_errors=True)
            removed += 1
        return removed


def install(naming: Naming, tmp: Path, step: int) -> Path:
    """Rename a complete temp folder to ``step-N`` (moving an older ``step-N`` aside first)."""
    final = naming.path(step)
    for _attempt in range(3):
        try:
            os.rename(tmp, final)
            return final
        except OSError:
            if not os.path.lexists(final):
                raise
        trash = naming.work() / f"trash-{os.getpid()}-{secrets.token_hex(4)}-{naming.name(step)}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    return final


def remove(naming: Naming, folder: Path) -> None:
    """Delete a checkpoint folder: renamed away first, so it vanishes at once."""
    naming.work().mkdir(parents=True, exist_ok=True)
    trash = naming.work() / f"trash-{os.getpid()}-{secrets.token_hex(4)}-{folder.name}"
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------ write and check


def write_checkpoint(naming: Naming, run: str, step: int, metrics: dict[str, float], staged: Staged) -> tuple[Path, Manifest]:
    """Write a staged state as ``step-N/`` (temp folder, then rename); return it and its manifest."""
    tmp = naming.temp_dir(step)
    try:
        files: dict[str, tuple[int, str]] = {}
        if staged.arrays:
            files[TENSORS] = write_tensors(tmp / TENSORS, staged.arrays)
        if staged.pickled is not None:
            files[PICKLE] = write_bytes(tmp / PICKLE, staged.pickled)
        m = Manifest(
            run=run,
            step=step,
            time_ns=time.time_ns(),
            metrics=metrics,
            files=files,
            state=staged.layout,
            arrays={a.name: (a.lib, a.dtype) for a in staged.arrays},
            pickled=list(staged.pickled_what),
            has_state=True,
        )
        (tmp / MANIFEST).write_bytes(encode_manifest(m))
        return install(naming, tmp, step), m
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe_folder(folder: Path) -> dict[str, tuple[int, str]]:
    """Hash every regular file below ``folder``.

    Links, the manifest and credential files (which the vault leaves out of snapshots)
    are not listed.
    """
    from ..vault.snapshot import is_secret

    files: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel == MANIFEST or name.startswith(f".{MANIFEST}.") or is_secret(name) or path.is_symlink() or not path.is_file():
                continue
            files[rel] = hash_file(path)
    return files


def verify_files(folder: Path, m: Manifest, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Check every file the manifest lists; raise :class:`CheckpointDamaged` naming the first bad one."""
    for rel, (size, digest) in m.files.items():
        if rel in skip:
            continue
        path = folder / rel
        try:
            actual = hash_file(path)
        except FileNotFoundError:
            raise CheckpointDamaged(f"{folder.name}/{rel} is missing") from None
        except OSError as err:
            raise CheckpointDamaged(f"{folder.name}/{rel} cannot be read ({err.strerror})") from None
        if actual != (size, digest):
            raise CheckpointDamaged(f"{folder.name}/{rel} does not match its hash")
