"""port: the Gradio UI of the official app.py listens on 8418; a busy port is why "the UI does not load".

`itk ui` (our page) listens on 8418 by default too: when it is the holder (known by its command line), the
port is the page's, which is no problem to fix; the page's own Machine view runs this check from inside it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from itk.checks.base import Context, Result, Status

GRADIO_PORT = 8418
ITK_MODULES = ("itk", "itk.cli", "itk.__main__")


@dataclass(frozen=True)
class Holder:
    """The process listening on the port, as psutil sees it."""

    pid: int
    name: str
    cmdline: tuple[str, ...] = ()


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def holder(port: int) -> Holder | None:
    """Who listens on the port; None when psutil cannot tell (another user's process, no permission)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                proc = psutil.Process(conn.pid)
                try:
                    cmdline = tuple(proc.cmdline())
                except psutil.Error:
                    cmdline = ()
                return Holder(conn.pid, proc.name(), cmdline)
    except (psutil.Error, OSError):
        pass
    return None


def is_itk_ui(cmdline: Sequence[str]) -> bool:
    """`itk ui ...`, `python -m itk ui ...` or `.venv/bin/python .venv/bin/itk ui ...`: the command after the
    program (itk's group takes no option with a value, so the first word that is not an option) is `ui`."""
    args = list(cmdline)
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args) and args[i + 1] in ITK_MODULES:
            rest = args[i + 2:]
        elif Path(arg).name == "itk":
            rest = args[i + 1:]
        else:
            continue
        words = [a for a in rest if not a.startswith("-")]
        return bool(words) and words[0] == "ui"
    return False


def describe(who: Holder | None) -> str:
    """'pid 123 (python)' for messages (the page's own port check too); the page named as itself."""
    if who is None:
        return "another process"
    if is_itk_ui(who.cmdline):
        return f"the itk page (`itk ui`, pid {who.pid})"
    return f"pid {who.pid} ({who.name})"


def _owner(port: int) -> str:
    return describe(holder(port))


def judge(port: int, who: Holder | None, own_pid: int) -> Result:
    """The port is busy: the page's own (no problem; app.py would need another port), or someone to stop."""
    app_note = f"the official app.py would need another --server_port while the page holds {port}"
    if who is not None and who.pid == own_pid and is_itk_ui(who.cmdline):
        return Result("port", Status.OK, f"port {port} is this page's own (`itk ui`, pid {who.pid})",
                      details=[app_note], facts={"pid": who.pid, "itk_ui": True})
    if who is not None and is_itk_ui(who.cmdline):
        return Result("port", Status.OK, f"port {port} is in use by {describe(who)}: the page is running",
                      details=[app_note], facts={"pid": who.pid, "itk_ui": True})
    owner = describe(who)
    return Result(
        "port", Status.WARN, f"port {port} is in use by {owner}: the Gradio UI (app.py) cannot start",
        fix=f"stop {owner}, or start app.py with another --server_port",
        facts={"pid": who.pid if who else None, "itk_ui": False},
    )


def check(ctx: Context | None = None, port: int = GRADIO_PORT) -> Result:
    if port_free(port):
        return Result("port", Status.OK, f"port {port} (Gradio UI) is free")
    return judge(port, holder(port), os.getpid())
