"""Vault selection and liferaft.toml: a setting liferaft would ignore is refused, not ignored."""

from __future__ import annotations

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
