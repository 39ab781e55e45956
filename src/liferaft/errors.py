"""Errors that liferaft raises on purpose.

Every error a user can cause carries one line saying what is wrong and what to do;
the CLI prints that line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class LiferaftError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user.

    ``cli_fix`` is the same advice in the command line's words (``--vault``, ``--force``)
    where ``fix`` names the Python API's (``force=True``); the CLI prints that one.
    """

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None, *, cli_fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        self.cli_fix = cli_fix
        super().__init__(f"{what}; {fix}" if fix else what)


class VaultNotFound(LiferaftError):
    """There is no vault at the given location."""


class NotAVault(LiferaftError):
    """The location holds something that is not a liferaft vault."""


class BadVaultURL(LiferaftError):
    """The vault URL cannot be understood."""


class VaultFormatTooNew(LiferaftError):
    """The vault was written by a newer liferaft."""


class VaultCorrupt(LiferaftError):
    """Stored bytes failed a check (hash, framing, schema)."""

    exit_code = 1


class SnapshotNotFound(LiferaftError):
    """No snapshot matches the request."""


class VaultFull(LiferaftError):
    """The store ran out of space; the previous committed state is intact."""


class VaultUnreachable(LiferaftError):
    """The store could not be reached."""


class LockedError(LiferaftError):
    """Another process holds a lock that this operation needs."""


class RestoreRefused(LiferaftError):
    """A restore would write outside its target or over something it must not."""
