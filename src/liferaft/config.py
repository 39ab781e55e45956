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


def project_settings(start: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    path = find_project_config(start)
    if path is None:
        return None, {}
    return path, _load_toml(path)


def resolve_vault(explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> VaultChoice:
    toml = _toml_vault(cwd)
    if explicit is not None and os.fspath(explicit) != "":
        url = os.fspath(explicit)
        return VaultChoice(url, "--vault", toml.options if toml and toml.url == url else {})
    env = os.environ.get("LIFERAFT_VAULT")
    if env:
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
    """A run is named after the working folder unless given: ``~/mnist`` → ``mnist``."""
    _, settings = project_settings(cwd)
    run = settings.get("run")
    if isinstance(run, str) and run:
        return run
    name = (cwd or Path.cwd()).absolute().name or "default"
    return re.sub(r"[^\w.\-]+", "-", name).strip("-") or "default"
