"""The ``liferaft`` command: parse, call the API, render. No work of its own."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from ._version import __version__
from .errors import LiferaftError


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


def _parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for t in tags:
        key, sep, value = t.partition("=")
        if not sep or not key:
            raise LiferaftError(f"tag {t!r} is not KEY=VALUE", "write --tag lr=3e-4")
        out[key] = value
    return out


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--run", help="Run name (default: the working folder's name).")
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
    metrics: dict[str, float] = {}
    for k, v in _parse_tags(metric_args).items():
        try:
            metrics[k] = float(v)
        except ValueError:
            raise LiferaftError(f"metric {k}={v!r} is not a number", "write --metric val_loss=0.31") from None
    vault = ctx.vault()
    t0 = time.monotonic()
    snap = vault.snapshot(
        list(paths), run=run, step=step, tags=_parse_tags(tags), metrics=metrics, progress=ctx.progress(), include_secrets=include_secrets
    )
    if ctx.json:
        ctx.data(snap.to_json())
        return
    s = snap.stats
    ctx.say(
        f"snapshot {snap.short_id} of run {snap.run!r}"
        + (f" step {snap.step}" if snap.step is not None else "")
        + f": {s.get('files', 0)} files, {_size(s.get('bytes', 0))}; added {_size(s.get('stored_bytes', 0))}"
        + f" in {time.monotonic() - t0:.1f}s → {vault.url}"
    )
    if s.get("changed_during_read"):
        ctx.say(
            f"note: {len(s['changed_during_read'])} file(s) changed while read; their previous version is kept, the next snapshot takes them"
        )
    if s.get("secrets_excluded"):
        ctx.say(f"note: {s['secrets_excluded']} credential file(s) left out (use --include-secrets to take them)")
    if s.get("skipped"):
        ctx.say(f"note: {len(s['skipped'])} path(s) skipped, e.g. {s['skipped'][0]}")


@main.command()
@click.option("--run", help="Only this run.")
@common(data=True)
def snapshots(ctx: Ctx, run: str | None) -> None:
    """List snapshots, newest last."""
    snaps = ctx.vault().snapshots(run=run)
    if ctx.json:
        ctx.data([s.to_json() for s in snaps])
        return
    if not snaps:
        ctx.say("no snapshots yet" + (f" of run {run!r}" if run else ""))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for col in ("id", "run", "step", "time", "host", "files", "size", "metrics / tags"):
        table.add_column(col, justify="right" if col in ("step", "files", "size") else "left")
    for s in snaps:
        extra = " ".join([f"{k}={v:g}" for k, v in s.metrics.items()] + [f"{k}={v}" for k, v in s.tags.items()])
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
        Console().print(table)


@main.command()
@click.argument("snapshot_id", required=False, metavar="[ID]")
@click.option("--run", help="Newest valid snapshot of this run (default: the working folder's name).")
@click.option("--to", "to", type=click.Path(), help="Restore into this folder (each saved path as DIR/NAME) instead of in place.")
@click.option("--force", is_flag=True, help="Replace files newer than the snapshot's version of them (refused without it).")
@common(data=True)
def restore(ctx: Ctx, snapshot_id: str | None, run: str | None, to: str | None, force: bool) -> None:
    """Restore a snapshot (newest valid one of the run by default)."""
    import warnings

    vault = ctx.vault()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = vault.restore(snapshot_id, run=run, to=to, progress=ctx.progress(), replace_newer=force)
    if result is None:
        from .config import default_run_name

        name = run or default_run_name()
        from .errors import VaultNotFound

        try:
            runs = sorted({s.run for s in vault.snapshots()})
        except VaultNotFound:
            runs = []
        if ctx.json:
            ctx.data({"restored": None, "run": name, "runs": runs})
            return
        hint = f" (runs in this vault: {', '.join(runs)}; pick one with --run)" if runs else ""
        ctx.say(f"nothing to restore: no snapshot of run {name!r}{hint}")
        return
    for msg in result.fallbacks:
        click.echo(f"warning: {msg}; used the one before", err=True)
    if result.skipped_links:
        click.echo(
            f"warning: {len(result.skipped_links)} link(s) pointing outside the snapshot were not created, e.g. {_shown(result.skipped_links[0])}",
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
        f"restored snapshot {result.snapshot.short_id} (run {result.snapshot.run!r}, step {result.snapshot.step}): {result.files} files, {_size(result.nbytes)} → {where}"
    )
    if result.stale_temps_removed:
        ctx.say(f"removed {result.stale_temps_removed} temp file(s) an interrupted restore had left there")


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
        status = "ok" if report.ok else f"{len(report.damage)} problem(s)"
        ctx.say(f"{status}: {report.snapshots} snapshots, {report.packs} packs, {report.blobs} blobs; {what}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--run", help="Run whose old snapshots to forget.")
@click.option("--keep-last", type=int, help="Keep this many newest snapshots of the run.")
@click.option("--prune", "do_prune", is_flag=True, help="Then delete data no snapshot needs.")
@common(data=True)
def forget(ctx: Ctx, ids: tuple[str, ...], run: str | None, keep_last: int | None, do_prune: bool) -> None:
    """Forget snapshots: by ID, or all but the newest --keep-last N of --run."""
    vault = ctx.vault()
    if ids:
        if run or keep_last is not None:
            raise LiferaftError("give snapshot ids or --run/--keep-last, not both", "run two commands")
        gone = vault.forget_ids(list(ids))
        report = vault.prune() if do_prune else None
    else:
        if not run or keep_last is None:
            raise LiferaftError("forget needs --run NAME --keep-last N (or snapshot ids)", "e.g. liferaft forget --run mnist --keep-last 3")
        gone, report = vault.forget(run=run, keep_last=keep_last, prune=do_prune)
    if ctx.json:
        ctx.data({"forgotten": [s.to_json() for s in gone], "prune": report.to_json() if report else None})
        return
    ctx.say(f"forgot {len(gone)} snapshot(s)" + (": " + ", ".join(s.short_id for s in gone) if gone else ""))
    if report:
        _say_prune(ctx, report)


def _say_prune(ctx: Ctx, report: Any) -> None:
    ctx.say(f"pruned {report.packs_deleted} pack(s), {_size(report.bytes_deleted)} freed; {report.packs_repacked} repacked")
    if report.waiting_on:
        ctx.say(f"note: {report.kept_for_writers} pack(s) kept while writers run ({', '.join(report.waiting_on)}); prune again later")


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
            f"vault {stats['url']} (from {stats['source']}): {stats['snapshots']} snapshots, {stats['packs']} packs, {_size(stats['bytes'])}"
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
        click.echo(f"liferaft: error: {_shown(err)}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    run()
