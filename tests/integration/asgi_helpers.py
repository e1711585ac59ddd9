"""A real ASGI server in a subprocess, for tests/integration/test_asgi.py.

    server = AsgiProcess("examples.starlette_app:app", backend="cython", log_path=...)
    server.start(); ...; server.stop() -> exit code

Backends: ``cython`` and ``wsproto`` run ``fastws serve APP`` (the second
with ``FASTWS_NO_EXTENSIONS=1``); ``uvicorn`` runs ``python -m uvicorn APP``
(websockets implementation, same message limit), for behaviour parity.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
LIMIT = 1 << 20    # --max-message-size given to every backend


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def fastws_command() -> list[str]:
    script = Path(sys.executable).with_name("fastws")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from fastws.cli.main import main; main()"]


class AsgiProcess:
    def __init__(self, app: str, backend: str, log_path: Path, env: dict | None = None,
                 args: tuple = ()) -> None:
        self.app = app
        self.backend = backend
        self.log_path = log_path
        self.env = dict(env or {})
        self.args = tuple(args)
        self.port = 0
        self.proc = None
        self.cmd = []

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        if self.backend == "uvicorn":
            return [sys.executable, "-m", "uvicorn", self.app, "--host", HOST, "--port",
                    str(self.port), "--ws", "websockets", "--ws-max-size", str(LIMIT),
                    "--log-level", "info", *self.args]
        return [*fastws_command(), "serve", self.app, "--host", HOST, "--port", str(self.port),
                "--max-message-size", str(LIMIT), "--log-level", "info", *self.args]

    def spawn(self) -> subprocess.Popen:
        self.port = free_port()
        self.cmd = self.command()
        env = dict(os.environ)
        env.pop("FASTWS_NO_EXTENSIONS", None)
        if self.backend == "wsproto":
            env["FASTWS_NO_EXTENSIONS"] = "1"
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {' '.join(self.cmd)} env={self.env}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self.proc

    def start(self) -> AsgiProcess:
        self.spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.log()}")
            marker = "Application startup complete" if self.backend == "uvicorn" else "listening on"
            if marker in self.log():
                with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.5):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start in {STARTUP_TIMEOUT}s\n{self.log()}")

    def stop(self):
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode
