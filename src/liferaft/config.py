"""Which vault: ``--vault URL``, then ``LIFERAFT_VAULT``, then ``liferaft.toml``, then the default."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LiferaftError

CONFIG_FILE = "liferaft.toml"


@dataclass(frozen=True)
class VaultChoice:
    url: str
    source: str  # "--vault", "LIFERAFT_VAULT", "<path>/liferaft.toml" or "default"
    options: dict[str, Any] = field(default_factory=dict)  # store client options from liferaft.toml

    @property
    def is_default(self) -> bool:
        return self.source == "default"


def default_vault_dir() -> Path:
    """The embedded default vault: a folder in the user's data directory."""
    import platformdirs

    return Path(platformdirs.user_data_dir("liferaft", appauthor=False)) / "vault"


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise LiferaftError(f"{path} cannot be read: {err}", "fix the file or remove it") from None


def find_project_config(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate
    return None


SETTINGS = {"vault": "a URL or a folder, or a [vault] table", "run": "a run name", "keep": "a list of paths"}
VAULT_TABLE = ("url", "options")


def _unknown(path: Path, where: str, key: str, known: list[str]) -> LiferaftError:
    import difflib

    near = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return LiferaftError(
        f"{path}: unknown setting {key!r}{where}",
        f"{hint}known settings: {', '.join(known)} (a misspelt 'vault' would send snapshots to the default vault)",
    )


def _check_settings(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Refuse what liferaft would otherwise ignore: a misspelt key means a setting the
    user believes in is not applied (on Colab, snapshots to a vault that dies with the
    machine)."""
    for key in settings:
        if key not in SETTINGS:
            raise _unknown(path, "", key, list(SETTINGS))
    vault = settings.get("vault")
    if isinstance(vault, dict):
        for key in vault:
            if key not in VAULT_TABLE:
                raise _unknown(path, " in [vault]", key, list(VAULT_TABLE))
        if not isinstance(vault.get("options", {}), dict):
            raise LiferaftError(f"{path}: [vault.options] must be a table", "write [vault.options] with lines like retry_deadline = 300")
    run = settings.get("run")
    if run is not None and (not isinstance(run, str) or not run):
        raise LiferaftError(f"{path}: 'run' must be a run name", 'write run = "mnist"')
    return settings


def project_settings(start: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    path = find_project_config(start)
    if path is None:
        return None, {}
    return path, _check_settings(path, _load_toml(path))


def resolve_vault(explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> VaultChoice:
    toml = _toml_vault(cwd)
    if explicit is not None:
        url = os.fspath(explicit)
        if not url.strip():
            # `--vault "$VAULT"` with the variable unset: the default vault instead would
            # be a silent surprise (on Colab it is lost with the machine).
            raise LiferaftError("the vault URL given is empty", "give a folder or a URL such as gs://bucket/vault, or leave --vault out")
        return VaultChoice(url, "--vault", toml.options if toml and toml.url == url else {})
    env = os.environ.get("LIFERAFT_VAULT")
    if env is not None:
        if not env.strip():
            raise LiferaftError("LIFERAFT_VAULT is set but empty", "set it to a folder or a URL such as gs://bucket/vault, or unset it")
        return VaultChoice(env, "LIFERAFT_VAULT", toml.options if toml and toml.url == env else {})
    if toml is not None:
        return toml
    return VaultChoice(str(default_vault_dir()), "default")


def _toml_vault(cwd: Path | None) -> VaultChoice | None:
    """The vault a liferaft.toml names, with its store options (they also apply when the
    same URL comes from --vault or LIFERAFT_VAULT)."""
    path, settings = project_settings(cwd)
    if path is not None:
        value = settings.get("vault")
        options: dict[str, Any] = {}
        if isinstance(value, dict):
            options = value.get("options", {}) if isinstance(value.get("options", {}), dict) else {}
            value = value.get("url")
        if value is not None:
            if not isinstance(value, str) or not value:
                raise LiferaftError(f"{path}: 'vault' must be a URL or a path", 'write vault = "gs://bucket/vault" or a folder')
            if "://" not in value and not os.path.isabs(os.path.expanduser(value)):
                value = str((path.parent / value).absolute())  # relative to the toml file
            return VaultChoice(os.path.expanduser(value), str(path), dict(options))
    return None


def default_run_name(cwd: Path | None = None) -> str:
    """The run name when none is given: ``LIFERAFT_RUN`` (``liferaft run`` sets it for its
    command, so a Checkpointer or a snapshot there joins that run), ``run`` in
    ``liferaft.toml``, else the working folder's name: ``~/mnist`` → ``mnist``."""
    env = os.environ.get("LIFERAFT_RUN", "").strip()
    if env:
        return env
    _, settings = project_settings(cwd)
    run = settings.get("run")
    if run:
        return str(run)
    name = (cwd or Path.cwd()).absolute().name or "default"
    return re.sub(r"[^\w.\-]+", "-", name).strip("-") or "default"
