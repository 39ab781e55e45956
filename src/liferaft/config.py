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
        options = vault.get("options", {})
        if not isinstance(options, dict):
            raise LiferaftError(f"{path}: [vault.options] must be a table", "write [vault.options] with lines like retry_deadline = 300")
        url = vault.get("url")
        if url is None:
            # Without a URL the table names no vault, and its options apply to none.
            raise LiferaftError(f"{path}: [vault] has no url", 'write url = "gs://bucket/vault" (or a folder) under [vault]')
        if isinstance(url, str) and url:
            _check_store_options(path, url, options)
    run = settings.get("run")
    if run is not None and (not isinstance(run, str) or not run):
        raise LiferaftError(f"{path}: 'run' must be a run name", 'write run = "mnist"')
    return settings


#: Options liferaft itself takes from [vault.options], by URL scheme (the rest go to the store's client).
_OWN_OPTIONS = {
    "s3": ("retry_deadline", "create_only"),
    "gcs": ("retry_deadline", "create_only"),
    "rclone": ("retry_deadline", "rclone", "rclone_config"),
}
#: What liferaft sets itself for an rclone:// vault (its own ``rclone serve s3``): a second value is an error.
_RCLONE_SETS = ("endpoint_url", "key", "secret", "username", "password", "create_only")


def _keywords(*functions: Any) -> set[str]:
    """Keyword parameters of ``functions`` (an ``__init__`` of each class in a class's MRO)."""
    import inspect

    names: set[str] = set()
    for fn in functions:
        for klass in getattr(fn, "__mro__", None) or ():
            if "__init__" in vars(klass) and klass is not object:
                names |= _keywords(vars(klass)["__init__"])
        if isinstance(fn, type):
            continue
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a C slot without a signature
            continue
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    return names


def _client_options(scheme: str) -> tuple[str, set[str], dict[str, set[str]]] | None:
    """(the client's name, the keywords it takes, known keys of its table-valued options),
    or None when its package is not installed (opening the vault says what to install)."""
    try:
        from fsspec.dircache import DirCache

        if scheme == "gcs":
            from gcsfs import GCSFileSystem

            return "gcsfs.GCSFileSystem", _keywords(GCSFileSystem, DirCache) | {"skip_instance_cache"}, {}
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession
        from botocore.config import Config
        from botocore.session import Session
        from s3fs import S3FileSystem
    except ImportError:
        return None
    # s3fs hands keywords it does not know to the botocore session (profile=...).
    names = _keywords(S3FileSystem, DirCache, AioSession) | {"skip_instance_cache"}
    tables = {
        "config_kwargs": set(Config.OPTION_DEFAULTS) | _keywords(AioConfig),
        "client_kwargs": _keywords(Session.create_client) - {"service_name", "config"},
    }
    return "s3fs.S3FileSystem", names, tables


def _check_store_options(path: Path, url: str, options: dict[str, Any]) -> None:
    """Refuse an option the vault's store would ignore (s3fs and gcsfs take unknown keywords
    without a word) or that no store takes (a local folder has no options)."""
    import difflib
    from urllib.parse import urlparse

    if not options:
        return
    scheme = urlparse(url).scheme.lower()
    scheme = {"gs": "gcs", "file": ""}.get(scheme, scheme)
    if scheme in ("", "memory") or (len(scheme) == 1 and os.name == "nt"):
        kind = "a memory:// vault" if scheme == "memory" else "a local folder vault"
        raise LiferaftError(
            f"{path}: [vault.options] has {next(iter(options))!r}, but {kind} takes no options",
            "options are for s3://, gs:// and rclone:// vaults: remove [vault.options]",
        )
    if scheme not in _OWN_OPTIONS:
        return  # an unknown scheme: opening the vault names the ones there are
    client = _client_options("gcs" if scheme == "gcs" else "s3")
    if client is None:
        return
    name, known, tables = client
    known = known | set(_OWN_OPTIONS[scheme])
    if scheme == "rclone":
        known -= set(_RCLONE_SETS)
    shown = f"{scheme if scheme != 'gcs' else 'gs'}://"
    for key, value in options.items():
        if scheme == "rclone" and key in _RCLONE_SETS:
            raise LiferaftError(
                f"{path}: [vault.options] {key!r} cannot be set for an rclone:// vault: liferaft sets it to reach its own rclone serve s3",
                f"remove {key} from [vault.options]",
            )
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            theirs = ", ".join(sorted(known - set(_OWN_OPTIONS[scheme])))
            raise LiferaftError(
                f"{path}: unknown option {key!r} in [vault.options] ({shown} vaults)",
                f"did you mean {near[0]!r}?"
                if near
                else f"known options: liferaft's {', '.join(_OWN_OPTIONS[scheme])} and {name}'s {theirs}",
            )
        if key in tables and isinstance(value, dict):
            for sub in value:
                if sub not in tables[key]:
                    near = difflib.get_close_matches(sub, sorted(tables[key]), n=1)
                    raise LiferaftError(
                        f"{path}: unknown key {sub!r} in [vault.options] {key} ({shown} vaults)",
                        f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(sorted(tables[key]))}",
                    )


def project_settings(start: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The nearest ``liferaft.toml`` (in ``start``, default the working folder, or a parent) and its checked settings."""
    path = find_project_config(start)
    if path is None:
        return None, {}
    return path, _check_settings(path, _load_toml(path))


def project_keeps(start: Path | None = None) -> list[str]:
    """``keep = [...]`` from ``liferaft.toml``, as paths from ``start`` (default the working folder).

    Paths in the file mean the same from any folder below it: they are taken from the
    file's folder, as its ``vault`` is, so from a subfolder ``keep = ["checkpoints"]``
    comes back as ``../checkpoints``.
    """
    path, settings = project_settings(start)
    keep = settings.get("keep")
    if path is None or keep is None:
        return []
    if isinstance(keep, str):
        keep = [keep]
    if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
        raise LiferaftError(f"{path}: 'keep' must be a list of paths", 'write keep = ["checkpoints", "runs"]')
    here = os.path.abspath(start or os.getcwd())
    return [_from_folder(k, path.parent, here) for k in keep]


def _from_folder(entry: str, folder: Path, here: str) -> str:
    """``entry`` (relative to ``folder``) as a path relative to ``here``; absolute ones unchanged."""
    if os.path.isabs(os.path.expanduser(entry)):
        return entry
    target = os.path.normpath(os.path.join(folder.absolute(), entry))
    try:
        return os.path.relpath(target, here)
    except ValueError:  # another drive (Windows)
        return target


def absolute_vault_url(url: str, base: str | os.PathLike[str] | None = None) -> str:
    """A local vault path made absolute (from ``base``, default the working folder); URLs
    with a scheme unchanged. A process that changes folder, or a command ``liferaft run``
    starts with ``LIFERAFT_VAULT`` set, then reaches the same vault.

    >>> absolute_vault_url("gs://bucket/vault")
    'gs://bucket/vault'
    """
    from urllib.parse import urlparse

    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1 and os.name == "nt":
        scheme = ""  # C:\\vault
    if scheme == "":
        path = os.path.expanduser(url)
    elif scheme == "file" and not parsed.netloc and parsed.path and not parsed.path.startswith("/"):
        path = os.path.expanduser(parsed.path)  # file:vault, a relative file URL
    else:
        return url
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(os.path.abspath(base or os.getcwd()), path))
    return path if scheme == "" else f"file://{path}"


def resolve_vault(explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> VaultChoice:
    toml = _toml_vault(cwd)
    if explicit is not None:
        url = os.fspath(explicit)
        if not url.strip():
            # `--vault "$VAULT"` with the variable unset: the default vault instead would
            # be a silent surprise (on Colab it is lost with the machine).
            raise LiferaftError("the vault URL given is empty", "give a folder or a URL such as gs://bucket/vault, or leave --vault out")
        url = absolute_vault_url(url)
        return VaultChoice(url, "--vault", toml.options if toml and toml.url == url else {})
    env = os.environ.get("LIFERAFT_VAULT")
    if env is not None:
        if not env.strip():
            raise LiferaftError("LIFERAFT_VAULT is set but empty", "set it to a folder or a URL such as gs://bucket/vault, or unset it")
        env = absolute_vault_url(env)
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
            return VaultChoice(absolute_vault_url(value, path.parent), str(path), dict(options))  # relative to the toml file
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
