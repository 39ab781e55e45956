"""The pieces under ``liferaft run``: durations, platform detection, kept paths, restore decisions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import liferaft
from conftest import make_tree
from liferaft.errors import LiferaftError
from liferaft.keep.keeper import compare, match_roots, resolve_keeps, restore_kept
from liferaft.keep.signals import exit_status
from liferaft.keep.units import format_duration, parse_duration
from liferaft.platform import CAP_MARGIN, Platform, detect

# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("11h30m", 41400.0), ("90", 90.0), ("1.5h", 5400.0), ("2m 5s", 125.0), ("45s", 45.0), ("250ms", 0.25), ("1d", 86400.0), (30, 30.0)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "-3", "h", "1h30", "", "inf", "nan", "1e3"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(LiferaftError, match="not a duration"):
        parse_duration(text)


def test_time_limit_off() -> None:
    assert parse_duration("off", allow_off=True) is None
    assert parse_duration("0", allow_off=True) is None
    with pytest.raises(LiferaftError):
        parse_duration("off")
    assert format_duration(7500) == "2h05m" and format_duration(270) == "4m30s" and format_duration(3) == "3.0s"


def test_exit_status_of_signals() -> None:
    assert exit_status(-15) == 143 and exit_status(-9) == 137 and exit_status(0) == 0 and exit_status(3) == 3


# ---------------------------------------------------------------- platform (environments passed in: no mocks)


def test_detect_platforms(tmp_path: Path) -> None:
    root = tmp_path  # no /dev/accel0 there
    colab = detect({"COLAB_RELEASE_TAG": "release-colab_20240911-060135_RC00"}, root)
    assert colab.name == "colab" and colab.time_cap == 12 * 3600
    kaggle = detect({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, root)
    assert kaggle.name == "kaggle" and kaggle.time_cap == 12 * 3600
    tpu = detect({"KAGGLE_KERNEL_RUN_TYPE": "Batch", "TPU_ACCELERATOR_TYPE": "v3-8"}, root)
    assert tpu.name == "kaggle" and tpu.time_cap == 9 * 3600
    lab = detect({"HOME": "/home/studio-lab-user"}, root)
    assert lab.name == "studiolab" and lab.time_cap == 4 * 3600 and lab.persistent_home
    sky = detect({"SKYPILOT_TASK_ID": "sky-managed-2024"}, root)
    assert sky.name == "skypilot" and sky.time_cap is None
    local = detect({"HOME": "/root"}, root)
    assert local.name == "local" and local.time_cap is None and local.time_left() is None


def test_time_left_counts_from_the_session_start() -> None:
    started = 1_000_000.0
    p = Platform("colab", "Google Colab", 12 * 3600.0, session_started=started)
    assert p.time_left(now=started + 2 * 3600) == 10 * 3600 - CAP_MARGIN
    assert p.time_left(now=started + 13 * 3600) == 0.0
    # an unknown start counts from now: the whole cap, less the margin
    assert Platform("kaggle", "Kaggle", 3600.0).time_left(now=5.0) == 3600.0 - CAP_MARGIN


def test_this_machine_is_detected_without_side_effects() -> None:
    import sys

    before = set(sys.modules)
    p = detect()
    assert p.name in ("local", "colab", "kaggle", "studiolab", "skypilot")
    assert not {m for m in set(sys.modules) - before if m.startswith("google")}


# ---------------------------------------------------------------- kept paths


def test_resolve_keeps(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    keeps = resolve_keeps(["ckpt", "runs/", "../shared/ckpt", str(tmp_path / "abs")], cwd=work)
    assert [k.name for k in keeps] == ["ckpt", "runs", "ckpt-2", "abs"]
    assert [k.inside_cwd for k in keeps] == [True, True, False, False]
    assert keeps[2].path == tmp_path / "shared" / "ckpt"
    for bad, msg in [([], "nothing to keep"), (["."], "holds the working folder"), ([".."], "holds the working folder"),
                     (["a", "./a"], "given twice"), (["a", "a/b"], "inside")]:  # fmt: skip
        with pytest.raises(LiferaftError, match=msg):
            resolve_keeps(bad, cwd=work)
    # attach(keep=...) is told in its own words, not the command line's
    with pytest.raises(LiferaftError) as info:
        resolve_keeps(["."], cwd=work, given="keep=")
    assert "kept path '.' holds the working folder" in str(info.value) and 'e.g. keep=["checkpoints"]' in str(info.value)
    assert "--keep" not in str(info.value)


def _snap(vault: liferaft.Vault, work: Path, *names: str) -> liferaft.api.SnapshotInfo:
    return vault.snapshot([work / n for n in names], run="r")


def test_compare_states(tmp_path: Path, local_vault: str) -> None:
    work = make_tree(tmp_path / "work", {"ckpt/a.bin": b"a" * 100, "ckpt/sub/b.txt": "b", "ckpt/link": "->a.bin"})
    vault = liferaft.Vault(local_vault)
    snap = _snap(vault, work, "ckpt")
    keep = resolve_keeps(["ckpt"], cwd=work)[0]

    def state() -> str:
        return compare(keep, snap, "ckpt", vault).state

    assert state() == "same"
    (work / "ckpt" / "sub" / "b.txt").unlink()
    assert state() == "subset"  # restoring only adds files
    (work / "ckpt" / "sub" / "b.txt").write_text("b")  # same bytes, new mtime: still the same
    assert state() == "same"
    (work / "ckpt" / "new.bin").write_text("new work")
    assert state() == "newer"
    old = time.time() - 3600
    os.utime(work / "ckpt" / "new.bin", (old, old))
    assert state() == "older"
    (work / "ckpt" / "new.bin").unlink()
    (work / "ckpt" / "a.bin").write_bytes(b"x" * 100)  # same size, other bytes
    assert state() == "newer"
    for p in sorted((work / "ckpt").rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
    assert state() == "missing"  # an empty folder (a fresh clone's mkdir) counts as missing
    (work / "ckpt").rmdir()
    assert state() == "missing"


def test_a_fresh_clone_with_a_placeholder_is_restored_into(tmp_path: Path, local_vault: str) -> None:
    work = make_tree(tmp_path / "work", {"ckpt/.gitkeep": "", "ckpt/model.pt": b"weights"})
    vault = liferaft.Vault(local_vault)
    snap = _snap(vault, work, "ckpt")
    clone = make_tree(tmp_path / "clone", {"ckpt/.gitkeep": ""})  # same bytes, a new mtime
    keep = resolve_keeps(["ckpt"], cwd=clone)[0]
    assert compare(keep, snap, "ckpt", vault).state == "subset"
    outcome = restore_kept(vault, "r", [keep])
    assert [k.arg for k in outcome.restored] == ["ckpt"]
    assert (clone / "ckpt" / "model.pt").read_bytes() == b"weights"


def test_restore_only_what_is_missing_and_only_kept_roots(tmp_path: Path, local_vault: str) -> None:
    work = make_tree(tmp_path / "work", {"ckpt/w.bin": b"w" * 10, "runs/log.txt": "1", "other/x": "x"})
    vault = liferaft.Vault(local_vault)
    snap = _snap(vault, work, "ckpt", "runs", "other")
    # a fresh machine in another folder: ckpt missing, runs has newer work, other is not kept
    fresh = make_tree(tmp_path / "fresh", {"runs/log.txt": "1\n2"})
    keeps = resolve_keeps(["ckpt", "runs"], cwd=fresh)
    assert set(match_roots(keeps, snap)) == {"ckpt", "runs"}
    messages: list[str] = []
    outcome = restore_kept(vault, "r", keeps, say=messages.append)
    assert outcome.snapshot is not None and outcome.snapshot.id == snap.id
    assert [k.arg for k in outcome.restored] == ["ckpt"] and [k.arg for k in outcome.kept_local] == ["runs"]
    assert (fresh / "ckpt" / "w.bin").read_bytes() == b"w" * 10
    assert (fresh / "runs" / "log.txt").read_text() == "1\n2"
    assert not (fresh / "other").exists()
    assert outcome.files == 1 and outcome.nbytes == 10
    assert any("keeping local runs" in m for m in outcome.messages)
    # force: the snapshot wins
    outcome = restore_kept(vault, "r", keeps, force=True)
    assert (fresh / "runs" / "log.txt").read_text() == "1"


def test_restore_falls_back_past_a_damaged_snapshot(tmp_path: Path, local_vault: str) -> None:
    work = make_tree(tmp_path / "work", {"ckpt/state": "one"})
    vault = liferaft.Vault(local_vault)
    good = _snap(vault, work, "ckpt")
    (work / "ckpt" / "state").write_text("two, longer")
    bad = _snap(vault, work, "ckpt")
    assert bad.id != good.id
    # damage the newest snapshot's data: every pack it added
    packs = sorted((Path(local_vault) / "packs").rglob("*"), key=lambda p: p.stat().st_mtime_ns)
    newest_pack = [p for p in packs if p.is_file()][-1]
    data = bytearray(newest_pack.read_bytes())
    data[0] ^= 0xFF
    newest_pack.write_bytes(bytes(data))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    messages: list[str] = []
    outcome = restore_kept(liferaft.Vault(local_vault), "r", resolve_keeps(["ckpt"], cwd=fresh), say=messages.append)
    assert outcome.snapshot is not None and outcome.snapshot.id == good.id
    assert (fresh / "ckpt" / "state").read_text() == "one"
    assert any("failed verification" in m for m in messages)


def test_keep_from_liferaft_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from liferaft.keep.keeper import keep_from_config

    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    monkeypatch.chdir(project / "sub")
    assert keep_from_config() == []
    (project / "liferaft.toml").write_text('run = "mnist"\nkeep = ["checkpoints", "runs"]\n')
    assert keep_from_config() == ["../checkpoints", "../runs"]  # the file's paths, from its folder
    (project / "liferaft.toml").write_text("keep = 3\n")
    with pytest.raises(LiferaftError, match="'keep' must be a list"):
        keep_from_config()


def test_placeholders_the_snapshot_lacks_are_not_newer_work(tmp_path: Path, local_vault: str) -> None:
    # A repo that commits checkpoints/.gitkeep: the snapshot (taken before it was added,
    # or with it ignored) lacks it, and a fresh clone's copy is newer than the snapshot.
    work = make_tree(tmp_path / "work", {"ckpt/model.pt": b"weights", "ckpt/sub/opt.pt": b"adam"})
    vault = liferaft.Vault(local_vault)
    snap = _snap(vault, work, "ckpt")
    readme = "Checkpoints land here; liferaft restores them.\n"
    clone = make_tree(tmp_path / "clone", {"ckpt/.gitkeep": "", "ckpt/sub/.keep": "", "ckpt/README.md": readme, "ckpt/.gitignore": "*\n"})
    keep = resolve_keeps(["ckpt"], cwd=clone)[0]
    assert compare(keep, snap, "ckpt", vault).state == "subset"
    outcome = restore_kept(vault, "r", [keep])
    assert [k.arg for k in outcome.restored] == ["ckpt"] and outcome.resumed
    assert (clone / "ckpt" / "model.pt").read_bytes() == b"weights" and (clone / "ckpt" / "sub" / "opt.pt").read_bytes() == b"adam"
    # the placeholders stay as they were: restore never removes what the snapshot lacks
    assert (clone / "ckpt" / ".gitkeep").read_bytes() == b"" and (clone / "ckpt" / "README.md").read_text() == readme
    assert (clone / "ckpt" / ".gitignore").read_text() == "*\n"

    # What is work still counts: any other file the snapshot lacks, a placeholder name
    # holding more than a note, and a placeholder the snapshot has in another version.
    for files in ({"ckpt/.gitkeep": "", "ckpt/step-9.pt": b"9"}, {"ckpt/README.md": "x" * 5000}):
        other = make_tree(tmp_path / f"other-{len(files)}-{len(str(files))}", files)
        keep = resolve_keeps(["ckpt"], cwd=other)[0]
        c = compare(keep, snap, "ckpt", vault)
        assert c.state == "newer", files
        assert ".gitkeep" not in c.differing  # the example names the work, not the placeholder
        assert restore_kept(vault, "r", [keep]).kept_local == [keep]
        assert not (other / "ckpt" / "model.pt").exists()


def test_an_empty_file_the_snapshot_lacks_is_not_work(tmp_path: Path, local_vault: str) -> None:
    work = make_tree(tmp_path / "work", {"runs/events.1": b"e" * 50})
    vault = liferaft.Vault(local_vault)
    snap = _snap(vault, work, "runs")
    fresh = make_tree(tmp_path / "fresh", {"runs/touched.log": ""})
    keep = resolve_keeps(["runs"], cwd=fresh)[0]
    assert compare(keep, snap, "runs", vault).state == "subset"
    assert restore_kept(vault, "r", [keep]).restored == [keep]
    assert (fresh / "runs" / "events.1").read_bytes() == b"e" * 50 and (fresh / "runs" / "touched.log").exists()


@pytest.mark.parametrize("kind", ["folder", "file", "below"])
def test_a_dangling_link_at_a_kept_path_is_refused_not_replaced(tmp_path: Path, local_vault: str, kind: str) -> None:
    # checkpoints -> /content/drive/... before Drive is mounted: restoring would replace
    # the link (a kept file) or fail on it (a folder), and training would write elsewhere.
    name = "model.pt" if kind == "file" else "ckpt"
    work = make_tree(tmp_path / "work", {"model.pt": b"w", "ckpt/a": b"a"})
    vault = liferaft.Vault(local_vault)
    _snap(vault, work, name)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    drive = tmp_path / "drive-not-mounted" / "MyDrive"
    if kind == "below":  # --keep drive/ckpt, with drive -> an absent mount
        os.symlink(drive, fresh / "drive")
        arg, link = "drive/ckpt", fresh / "drive"
    else:
        os.symlink(drive / name, fresh / name)
        arg, link = name, fresh / name
    keep = resolve_keeps([arg], cwd=fresh)
    with pytest.raises(LiferaftError) as info:
        restore_kept(vault, "r", keep)
    text = str(info.value)
    assert "is a link to" in text and str(drive) in text and "which does not exist" in text and "remove the link" in text, text
    assert link.is_symlink() and os.readlink(link).startswith(str(drive)) and sorted(os.listdir(fresh)) == [link.name]


def test_a_kept_file_is_named_itself_in_messages(tmp_path: Path, local_vault: str) -> None:
    # "(e.g. .)" said nothing: a kept file is its own example.
    work = make_tree(tmp_path / "work", {"model.pt": b"v1"})
    vault = liferaft.Vault(local_vault)
    _snap(vault, work, "model.pt")
    (work / "model.pt").write_bytes(b"v2")
    keep = resolve_keeps(["model.pt"], cwd=work)
    outcome = restore_kept(vault, "r", keep)
    assert outcome.kept_local == keep
    note = next(m for m in outcome.messages if "keeping local" in m)
    assert "keeping local model.pt: it is newer than snapshot" in note and "e.g." not in note, note
    old = time.time() - 3600
    os.utime(work / "model.pt", (old, old))
    with pytest.raises(LiferaftError) as info:
        restore_kept(vault, "r", keep)
    text = str(info.value)
    assert "model.pt differs from the run's newest snapshot" in text and "e.g." not in text, text
    # the API caller is told its keyword, the command line its flag
    assert "force=True" in text and "--force" not in text
    assert "--force" in info.value.cli_fix  # type: ignore[attr-defined]
    assert (work / "model.pt").read_bytes() == b"v2"
