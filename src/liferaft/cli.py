"""The ``liferaft`` command: parse, call the API, render. No work of its own."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from ._version import __version__
from .errors import LiferaftError, SnapshotNotFound
from .keep.units import plural


class Ctx:
    def __init__(self) -> None:
        self.vault_url: str | None = None
        self.quiet = False
        self.json = False

    def vault(self) -> Any:
        from .api import Vault

        return Vault(self.vault_url)

    def progress(self) -> Any:
        from .progress import default_progress

        return default_progress(self.quiet or self.json or not sys.stderr.isatty())

    def say(self, text: str) -> None:
        if not self.quiet and not self.json:
            click.echo(text)

    def data(self, obj: Any) -> None:
        click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def common(data: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--vault and --quiet on every command (and --json where output is data)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @click.option("--vault", "vault_url", metavar="URL", help="Vault folder or URL (else LIFERAFT_VAULT, liferaft.toml, the default).")
        @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
        @functools.wraps(fn)
        def inner(*args: Any, vault_url: str | None, quiet: bool, **kw: Any) -> Any:
            ctx = click.get_current_context().find_object(Ctx)
            assert ctx is not None
            if vault_url:
                ctx.vault_url = vault_url
            ctx.quiet = ctx.quiet or quiet
            if data:
                as_json = kw.pop("as_json")
                ctx.json = ctx.json or as_json
            return fn(ctx, *args, **kw)

        if data:
            inner = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(inner)
        return inner

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="liferaft")
@click.option("--vault", "vault_url", metavar="URL", help="Vault folder or URL (else LIFERAFT_VAULT, liferaft.toml, the default).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output where the output is data.")
@click.pass_context
def main(ctx: click.Context, vault_url: str | None, quiet: bool, as_json: bool) -> None:
    """Keep machine-learning work alive on machines that can vanish.

    Snapshots of what matters go to a vault (a folder, a Drive mount, a bucket);
    a fresh machine restores them with one command.
    """
    obj = ctx.ensure_object(Ctx)
    obj.vault_url = vault_url
    obj.quiet = quiet
    obj.json = as_json
    sub = ctx.invoked_subcommand
    data = sorted(n for n, c in main.commands.items() if any(p.name == "as_json" for p in c.params)) if as_json else []
    if as_json and sub is not None and sub not in data:
        # Ignored, a script would parse a log line as JSON and fail far from the cause.
        raise LiferaftError(f"liferaft {sub} has no --json output (it prints a log)", f"drop --json; it works with {', '.join(data)}")


def _shown(value: object) -> str:
    """Text from a vault, safe for a terminal: control characters escaped, never interpreted."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(value))


def _size(n: float) -> str:
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _parse_pairs(values: tuple[str, ...], option: str, example: str) -> dict[str, str]:
    """``--tag K=V`` / ``--metric K=V`` values; a malformed one names its option and an example."""
    out = {}
    for t in values:
        key, sep, value = t.partition("=")
        if not sep or not key:
            raise LiferaftError(f"{option} {t!r} is not KEY=VALUE", f"write {option} {example}")
        out[key] = value
    return out


def _parse_metrics(values: tuple[str, ...]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for k, v in _parse_pairs(values, "--metric", "val_loss=0.31").items():
        try:
            number = float(v)
        except ValueError:
            raise LiferaftError(f"--metric {k}={v!r} is not a number", "write --metric val_loss=0.31") from None
        if not math.isfinite(number):
            raise LiferaftError(f"--metric {k}={v!r} is not a finite number", "write --metric val_loss=0.31")
        metrics[k] = number
    return metrics


def _unknown_run(run: str, runs: list[str], url: str, *, typo_only: bool = False) -> tuple[str, str] | None:
    """What is wrong and what to do when ``run`` is not among the vault's ``runs``: a name
    typed on the command line that matches nothing is far more often a typo than a run
    yet to start. None when the run is known or the vault holds no run at all (a first run),
    and with ``typo_only`` when no run's name is close to it (a new run's first restore)."""
    if not runs or run in runs:
        return None
    import difflib

    close = difflib.get_close_matches(run, runs, n=1, cutoff=0.6)
    if typo_only and not close:
        return None
    listed = ", ".join(_shown(r) for r in runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
    fix = f"did you mean {_shown(close[0])!r}? (runs there: {listed})" if close else f"pick one with --run; runs there: {listed}"
    return f"no run {_shown(run)!r} in the vault at {url}", fix


def _run_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--run``: refused before any work when the vault would refuse it or it would garble a listing."""
    if value is None:
        return None
    from .api import check_run_name

    return check_run_name(value)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--run", callback=_run_option, help="Run name (default: LIFERAFT_RUN, liferaft.toml, the working folder's name).")
@click.option("--step", type=int, help="Training step this snapshot holds.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Tag (repeatable).")
@click.option("--metric", "metric_args", multiple=True, metavar="K=V", help="Numeric metric (repeatable).")
@click.option("--include-secrets", is_flag=True, help="Also take credential files (.netrc, *.pem, kaggle.json, ...).")
@common(data=True)
def snapshot(
    ctx: Ctx,
    paths: tuple[str, ...],
    run: str | None,
    step: int | None,
    tags: tuple[str, ...],
    metric_args: tuple[str, ...],
    include_secrets: bool,
) -> None:
    """Snapshot PATHS into the vault, atomically."""
    metrics = _parse_metrics(metric_args)
    tag_values = _parse_pairs(tags, "--tag", "lr=3e-4")
    vault = ctx.vault()
    t0 = time.monotonic()
    with ctx.progress() as progress:  # stopped on any exit, Ctrl-C included: cursor shown, own line
        snap = vault.snapshot(
            list(paths), run=run, step=step, tags=tag_values, metrics=metrics, progress=progress, include_secrets=include_secrets
        )
    if ctx.json:
        ctx.data(snap.to_json())
        return
    s = snap.stats
    ctx.say(
        f"snapshot {snap.short_id} of run {snap.run!r}"
        + (f" step {snap.step}" if snap.step is not None else "")
        + f": {plural(s.get('files', 0), 'file')}, {_size(s.get('bytes', 0))}; added {_size(s.get('stored_bytes', 0))}"
        + f" in {time.monotonic() - t0:.1f}s → {vault.url}"
    )
    if s.get("changed_during_read"):
        ctx.say(
            f"note: {plural(len(s['changed_during_read']), 'file')} changed while read; their previous version is kept, the next snapshot takes them"
        )
    if s.get("secrets_excluded"):
        ctx.say(f"note: {plural(s['secrets_excluded'], 'credential file')} left out (use --include-secrets to take them)")
    if s.get("skipped"):
        ctx.say(f"note: {plural(len(s['skipped']), 'path')} skipped, e.g. {s['skipped'][0]}")


def _warn_damaged(damaged: list[str]) -> None:
    """One line on stderr for the manifests a listing had to leave out."""
    if not damaged:
        return
    ids = [m.group(1) if (m := re.match(r"snapshot ([0-9a-f]+)", d)) else "?" for d in damaged]
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    click.echo(
        f"warning: {plural(len(ids), 'snapshot manifest')} could not be read ({shown}) and {'is' if len(ids) == 1 else 'are'} not listed;"
        " run `liferaft verify` to see the damage",
        err=True,
    )


@main.command()
@click.option("--run", callback=_run_option, help="Only this run.")
@common(data=True)
def snapshots(ctx: Ctx, run: str | None) -> None:
    """List snapshots, newest last."""
    damaged: list[str] = []
    vault = ctx.vault()
    every = vault.snapshots(damaged=damaged)
    snaps = [s for s in every if run is None or s.run == run]
    _warn_damaged(damaged)
    unknown = _unknown_run(run, sorted({s.run for s in every}), vault.url) if run is not None else None
    if ctx.json:
        # An empty list is the true answer to "which snapshots has run X?" (a script may
        # ask before a new run's first one); a human reading stderr still sees the hint.
        if unknown:
            click.echo(f"warning: {unknown[0]}; {unknown[1]}", err=True)
        ctx.data([s.to_json() for s in snaps])
        return
    if unknown:
        raise SnapshotNotFound(*unknown)
    if not snaps:
        ctx.say("no snapshots yet" + (f" of run {run!r}" if run else ""))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .checkpoint.core import MANIFEST_TAG

    # Not a terminal (a pipe, a file): rows are never cut or wrapped, so that grep finds them.
    wide = not sys.stdout.isatty()
    table = Table(box=None, pad_edge=False)
    for col in ("id", "run", "step", "time", "host", "files", "size", "metrics / tags"):
        table.add_column(col, justify="right" if col in ("step", "files", "size") else "left", no_wrap=wide)
    for s in snaps:
        # the manifest checksum of a checkpoint (64 hex digits) is for liferaft; --json has it
        tags = [f"{k}={v}" for k, v in s.tags.items() if k != MANIFEST_TAG]
        extra = " ".join([f"{k}={v:g}" for k, v in s.metrics.items()] + tags)
        cells = [
            s.short_id,
            s.run,
            "" if s.step is None else str(s.step),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.time)),
            s.host,
            str(s.stats.get("files", "")),
            _size(s.stats.get("bytes", 0)),
            extra,
        ]
        table.add_row(*(Text(_shown(c)) for c in cells))  # Text: no rich markup from the vault
    if not ctx.quiet:
        Console(width=1 << 20 if wide else None).print(table)


def _check_restore_target(to: str) -> None:
    """``--to`` names a folder (made if missing): a file there, or on the way, is one line."""
    path = os.path.abspath(to)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if os.path.isdir(path):
        return
    fix = "give a folder to restore into (a missing one is made)"
    if os.path.islink(path):
        raise LiferaftError(f"--to {to}: {path} is a link to {os.readlink(path)}, which does not exist", f"mount or create it, or {fix}")
    if path == os.path.abspath(to):
        raise LiferaftError(f"--to {to} is a file, not a folder", fix)
    raise LiferaftError(f"--to {to} is inside {path}, which is a file, not a folder", fix)


@main.command()
@click.argument("snapshot_id", required=False, metavar="[ID]")
@click.option(
    "--run",
    callback=_run_option,
    help="Newest valid snapshot of this run (default: LIFERAFT_RUN, liferaft.toml, the working folder's name).",
)
@click.option("--to", "to", type=click.Path(), help="Restore into this folder (each saved path as DIR/NAME) instead of in place.")
@click.option("--force", is_flag=True, help="Replace files newer than the snapshot's version of them (refused without it).")
@common(data=True)
def restore(ctx: Ctx, snapshot_id: str | None, run: str | None, to: str | None, force: bool) -> None:
    """Restore a snapshot (newest valid one of the run by default)."""
    import warnings

    if to is not None:
        _check_restore_target(to)
    vault = ctx.vault()
    with warnings.catch_warnings(), ctx.progress() as progress:
        warnings.simplefilter("ignore")
        # missing_ok=False: a vault that is not there is a mistyped --vault, not a first run
        # (`restore && python train.py` must not train from scratch); the default vault,
        # not written yet, is an empty vault.
        result = vault.restore(snapshot_id, run=run, to=to, progress=progress, replace_newer=force, missing_ok=False)
    if result is None:
        from .config import default_run_name

        name = run or default_run_name()
        from .api import is_checkpoint
        from .errors import VaultNotFound

        try:
            snaps = vault.snapshots()
        except VaultNotFound:
            snaps = []
        runs = sorted({s.run for s in snaps})
        # --run given: a typo must not pass for a first run; a name close to none of the
        # runs is a new run (`liferaft restore --run exp2 && python train.py` on a shared vault)
        unknown = _unknown_run(name, runs, vault.url, typo_only=True)
        if run is not None and unknown:
            raise SnapshotNotFound(*unknown)
        checkpoints = [s for s in snaps if s.run == name and is_checkpoint(s)]
        if ctx.json:
            ctx.data({"restored": None, "run": name, "runs": runs, "checkpoints": len(checkpoints)})
            return
        if checkpoints:
            newest = checkpoints[-1]
            ctx.say(
                f"nothing to restore: run {name!r} has only checkpoints ({plural(len(checkpoints), 'snapshot')} of a "
                f"Checkpointer), which restore by run leaves to it; restore one by id, e.g. "
                f"`liferaft restore {newest.short_id} --to DIR` (step {newest.step}), or call Checkpointer.restore()"
            )
            return
        hint = f" (runs in this vault: {', '.join(_shown(r) for r in runs)}; pick one with --run)" if runs else ""
        ctx.say(f"nothing to restore: no snapshot of run {name!r}{hint}")
        return
    for msg in result.fallbacks:
        click.echo(f"warning: {msg}; used the one before", err=True)
    if result.skipped_links:
        click.echo(
            f"warning: {plural(len(result.skipped_links), 'link')} pointing outside the snapshot {'was' if len(result.skipped_links) == 1 else 'were'} not created, e.g. {_shown(result.skipped_links[0])}",
            err=True,
        )
    if ctx.json:
        ctx.data(
            {
                "restored": result.snapshot.to_json(),
                "files": result.files,
                "bytes": result.nbytes,
                "to": {k: str(v) for k, v in result.destinations.items()},
                "fallbacks": result.fallbacks,
                "skipped_links": result.skipped_links,
                "stale_temps_removed": result.stale_temps_removed,
            }
        )
        return
    where = ", ".join(str(p) for p in result.destinations.values())
    ctx.say(
        f"restored snapshot {result.snapshot.short_id} ({result.snapshot.label}): {plural(result.files, 'file')}, {_size(result.nbytes)} → {where}"
    )
    if result.stale_temps_removed:
        ctx.say(f"removed {plural(result.stale_temps_removed, 'temp file')} an interrupted restore had left there")


@main.command()
@click.option("--read-data", is_flag=True, help="Also read and hash every stored byte.")
@common(data=True)
def verify(ctx: Ctx, read_data: bool) -> None:
    """Check the vault; exit 1 naming any damage."""
    report = ctx.vault().verify(read_data=read_data)
    if ctx.json:
        ctx.data(report.to_json())
    else:
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
        for d in report.damage:
            click.echo(f"damaged: {d}", err=True)
        what = "all data read and hashed" if read_data else "structure checked (add --read-data to hash every byte)"
        status = "ok" if report.ok else plural(len(report.damage), "problem")
        ctx.say(f"{status}: {plural(report.snapshots, 'snapshot')}, {plural(report.packs, 'pack')}, {plural(report.blobs, 'blob')}; {what}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--run", callback=_run_option, help="Run whose old snapshots to forget.")
@click.option("--keep-last", type=int, help="Keep this many newest snapshots of the run.")
@click.option("--prune", "do_prune", is_flag=True, help="Then delete data no snapshot needs.")
@common(data=True)
def forget(ctx: Ctx, ids: tuple[str, ...], run: str | None, keep_last: int | None, do_prune: bool) -> None:
    """Forget snapshots: by ID, or all but the newest --keep-last N of --run."""
    vault = ctx.vault()
    damaged: list[str] = []
    if ids:
        if run or keep_last is not None:
            raise LiferaftError("give snapshot ids or --run/--keep-last, not both", "run two commands")
        gone = vault.forget_ids(list(ids), damaged=damaged)
        report = vault.prune() if do_prune else None
    else:
        if not run or keep_last is None:
            raise LiferaftError("forget needs --run NAME --keep-last N (or snapshot ids)", "e.g. liferaft forget --run mnist --keep-last 3")
        unknown = _unknown_run(run, sorted({s.run for s in vault.snapshots(damaged=[])}), vault.url)
        if unknown:
            raise SnapshotNotFound(f"{unknown[0]} (nothing was forgotten)", unknown[1])
        gone, report = vault.forget(run=run, keep_last=keep_last, prune=do_prune)
    if ctx.json:
        ctx.data({"forgotten": [s.to_json() for s in gone], "forgotten_damaged": damaged, "prune": report.to_json() if report else None})
        return
    names = [s.short_id for s in gone] + [f"{d[:12]} (damaged)" for d in damaged]
    ctx.say(f"forgot {plural(len(names), 'snapshot')}" + (": " + ", ".join(names) if names else ""))
    if report:
        _say_prune(ctx, report)


def _say_prune(ctx: Ctx, report: Any) -> None:
    ctx.say(f"pruned {plural(report.packs_deleted, 'pack')}, {_size(report.bytes_deleted)} freed; {report.packs_repacked} repacked")
    if report.waiting_on:
        ctx.say(
            f"note: {plural(report.kept_for_writers, 'pack')} kept while writers run ({', '.join(report.waiting_on)}); prune again later"
        )


@main.command()
@click.option("--wait", type=float, default=30.0, show_default=True, help="Seconds to wait for running writers.")
@common(data=True)
def prune(ctx: Ctx, wait: float) -> None:
    """Delete stored data that no snapshot needs."""
    report = ctx.vault().prune(wait=wait)
    if ctx.json:
        ctx.data(report.to_json())
    else:
        _say_prune(ctx, report)


@main.command()
@common(data=True)
def info(ctx: Ctx) -> None:
    """Where the vault is and what it holds."""
    vault = ctx.vault()
    stats = vault.stats()
    stats["source"] = vault.choice.source
    if ctx.json:
        ctx.data(stats)
    else:
        ctx.say(
            f"vault {stats['url']} (from {stats['source']}): {plural(stats['snapshots'], 'snapshot')}, {plural(stats['packs'], 'pack')}, {_size(stats['bytes'])}"
        )


@main.command()
@common()
def demo(ctx: Ctx) -> None:
    """Watch a training run survive a machine reset (about 15 s), on the default vault."""
    from .demo import run_demo

    run_demo(ctx.vault_url, say=ctx.say)


from .keep.cli_run import run_command  # noqa: E402 - registered last, defined in its own module

main.add_command(run_command)


def run() -> None:
    """Entry point: user mistakes get one line and a non-zero exit, never a traceback."""
    for stream in (sys.stdout, sys.stderr):
        # A file name that is not UTF-8 (kept byte for byte) must not crash a message or
        # --json output: it is shown as \udcXX, which JSON reads back as the same name.
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        rv = main(standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except LiferaftError as err:
        cli_fix = err.cli_fix  # the same advice with this command's flags (--vault)
        click.echo(f"liferaft: error: {_shown(f'{err.what}; {cli_fix}' if cli_fix else err)}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    run()
