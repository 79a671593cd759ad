"""Running the app: bind the listening socket ourselves, then hand it to uvicorn.

Binding first turns a taken port into one clear error before any model is loaded (uvicorn would
log it and exit), and lets a caller bind port 0 and learn the free port it got (tests, scripts).
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from fastapi import FastAPI


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OSError with a one-line
    reason when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        reason = e.strerror or str(e)
        raise OSError(
            f"cannot listen on {host}:{port}: {reason}; choose another --port (or --host)"
        ) from None


def server(app: FastAPI, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app` that logs through this process's logging setup."""
    return uvicorn.Server(uvicorn.Config(app, log_config=None, log_level=log_level))


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` until interrupted (Ctrl-C)."""
    server(app, log_level).run(sockets=[sock])


class Background:
    """The app served on a free localhost port from a thread of this process, for tests and
    scripts: `with Background(app) as url: ...` (url like http://127.0.0.1:PORT)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        self.sock = bind(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = server(app, log_level="warning")
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started serving")
            self.thread.join(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        logging.getLogger(__name__).debug("stopped %s", self.url)
