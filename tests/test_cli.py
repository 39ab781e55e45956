"""The real ``liferaft`` command: flows, output formats, and one clear line for each mistake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import liferaft
from conftest import cli, make_tree, one_line_error, tree_state


def test_help_and_version() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for command in ("snapshot", "snapshots", "restore", "verify", "forget", "prune"):
        assert command in r.stdout
    r = cli("--version")
    assert r.returncode == 0 and liferaft.__version__ in r.stdout


def test_snapshot_list_restore_verify_flow(tmp_path: Path) -> None:
    vault = str(tmp_path / "vault")
    work = make_tree(tmp_path / "work", {"checkpoints/step-1.pt": os.urandom(2000), "runs/events": "e" * 100})
    r = cli(
        "--vault",
        vault,
        "snapshot",
        "checkpoints",
        "runs",
        "--run",
        "mnist",
        "--step",
        "1",
        "--tag",
        "lr=0.1",
        "--metric",
        "loss=0.7",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    assert "run 'mnist' step 1" in r.stdout
    (work / "checkpoints" / "step-2.pt").write_bytes(os.urandom(3000))
    r = cli("snapshot", "checkpoints", "--run", "mnist", "--step", "2", "--json", "--vault", vault, cwd=work)
    assert r.returncode == 0, r.stderr
    snap2 = json.loads(r.stdout)
    assert snap2["step"] == 2 and snap2["run"] == "mnist"

    r = cli("snapshots", "--json", "--vault", vault)
    listed = json.loads(r.stdout)
    assert [s["step"] for s in listed] == [1, 2]  # newest last
    assert listed[0]["metrics"] == {"loss": 0.7} and listed[0]["tags"] == {"lr": "0.1"}
    r = cli("snapshots", "--vault", vault)
    assert r.returncode == 0 and "mnist" in r.stdout and listed[0]["id"][:12] in r.stdout

    r = cli("restore", "--run", "mnist", "--to", str(tmp_path / "back"), "--vault", vault)
    assert r.returncode == 0, r.stderr
    assert tree_state(tmp_path / "back" / "checkpoints") == tree_state(work / "checkpoints")
    r = cli("restore", listed[0]["id"][:8], "--to", str(tmp_path / "old"), "--vault", vault)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "old")) == ["checkpoints", "runs"]

    r = cli("verify", "--read-data", "--vault", vault)
    assert r.returncode == 0 and r.stdout.startswith("ok")
    r = cli("--json", "--vault", vault, "verify")
    assert json.loads(r.stdout)["ok"] is True


def test_vault_from_env_then_toml_then_default(tmp_path: Path) -> None:
    work = make_tree(tmp_path / "proj" / "sub", {"f": "1"})
    (tmp_path / "proj" / "liferaft.toml").write_text('vault = "store"\nrun = "from-toml"\n')
    r = cli("snapshot", "f", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "proj" / "store" / "config.json").is_file()  # relative to the toml
    assert "run 'from-toml'" in r.stdout
    r = cli("snapshot", "f", cwd=work, env={"LIFERAFT_VAULT": str(tmp_path / "envvault")})
    assert r.returncode == 0 and (tmp_path / "envvault" / "config.json").is_file()
    r = cli("--vault", str(tmp_path / "flag"), "snapshot", "f", cwd=work, env={"LIFERAFT_VAULT": str(tmp_path / "envvault")})
    assert r.returncode == 0 and (tmp_path / "flag" / "config.json").is_file()
    r = cli("info", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["source"] == "default"


def test_forget_keeps_last_and_prune_frees_space(tmp_path: Path) -> None:
    vault = str(tmp_path / "vault")
    work = tmp_path / "w"
    work.mkdir()
    for step in range(5):
        (work / "ckpt.bin").write_bytes(os.urandom(1 << 20))
        assert cli("--vault", vault, "snapshot", str(work), "--run", "r", "--step", str(step)).returncode == 0
    packs_before = sum(1 for _ in Path(vault, "packs").rglob("*") if _.is_file())
    r = cli("--vault", vault, "forget", "--run", "r", "--keep-last", "2", "--prune")
    assert r.returncode == 0, r.stderr
    assert "forgot 3 snapshots: " in r.stdout
    steps = [s["step"] for s in json.loads(cli("--vault", vault, "snapshots", "--json").stdout)]
    assert steps == [3, 4]
    packs_after = sum(1 for _ in Path(vault, "packs").rglob("*") if _.is_file())
    assert packs_after < packs_before
    assert cli("--vault", vault, "verify", "--read-data").returncode == 0
    r = cli("--vault", vault, "restore", "--run", "r", "--to", str(tmp_path / "back"))
    assert r.returncode == 0 and (tmp_path / "back" / "w" / "ckpt.bin").read_bytes() == (work / "ckpt.bin").read_bytes()


def test_restore_in_place_keeps_work_newer_than_the_snapshot_unless_forced(tmp_path: Path) -> None:
    work = make_tree(tmp_path / "w", {"ckpt.bin": os.urandom(300_000), "notes.txt": "v1", "old.txt": "v1"})
    vault = str(tmp_path / "v")
    assert cli("--vault", vault, "snapshot", str(work), "--run", "r").returncode == 0
    snap_time = json.loads(cli("--vault", vault, "snapshots", "--json").stdout)[-1]["time_ns"] / 1e9
    (work / "notes.txt").write_text("v2: written after the snapshot")  # new work
    (work / "old.txt").write_text("older than the snapshot, and different")
    os.utime(work / "old.txt", (snap_time - 3600, snap_time - 3600))
    (work / "ckpt.bin").unlink()  # lost: restore brings it back
    before = tree_state(work)

    r = cli("--vault", vault, "restore", "--run", "r")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "1 file(s) in the way are newer than snapshot" in lines[0] and "notes.txt" in lines[0], r.stderr
    assert "--force" in lines[0] and "--to DIR" in lines[0]
    assert tree_state(work) == before and not list(work.glob(".liferaft-*"))  # nothing written

    r = cli("--vault", vault, "restore", "--run", "r", "--force")
    assert r.returncode == 0, r.stderr
    assert (work / "notes.txt").read_text() == "v1" and (work / "old.txt").read_text() == "v1"
    assert (work / "ckpt.bin").stat().st_size == 300_000


def test_restore_with_nothing_to_restore_is_not_an_error(tmp_path: Path) -> None:
    vault = tmp_path / "v"
    liferaft.Vault(vault).snapshot([make_tree(tmp_path / "w", {"f": "1"})], run="other")
    # The run named by default (the working folder's name), not typed: a first run.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = cli("--vault", str(vault), "restore", cwd=fresh)
    assert r.returncode == 0, r.stderr
    assert "nothing to restore: no snapshot of run 'fresh' (runs in this vault: other; pick one with --run)" in r.stdout
    # A vault with no snapshot at all: a first run whatever the name.
    liferaft.Vault(tmp_path / "empty").repository(create=True)
    r = cli("--vault", str(tmp_path / "empty"), "restore", "--run", "mnist")
    assert r.returncode == 0 and "nothing to restore" in r.stdout, r.stderr
    # The default vault nobody has written yet is empty, not missing: a first run.
    r = cli("restore", "--run", "fresh", cwd=tmp_path)
    assert r.returncode == 0 and "nothing to restore" in r.stdout, r.stderr


def test_a_run_of_checkpoints_only_says_how_to_restore_one(tmp_path: Path) -> None:
    # "no snapshot of run 'x' (runs in this vault: x)" contradicted itself.
    pytest.importorskip("numpy")
    import numpy as np

    vault = liferaft.Vault(tmp_path / "v")
    with liferaft.Checkpointer(tmp_path / "ck", run="x", vault=vault) as ck:
        ck.save(5, {"w": np.ones(3)}, metrics={"loss": 0.5})
    snap = vault.snapshots(run="x")[-1]
    r = cli("--vault", str(tmp_path / "v"), "restore", "--run", "x")
    assert r.returncode == 0, r.stderr
    assert "run 'x' has only checkpoints" in r.stdout and f"liferaft restore {snap.short_id} --to DIR" in r.stdout
    assert "runs in this vault" not in r.stdout
    # The table leaves the checkpoint's manifest checksum (64 hex digits) to --json.
    r = cli("--vault", str(tmp_path / "v"), "snapshots")
    row = r.stdout.splitlines()[-1]
    assert "liferaft.kind=checkpoint" in row and "liferaft.manifest=" not in row, row
    assert "liferaft.manifest" in json.loads(cli("--vault", str(tmp_path / "v"), "--json", "snapshots").stdout)[-1]["tags"]


def test_restore_from_a_vault_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    # `liferaft restore && python train.py` with a mistyped --vault must not train from scratch.
    typo = tmp_path / "typo"
    r = cli("--vault", str(typo), "restore", "--run", "mnist", cwd=tmp_path)
    _one_line_error(r, f"no vault at {typo}", "check --vault")
    assert r.returncode == 2 and r.stdout == "" and not typo.exists()
    r = cli("--vault", str(typo), "restore", "--run", "mnist", "--json", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    # The Python API (what `liferaft run` and attach use) still takes it for a first run.
    assert liferaft.Vault(typo).restore(run="mnist") is None
    assert not typo.exists()


def test_a_default_vault_not_written_yet_is_empty_for_every_command(tmp_path: Path) -> None:
    default = Path(os.environ["XDG_DATA_HOME"])  # conftest: a fresh data dir for each test
    for args in (
        ["info"],
        ["snapshots"],
        ["verify"],
        ["prune"],
        ["forget", "--run", "mnist", "--keep-last", "1"],
        ["forget", "--run", "mnist", "--keep-last", "1", "--prune"],
    ):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == "", (args, r.stderr)
    r = cli("forget", "--run", "mnist", "--keep-last", "1", "--prune", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["forgotten"] == []
    _one_line_error(cli("forget", "--run", "mnist", "--keep-last", "0", cwd=tmp_path), "keep at least 1")
    _one_line_error(cli("forget", "abcd", cwd=tmp_path), "no snapshot with id 'abcd'", "is empty")
    assert not list(default.rglob("config.json"))  # none of them created the vault


_one_line_error = one_line_error


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--vault", "ftp://host/x", "snapshots"], ["unknown vault URL scheme 'ftp'", "use one of"]),
        (["--vault", "{missing}", "snapshots"], ["no vault at", "check --vault"]),
        (["--vault", "{notavault}", "snapshots"], ["is not a liferaft vault", "empty or new folder"]),
        (["--vault", "{notavault}", "snapshot", "{work}"], ["is not a liferaft vault"]),
        (["--vault", "{vault}", "snapshot", "{tmp}/nope"], ["does not exist"]),
        (["--vault", "{vault}", "snapshot", "{work}", "--tag", "novalue"], ["--tag 'novalue' is not KEY=VALUE", "write --tag lr=3e-4"]),
        (["--vault", "{vault}", "snapshot", "{work}", "--metric", "loss=low"], ["not a number"]),
        (
            ["--vault", "{vault}", "snapshot", "{work}", "--metric", "val_loss"],
            ["--metric 'val_loss' is not KEY=VALUE", "write --metric val_loss=0.31"],
        ),
        (
            ["--vault", "{vault}", "snapshot", "{work}", "--metric", "x=nan"],
            ["--metric x='nan' is not a finite number", "write --metric val_loss=0.31"],
        ),
        (["--vault", "{vault}", "snapshot", "{work}", "--metric", "x=-inf"], ["--metric x='-inf' is not a finite number"]),
        (["--vault", "{vault}", "forget", "{vault_id3}"], ["too short"]),
        (["--vault", "{vault}", "restore", "deadbeef"], ["no snapshot with id 'deadbeef'"]),
        (["--vault", "{vault}", "restore", "ab"], ["too short"]),
        (["--vault", "{vault}", "forget", "--run", "r", "--keep-last", "0"], ["keep at least 1"]),
        (["--vault", "{vault}", "forget"], ["--keep-last"]),
    ],
)
def test_mistakes_get_one_clear_line(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    work = make_tree(tmp_path / "work", {"f": "1"})
    vault = tmp_path / "vault"
    liferaft.Vault(vault).snapshot([work], run="r")
    notavault = make_tree(tmp_path / "photos", {"cat.jpg": "meow"})
    fill = {"missing": str(tmp_path / "missing"), "notavault": str(notavault), "work": str(work), "vault": str(vault), "tmp": str(tmp_path)}
    fill["vault_id3"] = liferaft.Vault(vault).snapshots()[0].id[:3]  # a prefix find() refuses: nothing may be deleted by it
    argv = [a.format(**fill) for a in args]
    r = cli(*argv)
    _one_line_error(r, *needles)
    assert sorted(os.listdir(notavault)) == ["cat.jpg"]  # nothing written into a foreign folder
    assert len(liferaft.Vault(vault).snapshots()) == 1


def test_usage_errors_exit_2() -> None:
    r = cli("snapshot")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr


def test_newer_format_is_refused_with_upgrade_hint(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    liferaft.Vault(vault).snapshot([make_tree(tmp_path / "w", {"f": "1"})], run="r")
    config = json.loads((vault / "config.json").read_text())
    config["format"] = 99
    (vault / "config.json").write_text(json.dumps(config))
    r = cli("--vault", str(vault), "snapshots")
    _one_line_error(r, "format 99", "pip install -U liferaft")
    r = cli("--vault", str(vault), "snapshot", str(tmp_path / "w"))
    _one_line_error(r, "format 99")


@pytest.mark.parametrize(
    "change",
    [{"min": 32}, {"avg": 8 << 20}, {"max": 32 << 20}, {"min": 4096, "avg": 1024}, {"seed": -1}, {"seed": 1 << 63}, {"avg": "64k"}],
)
def test_chunker_parameters_the_chunker_refuses_are_refused_on_open(tmp_path: Path, change: dict[str, object]) -> None:
    # The vault checks them itself (it no longer builds a chunker to open a vault): a
    # value pyfastcdc would refuse must be named as damage, not crash a later snapshot.
    vault = tmp_path / "vault"
    work = make_tree(tmp_path / "w", {"f": "1"})
    liferaft.Vault(vault).snapshot([work], run="r")
    config = json.loads((vault / "config.json").read_text())
    config["chunker"].update(change)
    (vault / "config.json").write_text(json.dumps(config))
    r = cli("--vault", str(vault), "snapshot", str(work), "--run", "r")
    _one_line_error(r, "chunker parameters")


def test_a_snapshot_command_loads_only_what_it_uses(tmp_path: Path) -> None:
    # Start-up is most of an unchanged snapshot's time: a local snapshot with nothing new
    # must not load maintenance, Drive or cloud clients, or the chunker.
    work = make_tree(tmp_path / "w", {"f": "1", "d/g": "2"})
    vault = tmp_path / "vault"
    liferaft.Vault(vault).snapshot([work], run="r")
    probe = (
        "import sys, liferaft.cli\n"
        f"sys.argv = ['liferaft', '--vault', {str(vault)!r}, '-q', 'snapshot', {str(work)!r}, '--run', 'r']\n"
        "try:\n    liferaft.cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, "LIFERAFT_CACHE_DIR": str(tmp_path / "c")}
    )
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "liferaft.vault.snapshot" in loaded  # the probe did run a snapshot
    for heavy in (
        "liferaft.vault.maintenance",
        "liferaft.backends.drive",
        "liferaft.backends.objectstore",
        "pyfastcdc",
        "fsspec",
        "socket",
    ):
        assert heavy not in loaded, f"{heavy} loaded by an unchanged local snapshot"


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    work = make_tree(tmp_path / "w", {"f": "1"})
    r = cli("--vault", str(tmp_path / "v"), "snapshot", str(work), "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_readme_test_command_is_what_ci_runs() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    commands = [ln.strip()[2:].split("  #")[0].strip() for ln in readme.splitlines() if ln.strip().startswith("$ ")][:2]
    assert len(commands) == 2
    assert commands[1] in ci
    assert "demo" in commands[0]


def test_toml_options_apply_when_the_same_url_comes_from_the_flag(tmp_path: Path) -> None:
    from liferaft.config import resolve_vault

    (tmp_path / "liferaft.toml").write_text('[vault]\nurl = "s3://bkt/v"\n[vault.options]\nretry_deadline = 7\n')
    assert resolve_vault(None, tmp_path).options == {"retry_deadline": 7}
    assert resolve_vault("s3://bkt/v", tmp_path).options == {"retry_deadline": 7}
    assert resolve_vault("s3://other/v", tmp_path).options == {}


def test_flush_on_plain_folders_is_a_no_op(tmp_path: Path) -> None:
    assert liferaft.Vault(tmp_path / "v").flush() is True


def test_missing_cloud_extra_names_the_pip_command(tmp_path: Path) -> None:
    # gcsfs is a test dependency, so the interpreter is told it is absent (import -> None).
    code = "import sys; sys.modules['gcsfs'] = None; sys.argv = ['liferaft', *sys.argv[1:]]; from liferaft.cli import run; run()"
    r = subprocess.run([sys.executable, "-c", code, "--vault", "gs://bucket/x", "snapshots"], capture_output=True, text=True, timeout=120)
    _one_line_error(r, "gs:// vaults need the gcsfs package", "pip install 'liferaft[gcs]'")


# ---------------------------------------------------------------- a vault that cannot be written


@pytest.fixture(params=["locks-is-a-file", "read-only-mount"])
def unwritable_vault(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A vault with two snapshots whose writes really fail (chmod does not stop root)."""
    vault = tmp_path / "vault"
    work = make_tree(tmp_path / "w", {"f": "1"})
    liferaft.Vault(vault).snapshot([work], run="r")
    (work / "g").write_text("2")
    liferaft.Vault(vault).snapshot([work], run="r")
    if request.param == "locks-is-a-file":
        shutil.rmtree(vault / "locks", ignore_errors=True)
        (vault / "locks").write_text("not a folder")
        return vault
    ro = tmp_path / "ro"
    ro.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command here")
    bind = subprocess.run(["mount", "--bind", str(vault), str(ro)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"a read-only bind mount needs root and CAP_SYS_ADMIN: {bind.stderr.strip()}")
    request.addfinalizer(lambda: subprocess.run(["umount", str(ro)], check=True))
    remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True, text=True)
    if remount.returncode != 0:
        pytest.skip(f"cannot make the bind mount read-only: {remount.stderr.strip()}")
    return ro


def test_a_vault_that_cannot_be_written_gets_one_line_for_every_write(unwritable_vault: Path, tmp_path: Path) -> None:
    url = str(unwritable_vault)
    before = [s["id"] for s in json.loads(cli("--vault", url, "snapshots", "--json").stdout)]
    assert len(before) == 2
    for args, doing in (
        (["prune"], "pruning"),
        (["forget", "--run", "r", "--keep-last", "2", "--prune"], "pruning"),
        (["snapshot", str(tmp_path / "w"), "--run", "r"], "writing a snapshot"),
    ):
        r = cli("--vault", url, *args)
        _one_line_error(r, f"the vault at {url} failed while {doing}: ", "locks", "committed snapshots are intact")
        assert r.returncode == 2, (args, r.stderr)
    # Nothing lost: the snapshots are all there and restore reads them.
    assert [s["id"] for s in json.loads(cli("--vault", url, "snapshots", "--json").stdout)] == before
    r = cli("--vault", url, "restore", "--run", "r", "--to", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "w" / "g").read_text() == "2"


# ---------------------------------------------------------------- listing


def test_snapshots_piped_are_never_cut_or_wrapped(tmp_path: Path) -> None:
    vault = liferaft.Vault(tmp_path / "vault")
    run = "liferaft-demo-with-a-rather-long-run-name"
    snap = vault.snapshot(
        [make_tree(tmp_path / "w", {"f": "1"})],
        run=run,
        step=1200,
        tags={"trigger": "interval", "host-kind": "colab"},
        metrics={"val_loss": 0.31},
    )
    r = cli("--vault", vault.url, "snapshots", env={"COLUMNS": "80"})  # stdout is a pipe
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if snap.short_id in line]
    assert len(rows) == 1, r.stdout
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.time))
    for whole in (run, taken, "val_loss=0.31", "trigger=interval", "host-kind=colab", "1200"):
        assert whole in rows[0], (whole, r.stdout)
    assert "…" not in r.stdout


def test_snapshots_warns_about_manifests_it_cannot_read(tmp_path: Path) -> None:
    vault = liferaft.Vault(tmp_path / "vault")
    work = make_tree(tmp_path / "w", {"f": "1"})
    good = vault.snapshot([work], run="r", step=1)
    (work / "f").write_text("2")
    bad = vault.snapshot([work], run="r", step=2)
    (tmp_path / "vault" / "snapshots" / f"{bad.id}.json").write_text("garbage\n")
    r = cli("--vault", vault.url, "snapshots")
    assert r.returncode == 0 and good.short_id in r.stdout and bad.short_id not in r.stdout, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("warning: 1 snapshot manifest could not be read") and bad.short_id in lines[0], lines[0]
    assert "liferaft verify" in lines[0]
    r = cli("--vault", vault.url, "snapshots", "--json")
    assert r.returncode == 0 and [s["id"] for s in json.loads(r.stdout)] == [good.id]  # stdout stays JSON
    assert bad.short_id in r.stderr


# ---------------------------------------------------------------- run names, forget, wording


@pytest.mark.parametrize("name", ["x\ny", "red\x1b[31mtext", "tab\there", "cr\rhere", "del\x7f", "bidi\u202eevil", "line\u2028sep"])
def test_run_names_with_control_characters_are_refused(tmp_path: Path, name: str) -> None:
    work = make_tree(tmp_path / "w", {"f": "1"})
    fresh = tmp_path / "fresh"
    _one_line_error(cli("--vault", str(fresh), "snapshot", str(work), "--run", name), "control character", "--run mnist")
    assert not fresh.exists()  # refused before the vault was made
    vault = tmp_path / "vault"
    liferaft.Vault(vault).snapshot([work], run="r")
    for args in (["snapshots", "--run", name], ["restore", "--run", name], ["forget", "--run", name, "--keep-last", "1"]):
        r = cli("--vault", str(vault), *args)
        _one_line_error(r, "control character")
        assert r.returncode == 2
    with pytest.raises(liferaft.LiferaftError, match="control character"):
        liferaft.Vault(vault).snapshot([work], run=name)
    with pytest.raises(liferaft.LiferaftError, match="control character"):
        liferaft.Vault(vault).snapshots(run=name)
    with pytest.raises(liferaft.LiferaftError, match="control character"):
        liferaft.Vault(vault).restore(run=name, to=tmp_path / "back")
    assert len(liferaft.Vault(vault).snapshots()) == 1 and not (tmp_path / "back").exists()


def test_printable_unicode_run_names_are_welcome(tmp_path: Path) -> None:
    name = "mnist 日本語 ✓ lr=3e-4"
    r = cli("--vault", str(tmp_path / "v"), "snapshot", str(make_tree(tmp_path / "w", {"f": "1"})), "--run", name)
    assert r.returncode == 0, r.stderr
    assert liferaft.Vault(tmp_path / "v").snapshots(run=name)[0].run == name


def test_forget_counts_a_snapshot_named_twice_once(tmp_path: Path) -> None:
    vault = liferaft.Vault(tmp_path / "vault")
    work = make_tree(tmp_path / "w", {"f": "1"})
    snap = vault.snapshot([work], run="r")
    (work / "f").write_text("2")
    kept = vault.snapshot([work], run="r")
    r = cli("--vault", vault.url, "forget", snap.id, snap.id[:8], snap.short_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"forgot 1 snapshot: {snap.short_id}"
    assert [s.id for s in vault.snapshots()] == [kept.id]


def test_messages_count_in_words(tmp_path: Path) -> None:
    vault = str(tmp_path / "vault")
    work = make_tree(tmp_path / "w", {"f": "1"})
    r = cli("--vault", vault, "snapshot", str(work), "--run", "r")
    assert r.returncode == 0 and ": 1 file, " in r.stdout, r.stdout
    r = cli("--vault", vault, "restore", "--run", "r", "--to", str(tmp_path / "back"))
    assert r.returncode == 0 and "(run 'r'): 1 file, " in r.stdout, r.stdout
    assert "None" not in r.stdout
    r = cli("--vault", vault, "verify")
    assert r.returncode == 0 and r.stdout.startswith("ok: 1 snapshot, 1 pack, "), r.stdout
    r = cli("--vault", vault, "info")
    assert ": 1 snapshot, 1 pack, " in r.stdout, r.stdout
    r = cli("--vault", vault, "forget", "--run", "r", "--keep-last", "1", "--prune")
    assert r.returncode == 0 and r.stdout.startswith("forgot 0 snapshots\npruned 0 packs, "), r.stdout


def test_json_on_a_command_that_prints_a_log_is_refused(tmp_path: Path) -> None:
    # Ignored, it made a script parse liferaft run's log lines as JSON.
    work = tmp_path / "work"
    work.mkdir()
    for argv in (["run", "--keep", "x", "--", "python", "-c", "open('started', 'w')"], ["demo"]):
        r = cli("--vault", str(tmp_path / "v"), "--json", *argv, cwd=work)
        assert r.returncode == 2, r.stderr
        one_line_error(r, f"liferaft {argv[0]} has no --json output", "drop --json; it works with forget, info")
    assert not (work / "started").exists() and not (tmp_path / "v").exists()
    r = cli("--vault", str(tmp_path / "v"), "--json", "snapshot", str(work), "--run", "w")
    assert r.returncode == 0 and json.loads(r.stdout)["run"] == "w", r.stderr


def test_a_run_the_vault_does_not_have_is_an_error_naming_the_runs(tmp_path: Path) -> None:
    # `liferaft restore --run mnsit` exited 0 having restored nothing: a typo passed for a first run.
    vault = str(tmp_path / "v")
    src = make_tree(tmp_path / "w", {"ckpt/m.pt": "1"})
    for run in ("mnist", "cifar"):
        liferaft.Vault(vault).snapshot([src / "ckpt"], run=run)
    work = tmp_path / "work"
    work.mkdir()
    r = cli("--vault", vault, "restore", "--run", "mnsit", "--to", str(work / "back"))
    one_line_error(r, "no run 'mnsit' in the vault at", "did you mean 'mnist'?", "runs there: cifar, mnist")
    assert r.returncode == 2 and r.stdout == "" and not (work / "back").exists()
    # a name close to no run is a new run's first restore (`restore --run exp2 && python train.py`)
    r = cli("--vault", vault, "restore", "--run", "imagenet", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["restored"] is None, r.stderr
    r = cli("--vault", vault, "restore", "--run", "imagenet")
    assert (
        r.returncode == 0 and "nothing to restore: no snapshot of run 'imagenet' (runs in this vault: cifar, mnist" in r.stderr + r.stdout
    )
    r = cli("--vault", vault, "snapshots", "--run", "imagenet")
    one_line_error(r, "no run 'imagenet'", "pick one with --run; runs there: cifar, mnist")
    assert r.returncode == 2 and r.stdout == ""
    r = cli("--vault", vault, "snapshots", "--run", "mnsit")
    one_line_error(r, "no run 'mnsit'", "did you mean 'mnist'?")
    assert r.returncode == 2
    # --json answers the question asked (none), for a script that asks before a new run's
    # first snapshot; the hint goes to stderr
    r = cli("--vault", vault, "snapshots", "--run", "mnsit", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [] and "did you mean 'mnist'?" in r.stderr, r.stderr
    r = cli("--vault", vault, "forget", "--run", "mnsit", "--keep-last", "1", "--prune")
    one_line_error(r, "no run 'mnsit'", "nothing was forgotten", "did you mean 'mnist'?")
    assert r.returncode == 2 and len(liferaft.Vault(vault).snapshots()) == 2
    # the right name still works
    r = cli("--vault", vault, "snapshots", "--run", "mnist", "--json")
    assert r.returncode == 0 and [s["run"] for s in json.loads(r.stdout)] == ["mnist"] and r.stderr == ""


def test_restore_to_a_file_is_one_line(tmp_path: Path) -> None:
    vault = str(tmp_path / "v")
    liferaft.Vault(vault).snapshot([make_tree(tmp_path / "w", {"ckpt/m.pt": "1"}) / "ckpt"], run="r")
    target = tmp_path / "model.pt"
    target.write_text("mine")
    r = cli("--vault", vault, "restore", "--run", "r", "--to", str(target))
    one_line_error(r, f"--to {target} is a file, not a folder", "give a folder to restore into")
    assert r.returncode == 2 and target.read_text() == "mine"
    r = cli("--vault", vault, "restore", "--run", "r", "--to", str(target / "sub"))
    one_line_error(r, f"is inside {target}, which is a file, not a folder")
    assert r.returncode == 2 and target.read_text() == "mine"


HF_CONFIG = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768, "vocab_size": 30522}


def test_a_folder_with_someone_elses_config_json_is_not_a_vault(tmp_path: Path) -> None:
    # A Hugging Face model folder has a config.json too: it is not a damaged vault.
    model = make_tree(tmp_path / "bert", {"config.json": json.dumps(HF_CONFIG), "model.safetensors": b"\0" * 64})
    before = tree_state(model)
    work = make_tree(tmp_path / "work", {"f": "1"})
    for args in (["snapshots"], ["restore", "--run", "r"], ["snapshot", str(work / "f")]):
        r = cli("--vault", str(model), *args)
        one_line_error(r, f"{model} is not a liferaft vault (its config.json is not liferaft's)", "point --vault at the vault folder")
        assert r.returncode == 2, args
    assert tree_state(model) == before  # nothing written into it
    # The Python API has no --vault: its advice names no flag.
    with pytest.raises(liferaft.errors.NotAVault) as info:
        liferaft.Vault(model).snapshots()
    assert "is not a liferaft vault" in str(info.value) and "--vault" not in str(info.value)


def test_a_damaged_config_of_a_real_vault_is_still_damage(tmp_path: Path) -> None:
    vault = tmp_path / "v"
    liferaft.Vault(vault).snapshot([make_tree(tmp_path / "w", {"f": "1"}) / "f"], run="r")
    config = vault / "config.json"
    good = json.loads(config.read_text())
    empty = tmp_path / "fresh"  # a vault with no snapshot yet: only its config says it is ours
    liferaft.Vault(empty).repository(create=True)
    cases = {
        "no format": (vault, json.dumps({k: v for k, v in good.items() if k != "format"}), "has no format version"),
        "cut short": (vault, config.read_text()[:40], "is not valid JSON"),
        "emptied": (empty, "", "is not valid JSON"),
        "replaced by {}, snapshots left": (vault, "{}", "has no format version"),
        "no chunker, no snapshots": (empty, json.dumps({**good, "chunker": None}), "chunker parameters"),
    }
    for label, (where, text, needle) in cases.items():
        saved = (where / "config.json").read_text()
        (where / "config.json").write_text(text)
        r = cli("--vault", str(where), "snapshots")
        one_line_error(r, needle)
        assert r.returncode == 1 and "not a liferaft vault" not in r.stderr, (label, r.stderr)
        (where / "config.json").write_text(saved)


def test_a_folder_without_config_json_says_what_it_holds(tmp_path: Path) -> None:
    notes = make_tree(tmp_path / "notes", {"todo.txt": "x", "data/a.csv": "1"})
    r = cli("--vault", str(notes), "snapshots")
    one_line_error(r, "is not a liferaft vault (it holds data/, todo.txt but no config.json)", "point --vault at an empty or new folder")
    assert r.returncode == 2
    # Only the empty folders of a vault: "it has files" was not true; it says what to do.
    skeleton = make_tree(tmp_path / "skeleton", {"snapshots": None})
    r = cli("--vault", str(skeleton), "snapshots")
    one_line_error(r, "is not a liferaft vault (it holds only empty snapshots/ and no config.json)", "remove those empty folders")
    assert r.returncode == 2
    # A vault that lost its config.json (deleted, or not synced yet on a Drive mount): damage, not a stranger.
    vault = tmp_path / "v"
    liferaft.Vault(vault).snapshot([make_tree(tmp_path / "w", {"f": "1"}) / "f"], run="r")
    (vault / "config.json").unlink()
    for args in (["snapshots"], ["snapshot", str(tmp_path / "w" / "f")]):
        r = cli("--vault", str(vault), *args)
        one_line_error(r, "holds a liferaft vault's data but no config.json", "restore config.json from a copy")
        assert r.returncode == 1
    assert not (vault / "config.json").exists()


def test_restore_in_place_of_a_snapshot_from_another_machine_whose_folder_is_absent_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run restored on a fresh machine into another folder, unchanged since: its newest
    # snapshot still names the first machine's path. Restoring "in place" there would
    # make that machine's folders here, where nothing reads them.
    vault = str(tmp_path / "vault")
    first = make_tree(tmp_path / "colab" / "content" / "proj" / "ckpt", {"model.pt": os.urandom(3000)})
    monkeypatch.setattr("liferaft.vault.snapshot.hostname", lambda: "colab-7f3a")
    snap = liferaft.Vault(vault).snapshot([first], run="r")
    monkeypatch.undo()
    expected = tree_state(first)
    shutil.rmtree(tmp_path / "colab")

    here = tmp_path / "kaggle" / "working"
    here.mkdir(parents=True)
    r = cli("--vault", vault, "restore", "--run", "r", cwd=here)
    one_line_error(
        r,
        f"snapshot {snap.short_id} was taken on colab-7f3a from {first}, and {tmp_path / 'colab'} does not exist on this machine",
        "restore with --to DIR (DIR/ckpt)",
    )
    assert r.returncode == 2 and not (tmp_path / "colab").exists()
    with pytest.raises(liferaft.errors.RestoreRefused, match=r"pass to=DIR"):
        liferaft.Vault(vault).restore(run="r")

    # where it says
    r = cli("--vault", vault, "restore", "--run", "r", "--to", ".", cwd=here)
    assert r.returncode == 0, r.stderr
    assert tree_state(here / "ckpt") == expected

    # the project is there, one folder of it not made yet (outputs/ on a new Colab VM,
    # another host name): back in place, the folder made
    nested = make_tree(tmp_path / "c1" / "proj" / "outputs" / "ckpt", {"w": "3"})
    monkeypatch.setattr("liferaft.vault.snapshot.hostname", lambda: "colab-91bc")
    liferaft.Vault(vault).snapshot([nested], run="n")
    monkeypatch.undo()
    shutil.rmtree(nested.parent)
    r = cli("--vault", vault, "restore", "--run", "n", cwd=here)
    assert r.returncode == 0, r.stderr
    assert (nested / "w").read_text() == "3"

    # the same layout on the other machine (both /content/proj): back in place, as ever
    first.parent.mkdir(parents=True)
    r = cli("--vault", vault, "restore", "--run", "r", cwd=here)
    assert r.returncode == 0, r.stderr
    assert tree_state(first) == expected

    # this machine's own snapshot: a folder deleted since is made again
    mine = make_tree(tmp_path / "mine" / "proj" / "ckpt", {"a": "1"})
    liferaft.Vault(vault).snapshot([mine], run="m")
    shutil.rmtree(tmp_path / "mine")
    r = cli("--vault", vault, "restore", "--run", "m", cwd=here)
    assert r.returncode == 0, r.stderr
    assert (mine / "a").read_text() == "1"
