"""Helpers of the client tests (``tests/integration/test_client*.py``).

:class:`Node` is one ``fastws serve`` process on a port of its own that a
test can stop (SIGTERM), kill (SIGKILL), freeze (SIGSTOP) and start again on
the same port: what a client must survive.  Every process is on 127.0.0.1,
every wait is bounded, and :func:`nodes` stops whatever is left at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import REPO, fastws_command, free_port

APP = "tests.integration.apps.client_app:app"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
NODE_DIR = REPO / "tests" / "integration" / "node"


class Node:
    """A ``fastws serve`` process (see the module docstring)."""

    def __init__(self, engine: str, log_dir: Path, *args: str, app: str = APP, port: int | None = None,
                 name: str = "node") -> None:
        self.engine = engine
        self.args = list(args)
        self.app = app
        self.port = port or free_port()
        self.log_path = Path(log_dir) / f"{name}-{self.port}.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Node:
        env = dict(os.environ)
        env.pop("FASTWS_NO_EXTENSIONS", None)
        if self.engine == "wsproto":
            env["FASTWS_NO_EXTENSIONS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [*fastws_command(), "serve", self.app, "--host", HOST, "--port", str(self.port),
               "--log-level", "info", *self.args]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastws serve exited with {self.proc.returncode}\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.5):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"fastws serve did not listen within {START_TIMEOUT}s\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a graceful shutdown), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL: the node dies without closing anything."""
        if self.proc is None:
            return None
        self.signal(signal.SIGKILL)
        return self.proc.wait(10)

    def get(self, path: str, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.http + path, timeout=timeout) as r:
            return r.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")


@contextlib.contextmanager
def nodes():
    """A list to put Nodes in; each is killed at the end if still running."""
    started: list = []
    try:
        yield started
    finally:
        for n in started:
            with contextlib.suppress(Exception):
                n.kill()


def handshakes(node: Node, status: int) -> int:
    """``websocket_handshakes_total{result="<status>"}`` of ``node``."""
    for line in node.metrics().splitlines():
        if line.startswith("websocket_handshakes_total") and f'result="{status}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def eventually(check, timeout: float = 10.0, interval: float = 0.02):
    """Wait until ``check()`` is truthy (bounded); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(interval)


def node_script(script: str, *args, timeout: float = 60.0, cwd: Path = NODE_DIR, flags=()):
    """Run ``node SCRIPT ARGS`` (in tests/integration/node, where ``ws`` is
    installed); returns the JSON objects it printed, one per line."""
    proc = subprocess.run(["node", *flags, script, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0:
        raise AssertionError(f"node {script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return lines


def build_js(out: Path) -> Path:
    """Build the npm package's files (clients/js/build.mjs) into ``out``."""
    subprocess.run(["node", str(REPO / "clients" / "js" / "build.mjs"), str(out)], check=True,
                   capture_output=True, timeout=30)
    return out / "fastws.js"


__all__ = ["Node", "nodes", "handshakes", "eventually", "node_script", "build_js", "APP", "HOST", "NODE_DIR"]
