"""port: the Gradio UI of the official app.py listens on 8418; a busy port is why "the UI does not load"."""

from __future__ import annotations

import socket

from itk.checks.base import Context, Result, Status

GRADIO_PORT = 8418


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _owner(port: int) -> str:
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def check(ctx: Context | None = None, port: int = GRADIO_PORT) -> Result:
    if port_free(port):
        return Result("port", Status.OK, f"port {port} (Gradio UI) is free")
    owner = _owner(port)
    return Result(
        "port", Status.WARN, f"port {port} is in use by {owner}: the Gradio UI (app.py) cannot start",
        fix=f"stop {owner}, or start app.py with another --server_port",
    )
