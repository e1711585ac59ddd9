"""Processes of the gateway tests: the backend (uvicorn, Streams workers) and
``fastws serve --gateway`` on the engine under test, each a real subprocess
on 127.0.0.1, logging to a file, stopped by the test that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BACKEND = "tests.integration.apps.gateway_backend"
HOST = "127.0.0.1"
TOKEN = "gateway-api-token-1"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


class Proc:
    """One subprocess of a test: its own session, its output in ``log``."""

    def __init__(self, cmd, log: Path, env=None, port: int = 0) -> None:
        self.cmd, self.log_path, self.port = cmd, log, port
        full = dict(os.environ)
        full.pop("FASTWS_NO_EXTENSIONS", None)
        full.setdefault("PYTHONUNBUFFERED", "1")
        full.update(env or {})
        with open(log, "ab") as out:
            out.write(f"\n=== {' '.join(map(str, cmd))}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=full, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self, port: int | None = None, text: str | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.alive(), f"{self.cmd} exited {self.proc.returncode}:\n{self.log()[-4000:]}"
            if (port is None or _listening(port)) and (text is None or text in self.log()):
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.cmd} did not start:\n{self.log()[-4000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class Procs:
    """Every process a test starts, stopped when it ends (``with Procs(tmp) as ps``)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list = []
        self.events_log = tmp / "events.jsonl"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.all):
            p.stop(timeout=10)

    def backend(self, port: int | None = None, **env) -> Proc:
        """The FastAPI backend under uvicorn; ``url`` on the returned Proc is its events URL."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "uvicorn", f"{BACKEND}:app", "--host", HOST, "--port", str(port),
               "--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--timeout-graceful-shutdown",
               "10"]
        full = {"GW_LOG": str(self.events_log), "GW_NAME": f"http-{len(self.all)}", **env}
        p = Proc(cmd, self.tmp / f"backend-{len(self.all)}.log", full, port)
        p.url = f"http://{HOST}:{port}/events/"
        self.all.append(p)
        p.wait_listening(port)
        return p

    def worker(self, url: str, name: str, claim_idle: float = 1.0, **env) -> Proc:
        """A Streams worker of the backend's handler."""
        cmd = [sys.executable, "-m", "fastws.gateway", f"{BACKEND}:handle", "--url", url, "--consumer", name,
               "--claim-idle", str(claim_idle)]
        p = Proc(cmd, self.tmp / f"worker-{name}-{len(self.all)}.log",
                 {"GW_LOG": str(self.events_log), "GW_NAME": name, **env})
        self.all.append(p)
        p.wait_listening(text=f"worker {name} on")
        return p

    def gateway(self, engine: str, url: str, *args: str, app: str | None = None, env=None) -> Proc:
        """``fastws serve [APP] --gateway URL ARGS`` on ``engine`` (with the HTTP API on TOKEN)."""
        port = free_port()
        cmd = [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", *([app] if app else []),
               "--host", HOST, "--port", str(port), "--gateway", url, "--publish-token", TOKEN, *args]
        full = dict(env or {})
        if engine == "wsproto":
            full["FASTWS_NO_EXTENSIONS"] = "1"
        p = Proc(cmd, self.tmp / f"gateway-{len(self.all)}.log", full, port)
        self.all.append(p)
        p.wait_listening(port, text="listening on")
        m = re.search(r"engine=(\w+)", p.log())
        assert m and m.group(1) == engine, p.log()
        p.ws = lambda path="/": f"ws://{HOST}:{port}{path}"
        p.http = f"http://{HOST}:{port}"
        return p


def events(ps: Procs, kind: str | None = None, conn: str | None = None) -> list:
    """The events the backend handled (in the order it handled them), as ``(who, event)``."""
    out = []
    if not ps.events_log.exists():
        return out
    for line in ps.events_log.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        ev = rec["event"]
        if (kind is None or ev["type"] == kind) and (conn is None or ev["connection_id"] == conn):
            out.append((rec["who"], ev))
    return out


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def http_get(url: str, timeout: float = 10.0) -> tuple:
    """``(status, body, headers)`` of a GET (an error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def http_post(url: str, obj, timeout: float = 10.0) -> tuple:
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric(gw: Proc, name: str, **labels) -> float:
    """The value of one series of the gateway's /metrics (0 when absent)."""
    _, body, _ = http_get(gw.http + "/metrics")
    want = {k: str(v) for k, v in labels.items()}
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        base, _, rest = series.partition("{")
        got = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if base == name and got == want:
            return float(value)
    return 0.0


def health(gw: Proc) -> tuple:
    status, body, _ = http_get(gw.http + "/health")
    return status, json.loads(body)


def doc_commands(text: str) -> list:
    """The command lines of a shell block (comments and blank lines dropped,
    a trailing ``&`` and comment removed), as lists of words."""
    import shlex

    out = []
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        out.append(shlex.split(line.rstrip("&").strip()))
    return out


async def chat_traffic(url: str, clients: int, seconds: float, during, per_second: float = 20.0) -> dict:
    """``clients`` connections to the README's chat backend (``?user=uN``), each
    sending ``m<i>`` ``per_second`` times a second for ``seconds``; ``during()``
    (a coroutine function) runs meanwhile.  Returns, per client, what it sent,
    its "sent" replies, the lobby lines it got and whether it stayed open."""
    import asyncio

    import websockets
    from websockets.protocol import State

    conns = [await websockets.connect(f"{url}?user=u{i}", open_timeout=10) for i in range(clients)]
    got = {i: {"sent": 0, "lines": [], "n": 0} for i in range(clients)}

    async def reader(i, ws):
        try:
            async for m in ws:
                if m == "sent":
                    got[i]["sent"] += 1
                else:
                    got[i]["lines"].append(m)
        except websockets.ConnectionClosed:
            pass

    async def writer(i, ws):
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            await ws.send(f"m{got[i]['n']}")
            got[i]["n"] += 1
            await asyncio.sleep(1 / per_second)

    readers = [asyncio.get_running_loop().create_task(reader(i, ws)) for i, ws in enumerate(conns)]
    await asyncio.gather(during(), *(writer(i, ws) for i, ws in enumerate(conns)))
    total = sum(g["n"] for g in got.values())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(g["sent"] == g["n"] and len(g["lines"]) == total
                                                  for g in got.values()):
        await asyncio.sleep(0.1)
    for i, ws in enumerate(conns):
        got[i]["open"] = ws.state is State.OPEN
        await ws.close()
        readers[i].cancel()
    return got
