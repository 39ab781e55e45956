"""Progress shows bytes, rate, files and time left on long work, nothing on short work."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

import liferaft
from conftest import make_tree
from liferaft.progress import RichProgress, TextProgress


def _console(buf: io.StringIO) -> Console:
    return Console(file=buf, force_terminal=True, width=120, color_system=None)


def test_snapshot_and_restore_report_progress(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {f"f{i}": os.urandom(1 << 20) for i in range(6)})
    buf = io.StringIO()
    progress = RichProgress(min_bytes=1 << 20, console=_console(buf))
    vault = liferaft.Vault(tmp_path / "vault")
    vault.snapshot([src], run="r", progress=progress)
    out = buf.getvalue()
    assert "snapshot" in out and "6/6 files" in out and "MB" in out
    buf.truncate(0)
    vault.restore(run="r", to=tmp_path / "back", progress=progress)
    assert "restore" in buf.getvalue() and "6/6 files" in buf.getvalue()


def test_small_work_shows_no_bar(tmp_path: Path) -> None:
    buf = io.StringIO()
    liferaft.Vault(tmp_path / "vault").snapshot(
        [make_tree(tmp_path / "d", {"f": "x"})], run="r", progress=RichProgress(console=_console(buf))
    )
    assert buf.getvalue() == ""


def _run_in_kernel(code: str, timeout: float = 90) -> list[tuple[str, str]]:
    """Execute code in a real Jupyter kernel; return (message type, text) of its outputs."""
    jupyter_client = pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    out: list[tuple[str, str]] = []
    try:
        msg_id = kc.execute(code)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind in ("display_data", "update_display_data"):
                out.append((kind, " ".join(content["data"])))
            elif kind == "stream":
                out.append((kind, content["text"]))
            elif kind == "error":
                out.append((kind, f"{content['ename']}: {content['evalue']}"))
            elif kind == "status" and content["execution_state"] == "idle":
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return out


def _notebook_snapshot(tmp_path: Path, hide_widgets: bool) -> str:
    hide = "import sys; sys.modules['ipywidgets'] = None\n" if hide_widgets else ""
    return (
        hide
        + f"import os, liferaft\nos.makedirs({str(tmp_path / 'src')!r}, exist_ok=True)\n"
        + f"for i in range(3): open(os.path.join({str(tmp_path / 'src')!r}, f'f{{i}}'), 'wb').write(os.urandom(12 << 20))\n"
        + f"liferaft.Vault({str(tmp_path / 'vault')!r}).snapshot([{str(tmp_path / 'src')!r}], run='nb')\nprint('done')\n"
    )


def test_progress_in_a_real_jupyter_kernel_with_widgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ipywidgets")
    out = _run_in_kernel(_notebook_snapshot(tmp_path, hide_widgets=False))
    assert ("stream", "done\n") in out, out
    assert not [o for o in out if o[0] == "error" or "UserWarning" in o[1]], out
    assert any("application/vnd.jupyter.widget-view+json" in text for kind, text in out if kind == "display_data"), out


def test_progress_in_a_real_jupyter_kernel_without_widgets(tmp_path: Path) -> None:
    out = _run_in_kernel(_notebook_snapshot(tmp_path, hide_widgets=True))
    text = "".join(t for kind, t in out if kind == "stream")
    assert "snapshot: " in text and "3/3 files" in text and "done in" in text, out
    assert not [o for o in out if o[0] == "error"], out


def test_scripts_stay_silent_by_default(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {f"f{i}": os.urandom(12 << 20) for i in range(3)})
    code = f"import liferaft; liferaft.Vault({str(tmp_path / 'v')!r}).snapshot([{str(src)!r}], run='s')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r


HIDE, SHOW = "\x1b[?25l", "\x1b[?25h"


class _CtrlC(RichProgress):
    """A bar whose work is interrupted, as by Ctrl-C, once it is on screen."""

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        super().advance(files, nbytes)
        if self._bar is not None:
            raise KeyboardInterrupt


def test_an_interrupted_snapshot_stops_its_bar(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "d", {"big": os.urandom(4 << 20)})
    buf = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        liferaft.Vault(tmp_path / "vault").snapshot([src], run="r", progress=_CtrlC(min_bytes=1 << 20, console=_console(buf)))
    out = buf.getvalue()
    assert HIDE in out and out.rindex(SHOW) > out.rindex(HIDE), repr(out[-300:])  # the cursor is back


class _TextCtrlC(TextProgress):
    """Text lines whose work is interrupted, as by Ctrl-C, half way."""

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        super().advance(files, nbytes)
        if self.nbytes >= self.bytes_total // 2:
            raise KeyboardInterrupt


def test_text_progress_says_done_only_when_the_work_is_done(tmp_path: Path) -> None:
    # Jupyter without ipywidgets, and logs: the last line must not say "done" after an
    # interrupted snapshot or restore.
    src = make_tree(tmp_path / "d", {f"f{i}": os.urandom(2 << 20) for i in range(4)})
    vault = liferaft.Vault(tmp_path / "vault")
    buf = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        vault.snapshot([src], run="r", progress=_TextCtrlC(stream=buf, min_bytes=1 << 20))
    last = buf.getvalue().splitlines()[-1]
    assert last.startswith("snapshot: ") and ", stopped after " in last and "done" not in last, buf.getvalue()
    assert vault.snapshots() == []
    buf = io.StringIO()
    vault.snapshot([src], run="r", progress=TextProgress(stream=buf, min_bytes=1 << 20))
    assert "8/8 MiB, 4/4 files" in buf.getvalue() and ", done in " in buf.getvalue().splitlines()[-1], buf.getvalue()
    buf = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        vault.restore(run="r", to=tmp_path / "back", progress=_TextCtrlC(stream=buf, min_bytes=1 << 20))
    last = buf.getvalue().splitlines()[-1]
    assert last.startswith("restore: ") and ", stopped after " in last, buf.getvalue()


def test_progress_as_a_context_manager_is_finished_on_any_exit() -> None:
    buf = io.StringIO()
    with pytest.raises(KeyboardInterrupt), RichProgress(min_bytes=1, console=_console(buf)) as progress:
        progress.start("snapshot", 1, 100)
        raise KeyboardInterrupt
    out = buf.getvalue()
    assert HIDE in out and out.rindex(SHOW) > out.rindex(HIDE), repr(out)
    progress.finish()  # again: nothing happens
    progress.advance(1, 10)  # a reader thread reporting late: ignored


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal's process gets it. A test run started in the
    background of a shell without job control (a CI script's `cmd &`) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler at all."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_snapshot_in_a_terminal_leaves_a_clean_terminal(tmp_path: Path) -> None:
    pty = pytest.importorskip("pty")
    import select
    import signal

    work = tmp_path / "w"
    work.mkdir()
    with open(work / "big.bin", "wb") as f:
        f.truncate(64 << 30)  # sparse: takes minutes to read, no disk space
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "liferaft", "--vault", str(tmp_path / "v"), "snapshot", str(work), "--run", "r"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    os.close(slave)
    out = b""
    interrupted = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: the command is gone
                    break
                if not chunk:
                    break
                out += chunk
            if not interrupted and HIDE.encode() in out and b"snapshot" in out:
                time.sleep(0.3)
                os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
                interrupted = True
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert interrupted, out[-500:]
    text = out.decode(errors="replace").replace("\r", "")
    assert text.rindex(SHOW) > text.rindex(HIDE), repr(text[-300:])  # the cursor is shown again
    assert "\naborted\n" in text, repr(text[-300:])  # on a line of its own, not glued to the bar
    assert "Traceback" not in text
