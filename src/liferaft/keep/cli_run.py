"""The ``liferaft run`` command: parse, then hand over to the supervisor."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..errors import LiferaftError


@click.command(
    "run",
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND...")
@click.option("--keep", "keep", multiple=True, metavar="PATH", help="File or folder to keep (repeatable), e.g. checkpoints.")
@click.option("--run", "run_name", metavar="NAME", help="Run name (default: LIFERAFT_RUN, liferaft.toml, the working folder's name).")
@click.option("--every", default="60", show_default=True, metavar="SECONDS", help="Snapshot interval (when something changed).")
@click.option("--restarts", default=0, show_default=True, type=click.IntRange(min=0), help="Restart a failed command this many times.")
@click.option(
    "--time-limit",
    metavar="DURATION",
    help="Stop the command (SIGTERM) in time for the final snapshot: 11h30m, 90m, off. "
    "Default: the platform's cap (Colab 12h, Kaggle 12h/9h TPU, Studio Lab 4h), none elsewhere.",
)
@click.option("--grace", default="20", show_default=True, metavar="SECONDS", help="Time the command gets after SIGTERM.")
@click.option("--force", is_flag=True, help="Restore the snapshot even over local files that differ from it.")
@click.option("--include-secrets", is_flag=True, help="Also keep credential files (.netrc, *.pem, kaggle.json, .env, ...).")
@click.option("--offline-ok", is_flag=True, help="Start even when the vault cannot be reached or written (snapshots are retried).")
@click.option("-v", "--verbose", is_flag=True, help="Report every snapshot, not only the first.")
@click.option("--vault", "vault_url", metavar="URL", help="Vault folder or URL (else LIFERAFT_VAULT, liferaft.toml, the default).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors.")
def run_command(
    command: tuple[str, ...],
    keep: tuple[str, ...],
    run_name: str | None,
    every: str,
    restarts: int,
    time_limit: str | None,
    grace: str,
    force: bool,
    include_secrets: bool,
    offline_ok: bool,
    verbose: bool,
    vault_url: str | None,
    quiet: bool,
) -> int:
    """Run COMMAND and keep its state alive: restore, snapshot in the background, survive preemption.

    \b
    liferaft run --keep checkpoints --keep runs -- python train.py --epochs 50
    liferaft run --keep checkpoints --restarts 3 --time-limit 11h30m -- python train.py

    Kept paths missing here are restored from the run's newest snapshot first (local work
    newer than the snapshot is never overwritten). On SIGTERM, SIGINT, SIGHUP or SIGUSR1
    the signal is passed on, the command gets --grace seconds, a final snapshot is taken,
    and liferaft exits with the command's status. A vault that cannot be reached or
    written stops liferaft before the command starts, unless --offline-ok. The command
    sees LIFERAFT_RUN, LIFERAFT_RESUMED (1 or 0), LIFERAFT_SNAPSHOT (the snapshot
    resumed from, else empty), LIFERAFT_VAULT and LIFERAFT_RESTARTS (0, then 1, 2, ...).
    """
    from ..config import project_keeps
    from .supervisor import RunOptions, Supervisor
    from .units import parse_duration

    root: Any = click.get_current_context().find_root().obj
    if command and command[0].startswith("-") and command[0] != "-":
        raise LiferaftError(
            f"unknown option {command[0]} for liferaft run", "put the command after --, e.g. liferaft run --keep ckpt -- python train.py"
        )
    every_s = parse_duration(every, "--every")
    grace_s = parse_duration(grace, "--grace")
    assert every_s is not None and grace_s is not None
    limit: float | str | None = "auto" if time_limit is None else _time_limit(time_limit)
    opts = RunOptions(
        command=list(command),
        keep=list(keep) or project_keeps(),
        keep_given="--keep" if keep else "liferaft.toml",
        run=run_name,
        vault=vault_url or getattr(root, "vault_url", None),
        every=every_s,
        restarts=restarts,
        time_limit=limit,
        grace=grace_s,
        force=force,
        offline_ok=offline_ok,
        include_secrets=include_secrets,
        quiet=quiet or bool(getattr(root, "quiet", False)),
        verbose=verbose,
    )
    supervisor = Supervisor(opts)
    status = supervisor.run()
    if supervisor.abandoned:
        # The abandoned snapshot's uploads still run in this process's threads, and
        # Python's exit would wait for them: end now (prune removes what they stored).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _time_limit(text: str) -> float | None:
    """``--time-limit``: a positive duration, or off/none/no/never for no cap."""
    from .units import parse_duration

    seconds = parse_duration(text, "--time-limit", allow_off=True)
    if seconds is None and text.strip().lower() not in ("off", "none", "no", "never"):
        # parse_duration reads 0 as "off": written here it is far likelier a slip.
        raise LiferaftError(
            f"--time-limit {text} must be more than 0",
            "give a duration such as 11h30m, or --time-limit off for no cap (left out: the platform's cap)",
        )
    return seconds
