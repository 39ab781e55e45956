"""Vault selection and liferaft.toml: a setting liferaft would ignore is refused, not ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import cli, make_tree, one_line_error


def _refused(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    one_line_error(r, *needles)


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('vaultt = "store"\n', ["unknown setting 'vaultt'", "did you mean 'vault'?"]),
        (
            '[vault]\nurl = "store"\n[vault.option]\nretry_deadline = 3\n',
            ["unknown setting 'option' in [vault]", "did you mean 'options'?"],
        ),
        ('[vault]\nurll = "store"\n', ["unknown setting 'urll' in [vault]", "did you mean 'url'?"]),
        ('vault = "store"\nrun = 7\n', ["'run' must be a run name", 'run = "mnist"']),
        ('vault = "store"\nkepp = ["ckpt"]\n', ["unknown setting 'kepp'", "did you mean 'keep'?"]),
    ],
)
def test_a_setting_liferaft_would_ignore_is_refused(tmp_path: Path, toml: str, needles: list[str]) -> None:
    # A misspelt 'vault' used to send snapshots to the default vault without a word: on
    # Colab, a folder that is lost with the machine.
    work = make_tree(tmp_path / "proj", {"f": "1"})
    (work / "liferaft.toml").write_text(toml)
    r = cli("snapshot", "f", cwd=work, env={"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "data")})
    _refused(r, str(work / "liferaft.toml"), *needles)
    assert not (tmp_path / "data").exists() and not (work / "store").exists()  # no vault was made anywhere


def test_a_valid_toml_still_applies(tmp_path: Path) -> None:
    work = make_tree(tmp_path / "proj", {"f": "1"})
    (work / "liferaft.toml").write_text('run = "m"\nkeep = ["f"]\n[vault]\nurl = "store"\n[vault.options]\n')
    r = cli("snapshot", "f", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "run 'm'" in r.stdout and (work / "store" / "config.json").is_file()


def test_an_empty_vault_url_is_refused_not_taken_for_the_default(tmp_path: Path) -> None:
    # `--vault "$VAULT"` with VAULT unset, or LIFERAFT_VAULT set from an empty variable.
    work = make_tree(tmp_path / "proj", {"f": "1"})
    env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "data")}
    _refused(cli("--vault", "", "snapshot", "f", cwd=work, env=env), "the vault URL given is empty", "leave --vault out")
    _refused(cli("--vault", " ", "snapshots", cwd=work, env=env), "the vault URL given is empty")
    _refused(cli("snapshot", "f", cwd=work, env={**env, "LIFERAFT_VAULT": ""}), "LIFERAFT_VAULT is set but empty", "unset it")
    assert not (tmp_path / "data").exists()


def test_an_empty_vault_url_is_refused_by_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import liferaft
    from liferaft.errors import LiferaftError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LiferaftError, match="empty"):
        liferaft.Vault("")
    monkeypatch.setenv("LIFERAFT_VAULT", "")
    with pytest.raises(LiferaftError, match="LIFERAFT_VAULT is set but empty"):
        liferaft.Vault()


def test_a_vault_path_that_is_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a vault")
    for cmd in (["snapshots"], ["snapshot", str(tmp_path / "afile")], ["verify"]):
        _refused(
            cli("--vault", str(tmp_path / "afile"), *cmd),
            f"{tmp_path / 'afile'} is a file, not a vault folder",
            "point --vault at a folder",
        )
        _refused(cli("--vault", str(tmp_path / "afile" / "v"), *cmd), f"{tmp_path / 'afile'} is a file, so there is no vault folder")
    assert (tmp_path / "afile").read_text() == "not a vault"


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        (
            '[vault]\nurl = "s3://bucket/v"\n[vault.options]\nendpont_url = "http://minio:9000"\n',
            ["unknown option 'endpont_url' in [vault.options] (s3:// vaults)", "did you mean 'endpoint_url'?"],
        ),
        (
            '[vault]\nurl = "s3://bucket/v"\n[vault.options]\nretry_dedline = 300\n',
            ["unknown option 'retry_dedline'", "did you mean 'retry_deadline'?"],
        ),
        (
            '[vault]\nurl = "s3://bucket/v"\n[vault.options]\nzzz = 1\n',
            ["unknown option 'zzz'", "known options: liferaft's retry_deadline, create_only and s3fs.S3FileSystem's", "endpoint_url"],
        ),
        (
            '[vault]\nurl = "s3://bucket/v"\n[vault.options]\nconfig_kwargs = { read_timout = 120 }\n',
            ["unknown key 'read_timout' in [vault.options] config_kwargs (s3:// vaults)", "did you mean 'read_timeout'?"],
        ),
        (
            '[vault]\nurl = "gs://bucket/v"\n[vault.options]\nprojet = "p"\n',
            ["unknown option 'projet' in [vault.options] (gs:// vaults)", "did you mean 'project'?"],
        ),
        (
            '[vault]\nurl = "rclone://gdrive/liferaft/v"\n[vault.options]\ncreate_only = true\n',
            ["'create_only' cannot be set for an rclone:// vault", "remove create_only"],
        ),
        (
            '[vault]\nurl = "store"\n[vault.options]\nretry_deadline = 300\n',
            ["[vault.options] has 'retry_deadline', but a local folder vault takes no options", "remove [vault.options]"],
        ),
        ("[vault.options]\nretry_deadline = 300\n", ["[vault] has no url", 'write url = "gs://bucket/vault"']),
    ],
)
def test_a_store_option_liferaft_would_ignore_is_refused(tmp_path: Path, toml: str, needles: list[str]) -> None:
    # s3fs and gcsfs take unknown keywords without a word, and a local folder takes none:
    # a misspelt endpoint_url or retry_deadline would silently not apply.
    pytest.importorskip("s3fs")
    pytest.importorskip("gcsfs")
    work = make_tree(tmp_path / "proj", {"f": "1"})
    (work / "liferaft.toml").write_text(toml)
    r = cli("snapshots", cwd=work, env={"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "data")})
    _refused(r, str(work / "liferaft.toml"), *needles)
    assert not (tmp_path / "data").exists() and not (work / "store").exists()


def test_the_store_options_the_readme_shows_are_accepted(tmp_path: Path) -> None:
    from liferaft.config import project_settings

    pytest.importorskip("s3fs")
    pytest.importorskip("gcsfs")
    toml = tmp_path / "liferaft.toml"
    toml.write_text(
        '[vault]\nurl = "s3://my-bucket/liferaft"\n[vault.options]\nretry_deadline = 300\nprofile = "training"\n'
        'endpoint_url = "https://r2.example"\nconfig_kwargs = { read_timeout = 120 }\ncreate_only = false\n'
        'client_kwargs = { region_name = "auto" }\n'
    )
    assert project_settings(tmp_path)[1]["vault"]["options"]["profile"] == "training"
    toml.write_text('[vault]\nurl = "gs://b/v"\n[vault.options]\nproject = "p"\ntoken = "/k.json"\nrequests_timeout = 120\n')
    assert project_settings(tmp_path)[1]["vault"]["options"]["project"] == "p"
    toml.write_text('[vault]\nurl = "rclone://gdrive/liferaft/v"\n[vault.options]\nrclone_config = "/r.conf"\nrclone = "/bin/rclone"\n')
    assert project_settings(tmp_path)[1]["vault"]["options"]["rclone"] == "/bin/rclone"


def test_paths_in_liferaft_toml_are_the_files_from_any_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from liferaft.config import project_keeps, resolve_vault
    from liferaft.errors import LiferaftError

    proj = tmp_path / "proj"
    (proj / "scripts" / "deep").mkdir(parents=True)
    (proj / "liferaft.toml").write_text('vault = "store"\nkeep = ["ckpt", "./runs/", "~/elsewhere", "/abs/path"]\n')
    monkeypatch.chdir(proj / "scripts" / "deep")
    assert project_keeps() == ["../../ckpt", "../../runs", "~/elsewhere", "/abs/path"]
    assert resolve_vault().url == str(proj / "store")
    monkeypatch.chdir(proj)
    assert project_keeps() == ["ckpt", "runs", "~/elsewhere", "/abs/path"]
    (proj / "liferaft.toml").write_text('keep = "ckpt"\n')
    assert project_keeps(proj / "scripts") == ["../ckpt"]
    (proj / "liferaft.toml").write_text("keep = 3\n")
    with pytest.raises(LiferaftError, match="'keep' must be a list of paths"):
        project_keeps()


def test_a_relative_vault_path_is_made_absolute_and_urls_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A process that changes folder, or a command given LIFERAFT_VAULT, must reach the same vault.
    from liferaft.config import absolute_vault_url, resolve_vault

    monkeypatch.chdir(tmp_path)
    assert resolve_vault("store").url == str(tmp_path / "store")
    assert resolve_vault("./a/../store/").url == str(tmp_path / "store")
    monkeypatch.setenv("LIFERAFT_VAULT", "store")
    assert resolve_vault().url == str(tmp_path / "store")
    assert absolute_vault_url("file:store") == f"file://{tmp_path / 'store'}"
    for url in ("gs://b/v", "s3://b/v", "memory://x/y", "rclone://r/f/v", "file:///abs/v", "/abs/v"):
        assert absolute_vault_url(url) == url
    home = os.path.expanduser("~")
    assert absolute_vault_url("~/v") == os.path.join(home, "v")
