"""``liferaft run``: keep a command's state alive across preemption, time caps and crashes.

The supervisor checks that the vault can be reached and written (else the command is
not started, unless ``offline_ok``), restores the kept paths, starts the command in its
own process group (its output passes straight through), snapshots the kept paths in
the background, and on SIGTERM / SIGINT / SIGHUP / SIGUSR1 passes the signal on, waits
up to the grace, takes the final snapshot and exits with the command's status.

On Linux the command is started through a two-line launcher that asks the kernel to
send it SIGTERM if the supervisor dies, so a killed supervisor never leaves a training
run writing on unsupervised.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..errors import LiferaftError, VaultUnreachable
from .keeper import RestoreOutcome, check_run_name, check_vault_outside, resolve_keeps, restore_kept
from .signals import STOP_SIGNALS, SignalHandlers, exit_status, signal_group, signal_name
from .syncer import PassResult, Syncer, VaultNotWritable, check_writable, ensure_vault
from .units import format_duration, format_size, plural

if TYPE_CHECKING:
    from ..platform import Platform

#: Default grace: with a final snapshot of a few seconds this fits GCP's 30 s spot notice.
DEFAULT_GRACE = 20.0
DEFAULT_EVERY = 60.0
MAX_BACKOFF = 60.0
#: How long abandoning the final snapshot waits for the vault to delete its session lock.
ABANDON_WAIT = 10.0

# Runs between fork and the command's exec (Linux), in a fresh Python (no thread-safety
# worries of preexec_fn): die with the supervisor, lead a process group of its own in the
# supervisor's session, take the terminal's foreground when asked, and exec the command
# with the signal dispositions Python changed put back.
_LAUNCH = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the supervisor is already gone
try:
    os.setpgid(0, 0)
except OSError:
    pass
if sys.argv[2] == "1":
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(0, os.getpgrp())
    except OSError:
        pass
for name in ("SIGTTOU", "SIGPIPE", "SIGXFSZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
try:
    os.execvp(sys.argv[3], sys.argv[3:])
except OSError as e:
    p = sys.argv[3]
    if os.path.isdir(p):
        why = "it is a folder, not a program"
    elif e.errno == 13:
        why = "permission denied; make it executable (chmod +x %s) or run it with its interpreter (e.g. bash %s)" % (p, p)
    elif e.errno == 8:
        why = "it is not a program and has no #! line; run it with its interpreter (e.g. bash %s)" % p
    elif e.errno == 2 and os.path.exists(p):
        why = "the interpreter on its #! line is not found"
    else:
        why = e.strerror
    sys.stderr.write("liferaft: cannot run %s: %s\\n" % (p, why))
    sys.exit(127 if e.errno == 2 else 126)
"""

#: A command that died of one of these was stopped on purpose (Ctrl-C in its terminal,
#: a kill): it is not restarted.
_STOPPED_BY = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}


class CommandNotFound(LiferaftError):
    """The command to run does not exist (a shell's 127)."""

    exit_code = 127


class CommandNotRunnable(CommandNotFound):
    """The command exists but cannot be run: not executable, a folder (a shell's 126)."""

    exit_code = 126


class RunInterrupted(LiferaftError):
    """Ctrl-C before the command started."""

    exit_code = 130


def _interpreter(path: str) -> str:
    """What runs a script: its ``#!`` line's program, else a guess from its suffix."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256).decode("utf-8", "replace")
    except OSError:
        first = ""
    if first.startswith("#!"):
        words = first[2:].split()
        if words and os.path.basename(words[0]) == "env":
            words = [w for w in words[1:] if not w.startswith("-")]
        if words:
            return os.path.basename(words[0])
    return "python" if path.endswith(".py") else "bash" if path.endswith((".sh", ".bash")) else "sh"


def _not_runnable(prog: str, err: OSError | None = None) -> CommandNotFound:
    """The one line for a command that cannot be run, classified as a shell would (126
    for a file or folder that cannot be run, 127 for nothing there)."""
    import errno
    import shlex

    q = shlex.quote(prog)
    a_path = os.sep in prog or bool(os.altsep and os.altsep in prog)
    if a_path or (err is not None and err.errno != errno.ENOENT):
        if os.path.isdir(prog):
            return CommandNotRunnable(
                f"cannot run {prog}: it is a folder, not a program", f"name the script in it, e.g. python {q}/train.py"
            )
        if os.path.isfile(prog) and (err is None or err.errno in (errno.EACCES, errno.EPERM)):
            return CommandNotRunnable(
                f"cannot run {prog}: permission denied",
                f"make it executable (chmod +x {q}) or run it with its interpreter ({_interpreter(prog)} {q})",
            )
        if err is not None and err.errno == errno.ENOEXEC:
            return CommandNotRunnable(
                f"cannot run {prog}: it is not a program and has no #! line", f"run it with its interpreter ({_interpreter(prog)} {q})"
            )
        if err is not None and err.errno != errno.ENOENT:
            return CommandNotRunnable(f"cannot run {prog}: {err.strerror or err}", "check that it is a program you may run")
    if not a_path and os.path.isfile(prog):
        hint = f"there is a file {prog} here, but commands are looked up on PATH: write ./{prog}, or {_interpreter(prog)} {q}"
    elif not a_path and os.path.isdir(prog):
        hint = f"{prog} here is a folder, not a command: name the script in it, e.g. python {q}/train.py"
    elif prog.endswith(".py"):
        hint = f"to run a Python script, write: liferaft run ... -- python {q}"
    elif a_path:
        hint = "there is no such file: check the path"
    else:
        hint = "check the spelling and that it is installed (and on PATH)"
    return CommandNotFound(f"command not found: {prog}", hint)


def check_command(command: Sequence[str]) -> list[str]:
    """The command as a list, refusing an empty one or a program that is not there or
    cannot be run (exit status 127 or 126, as a shell gives).

    >>> check_command(["python", "train.py"])[0]
    'python'
    """
    cmd = [os.fspath(c) for c in command]
    if not cmd or not cmd[0]:
        raise LiferaftError("no command to run", "put it after --, e.g. liferaft run --keep checkpoints -- python train.py")
    prog = cmd[0]
    if os.sep in prog or (os.altsep and os.altsep in prog):
        ok = os.path.isfile(prog) and os.access(prog, os.X_OK)
    else:
        ok = shutil.which(prog) is not None
    if not ok:
        raise _not_runnable(prog)
    return cmd


@dataclass
class RunOptions:
    """What ``liferaft run`` was asked to do (see ``liferaft run --help``)."""

    command: list[str]
    keep: list[str]
    keep_given: str = "--keep"  # or "liferaft.toml": for the wording of a refusal
    run: str | None = None
    vault: str | None = None
    every: float = DEFAULT_EVERY
    restarts: int = 0
    time_limit: float | str | None = "auto"  # seconds, None for no limit, "auto" for the platform's cap
    grace: float = DEFAULT_GRACE
    force: bool = False
    offline_ok: bool = False
    include_secrets: bool = False  # also keep credential files (left out with a note otherwise)
    quiet: bool = False
    verbose: bool = False
    env: dict[str, str] = field(default_factory=dict)  # extra variables for the command


def _time_limit(opts: RunOptions, platform: Platform) -> tuple[float | None, str]:
    if opts.time_limit == "auto":
        left = platform.time_left()
        if left is None:
            return None, f"no time cap ({platform.label})"
        started = platform.session_started
        age = f", session started {format_duration(time.time() - started)} ago" if started else ""
        return left, f"{platform.label} cap {platform.note}{age}: stopping within {format_duration(left)}"
    if opts.time_limit is None:
        return None, "no time cap (--time-limit off)"
    assert isinstance(opts.time_limit, (int, float))
    return float(opts.time_limit), f"time limit {format_duration(float(opts.time_limit))}"


class Supervisor:
    """Runs one command under liferaft; ``run()`` returns the exit status.

    >>> Supervisor(RunOptions(["python", "train.py"], keep=["checkpoints"])).run()  # doctest: +SKIP
    """

    def __init__(self, opts: RunOptions, *, out: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self._out = out or (lambda line: print(line, file=sys.stderr, flush=True))
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.proc: subprocess.Popen[bytes] | None = None
        self.status = 0
        self.restarts = 0
        self.outcome = RestoreOutcome()
        self.syncer: Syncer | None = None
        self._committed_first = False
        self._finishing = False
        self._terminal = False
        self.keeps: list[Any] = []
        #: The final snapshot was abandoned (a second Ctrl-C during it): its uploads still
        #: run in this process's threads, so the CLI ends the process at once.
        self.abandoned = False

    # ------------------------------------------------------------ output

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            self._out(f"liferaft: {text}")

    def warn(self, text: str) -> None:
        self._out(f"liferaft: warning: {text}")

    # ------------------------------------------------------------ main

    def run(self) -> int:
        from ..api import Vault
        from ..config import default_run_name
        from ..platform import detect

        opts = self.opts
        command = check_command(opts.command)
        keeps = resolve_keeps(opts.keep, given=opts.keep_given)
        run = opts.run or default_run_name()
        if opts.every <= 0:
            raise LiferaftError(f"--every {opts.every:g} must be more than 0 seconds", "e.g. --every 60")
        if opts.grace < 0:
            raise LiferaftError(f"--grace {opts.grace:g} must not be negative", "e.g. --grace 20")
        if opts.restarts < 0:
            raise LiferaftError(f"--restarts {opts.restarts} must not be negative", "e.g. --restarts 3")
        platform = detect()
        limit, limit_text = _time_limit(opts, platform)
        if limit is not None and limit <= opts.grace + 1.0:
            raise LiferaftError(
                f"{limit_text}: that leaves no time to run after the {format_duration(opts.grace)} grace",
                "give a longer --time-limit, a shorter --grace, or --time-limit off",
            )
        check_run_name(run)
        self.keeps = keeps
        phase = f"while opening the vault at {opts.vault}" if opts.vault else "while opening the vault"
        try:  # Ctrl-C until the command starts: say what was done, not "aborted"
            vault = Vault(opts.vault)
            check_vault_outside(keeps, vault)
            lost = vault.lost_with_the_machine()
            if lost:
                self.warn(lost)
            phase = f"while reaching the vault at {vault.url}"
            snaps = self._check_vault(vault, run)
            self.say(
                f"run {run!r} → {vault.url}; keeping {', '.join(k.arg for k in keeps)}; "
                f"snapshot every {format_duration(opts.every)} when something changed; {limit_text}"
            )
            if snaps is not None:
                phase = f"while restoring {', '.join(k.arg for k in keeps)} from the vault"
                self.outcome = restore_kept(vault, run, keeps, force=opts.force, say=self.warn, snapshots=snaps)
                self._report_restore(run, snaps)
            phase = "before the command started"
            self.syncer = Syncer(
                vault,
                run,
                keeps,
                opts.every,
                on_error=self.warn,
                on_notice=self.say,
                on_commit=self._on_commit,
                include_secrets=opts.include_secrets,
            )
        except KeyboardInterrupt:
            raise self._interrupted(phase) from None
        handlers = SignalHandlers(STOP_SIGNALS, self._on_signal)
        self._terminal = _foreground_terminal()
        if self._terminal:
            # The command gets the terminal (its Ctrl-C, its input); we keep printing to it.
            ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        t_start = time.monotonic()
        deadline = None if limit is None else t_start + limit
        try:
            self.syncer.start()
            return self._supervise(command, run, vault.url, deadline)
        finally:
            handlers.restore()
            if self._terminal:
                self._take_terminal()
                signal.signal(signal.SIGTTOU, ttou)

    def _interrupted(self, phase: str) -> RunInterrupted:
        restored = self.outcome.restored
        if restored and self.outcome.snapshot is not None:
            done = f"{', '.join(k.arg for k in restored)} restored from snapshot {self.outcome.snapshot.short_id}"
        elif phase.startswith("while restoring"):
            done = "the restore was not finished"
        else:
            done = "nothing restored"
        return RunInterrupted(
            f"interrupted {phase}: the command was not started; {done}; nothing saved",
            "run the same command again to start",
        )

    def _check_vault(self, vault: Any, run: str) -> list[Any] | None:
        """Reach (and create) the vault before the command starts, and prove it takes writes:
        the run's snapshots, or None offline."""
        from ..backends.base import StoreError  # a store's own refusal: no credentials, no bucket, a file in the way

        try:
            ensure_vault(vault)
            snaps = vault.snapshots(run=run)
        except (VaultUnreachable, StoreError) as err:
            self._refuse_unless_offline_ok(err)
            self.warn(f"{err.what}; running without it (--offline-ok): nothing restored, snapshots retried every interval")
            return None
        try:
            check_writable(vault)
        except (VaultUnreachable, VaultNotWritable) as err:
            self._refuse_unless_offline_ok(err)
            self.warn(f"{err.what}; running without saving (--offline-ok): snapshots retried every interval")
        return snaps  # restored from even when it cannot be written: it can be read

    def _refuse_unless_offline_ok(self, err: LiferaftError) -> None:
        if not self.opts.offline_ok:
            fix = err.cli_fix or err.fix
            raise LiferaftError(
                f"{err.what} (the command was not started)", f"{fix + '; ' if fix else ''}or pass --offline-ok to run without it"
            ) from None

    def _report_restore(self, run: str, snaps: list[Any]) -> None:
        o = self.outcome
        for msg in o.messages:
            self.warn(msg)
        if o.snapshot is None:
            if snaps:
                held = sorted({r["name"] for s in snaps for r in s.roots})
                self.say(f"nothing to restore: the snapshots of run {run!r} hold none of the kept paths (they hold {', '.join(held)})")
            else:
                self.say(f"nothing to restore: no snapshot of run {run!r} yet (a first run)")
            return
        snap = o.snapshot
        taken = format_duration(max(0.0, time.time() - snap.time))
        if o.restored:
            self.say(
                f"restored {', '.join(k.arg for k in o.restored)} from snapshot {snap.short_id} "
                f"(taken {taken} ago on {snap.host}): {plural(o.files, 'file')}, {format_size(o.nbytes)} in {format_duration(o.seconds)}"
            )
        if o.same:
            verb = "matches" if len(o.same) == 1 else "match"
            self.say(f"{', '.join(k.arg for k in o.same)} already {verb} snapshot {snap.short_id}")

    def _on_commit(self, result: PassResult) -> None:
        if self._finishing:
            return  # the final pass has its own line
        snap = result.snapshot
        assert snap is not None
        if not self.opts.verbose and not snap.stats.get("files"):
            return  # the command has written nothing yet: the first snapshot worth a line holds files
        if self.opts.verbose or not self._committed_first:
            tail = "" if self.opts.verbose else " (later ones are quiet: liferaft snapshots lists them)"
            self.say(
                f"snapshot {snap.short_id} committed: {plural(snap.stats.get('files', 0), 'file')}, "
                f"added {format_size(result.stored_bytes)} in {format_duration(result.seconds)}{tail}"
            )
        self._committed_first = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.events.put(("signal", signum))  # SimpleQueue.put is safe in a handler

    # ------------------------------------------------------------ the child

    def _start(self, command: list[str], run: str, vault_url: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update(self.opts.env)
        env.update(
            LIFERAFT_RUN=run,
            LIFERAFT_RESUMED="1" if self.outcome.resumed else "0",
            LIFERAFT_SNAPSHOT=self.outcome.snapshot.id if self.outcome.resumed and self.outcome.snapshot else "",
            LIFERAFT_VAULT=vault_url,
            LIFERAFT_RESTARTS=str(self.restarts),
        )
        if sys.platform.startswith("linux"):
            # Its own process group, but our session: on kernels with autogroup scheduling
            # a session is one scheduling group, and only inside it does the syncer's low
            # priority count against the training.
            fg = "1" if self._terminal else "0"
            argv = [sys.executable, "-I", "-S", "-c", _LAUNCH, str(os.getpid()), fg, *command]
        else:
            argv = command
        try:
            proc = subprocess.Popen(argv, env=env, start_new_session=not sys.platform.startswith("linux"))
        except OSError as err:  # elsewhere the command itself is exec'd here (on Linux the launcher reports)
            raise _not_runnable(command[0], err) from None
        if sys.platform.startswith("linux"):
            try:
                os.setpgid(proc.pid, proc.pid)  # both sides set it: no window where it is unset
            except OSError:
                pass
        threading.Thread(target=self._wait, args=(proc,), name="liferaft-wait", daemon=True).start()
        return proc

    def _take_terminal(self) -> None:
        """The command ended: its terminal's Ctrl-C comes back to us (for the final snapshot)."""
        if self._terminal:
            try:
                os.tcsetpgrp(0, os.getpgrp())
            except OSError:
                pass

    def _wait(self, proc: subprocess.Popen[bytes]) -> None:
        rc = proc.wait()
        self.events.put(("exit", proc.pid, rc))

    def _reap_group(self, pgid: int) -> None:
        """Stop whatever the command left running in its group, so the final snapshot sees still files."""
        if not _group_members(pgid):
            return
        signal_group(pgid, signal.SIGTERM)
        end = time.monotonic() + min(5.0, max(1.0, self.opts.grace))
        while time.monotonic() < end and _group_members(pgid):
            time.sleep(0.05)
        if _group_members(pgid):
            signal_group(pgid, signal.SIGKILL)

    # ------------------------------------------------------------ the loop

    def _supervise(self, command: list[str], run: str, vault_url: str, deadline: float | None) -> int:
        opts = self.opts
        assert self.syncer is not None
        self.proc = self._start(command, run, vault_url)
        running = True
        stopping: str | None = None
        kill_at: float | None = None
        restart_at: float | None = None
        while True:
            now = time.monotonic()
            stop_at = None if deadline is None else deadline - opts.grace - self._reserve()
            waits = [0.5]
            if running and stopping is None and stop_at is not None:
                waits.append(stop_at - now)
            if running and kill_at is not None:
                waits.append(kill_at - now)
            if restart_at is not None:
                waits.append(restart_at - now)
            try:
                ev = self.events.get(timeout=max(0.0, min(waits)))
            except queue.Empty:
                ev = None
            now = time.monotonic()
            if ev is not None and ev[0] == "signal":
                signum = ev[1]
                name = signal_name(signum)
                if stopping is None:
                    stopping = name
                    if running:
                        assert self.proc is not None
                        signal_group(self.proc.pid, signum)
                        kill_at = now + opts.grace
                        self.say(f"{name}: passed on to the command; waiting up to {format_duration(opts.grace)} for it to exit")
                    else:
                        self.say(f"{name}: not restarting the command")
                        break
                elif running:
                    assert self.proc is not None
                    signal_group(self.proc.pid, signum)  # a second Ctrl-C goes through too
            elif ev is not None and ev[0] == "exit":
                assert self.proc is not None
                if ev[1] != self.proc.pid:
                    continue
                running = False
                kill_at = None
                self.status = exit_status(ev[2])
                self._take_terminal()
                self._reap_group(self.proc.pid)
                if stopping is None and ev[2] < 0 and -ev[2] in _STOPPED_BY:
                    stopping = signal_name(-ev[2])  # e.g. Ctrl-C in its terminal: stopped, not crashed
                if stopping is not None or self.status == 0:
                    break
                if self.restarts >= opts.restarts:
                    if opts.restarts:
                        self.warn(f"the command failed with status {self.status} after {self.restarts} restart(s); giving up")
                    stopping = "crash"
                    break
                self.restarts += 1
                delay = min(MAX_BACKOFF, 2.0 ** (self.restarts - 1))
                self.warn(
                    f"the command failed with status {self.status}; restarting in {format_duration(delay)} "
                    f"(restart {self.restarts} of {opts.restarts})"
                )
                restart_at = now + delay
            # timers
            if running and stopping is None and stop_at is not None and deadline is not None and now >= stop_at:
                stopping = "time-limit"
                assert self.proc is not None
                signal_group(self.proc.pid, signal.SIGTERM)
                kill_at = now + opts.grace
                self.say(
                    f"time limit: sent SIGTERM with {format_duration(max(0.0, deadline - now))} left "
                    f"(grace {format_duration(opts.grace)} + final snapshot)"
                )
            if running and kill_at is not None and now >= kill_at:
                assert self.proc is not None
                self.warn(f"the command did not exit within the {format_duration(opts.grace)} grace; killing it")
                signal_group(self.proc.pid, signal.SIGKILL)
                kill_at = None
            if restart_at is not None and stop_at is not None and now >= stop_at:
                self.say("time limit: not restarting the command")
                stopping = "time-limit"
                break
            if restart_at is not None and now >= restart_at:
                restart_at = None
                try:
                    self.proc = self._start(command, run, vault_url)
                except CommandNotFound as err:  # gone or changed since the first start
                    self.warn(f"{err}; not restarting the command")
                    self.status = err.exit_code
                    stopping = "crash"
                    break
                running = True
        return self._finish(stopping or "exit")

    def _reserve(self) -> float:
        """Time to keep for the final snapshot: twice the longest recent pass, at least 1 s."""
        assert self.syncer is not None
        recent = [p.seconds for p in self.syncer.history[-3:]]
        return max(1.0, 2.0 * max(recent, default=0.0) + 0.5)

    def _finish(self, trigger: str) -> int:
        assert self.syncer is not None
        t0 = time.monotonic()
        self._finishing = True
        req = self.syncer.request(trigger, stop=True)
        warned = False
        while not req.done.is_set():
            try:
                ev = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if ev[0] != "signal" or ev[1] != signal.SIGINT:
                continue  # SIGTERM, SIGHUP: the final snapshot is what they ask for
            if req.done.is_set():
                continue  # it finished meanwhile: nothing is at stake, and it is reported below
            if not warned:
                # A second Ctrl-C is often impatience, not a wish to lose the work since
                # the last snapshot: say what is going on, and let a third one decide.
                warned = True
                self._tell(
                    f"taking the final snapshot ({format_duration(time.monotonic() - t0)} so far); Ctrl-C again to abandon it{self._at_stake()}"
                )
                continue
            return self._abandon(t0)
        result = req.result
        n = len(self.syncer.committed)
        if result is None or result.error or result.skipped:
            why = "no result" if result is None else (result.error or result.skipped)
            if result is not None and result.skipped and not result.error:
                self.say(f"no final snapshot: {why}; exit {self.status}")
                return self.status
            self.warn(f"the final snapshot failed: {why}")
            if self.status == 0 and not self.opts.offline_ok:
                return 1  # the work since the last snapshot is not safe: say so in the status
            return self.status
        snap = result.snapshot
        assert snap is not None
        if result.committed:
            self.say(
                f"final snapshot {snap.short_id}: {plural(snap.stats.get('files', 0), 'file')}, "
                f"{format_size(snap.stats.get('bytes', 0))}; added {format_size(result.stored_bytes)} in "
                f"{format_duration(time.monotonic() - t0)}; {plural(n, 'snapshot')} this session; exit {self.status}"
            )
        else:
            self.say(f"nothing changed since snapshot {snap.short_id}; {plural(n, 'snapshot')} this session; exit {self.status}")
        return self.status

    def _tell(self, text: str) -> None:
        """A line even with --quiet: the answer to the user's own Ctrl-C."""
        self._out(f"liferaft: {text}")

    def _last_saved(self) -> Any:
        """The run's newest snapshot known here: committed (or found unchanged) this session, else the one restored."""
        assert self.syncer is not None
        saved = [p.snapshot for p in self.syncer.history if p.snapshot is not None]
        return saved[-1] if saved else self.outcome.snapshot

    def _at_stake(self) -> str:
        paths = ", ".join(k.arg for k in self.keeps)
        last = self._last_saved()
        if last is None:
            return f" (the vault holds no snapshot of {paths} from this run yet)"
        ago = format_duration(max(0.0, time.time() - last.time))
        return f" and lose the changes to {paths} since snapshot {last.short_id}, taken {ago} ago"

    def _abandon(self, t0: float) -> int:
        """Give up the final snapshot: end its writer session (``Syncer.give_up``), so that
        the pass can no longer commit and no lock is left behind, then let the caller end
        the process, which stops the uploads in flight. What they stored is unreferenced:
        prune removes it."""
        done = threading.Event()
        failed: list[str] = []
        assert self.syncer is not None
        syncer = self.syncer

        def release() -> None:
            try:
                syncer.give_up()
            except Exception as err:  # the vault does not answer: the lock goes stale
                failed.append(str(err) or type(err).__name__)
            try:
                # Now, as the process ends without exit hooks: an rclone:// vault's own
                # `rclone serve s3` process stops with its backend.
                syncer.vault.backend.close()
            except Exception:  # ending anyway
                pass
            finally:
                done.set()

        threading.Thread(target=release, name="liferaft-abandon", daemon=True).start()
        end = time.monotonic() + ABANDON_WAIT
        while not done.wait(0.1) and time.monotonic() < end:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                continue
            if ev[0] == "signal" and ev[1] == signal.SIGINT:
                failed.append("interrupted")
                break  # yet another Ctrl-C: leave now
        self.abandoned = True
        status = self.status or 130
        lock = "" if done.is_set() and not failed else syncer.lock_left(failed[0] if failed else "no answer")
        paths = ", ".join(k.arg for k in self.keeps)
        last = self._last_saved()
        kept = (
            f"the vault keeps snapshot {last.short_id} (taken {format_duration(max(0.0, time.time() - last.time))} ago); "
            f"changes to {paths} since then are not saved"
            if last is not None
            else f"the vault holds no snapshot of {paths} from this run"
        )
        self.warn(
            f"abandoned the final snapshot after {format_duration(time.monotonic() - t0)}: {kept}; "
            f"what it had uploaded is removed by liferaft prune{lock}; exit {status}"
        )
        return status


def _foreground_terminal() -> bool:
    """Whether we run in the foreground of a terminal on stdin (so the command should get it)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a group."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def supervise(opts: RunOptions) -> int:
    """Run ``opts.command`` under liferaft and return its exit status.

    >>> import liferaft.keep.supervisor as s
    >>> s.supervise(s.RunOptions(["python", "train.py"], keep=["checkpoints"], every=60))  # doctest: +SKIP
    """
    return Supervisor(opts).run()
