"""``fastws serve --workers 2``: one scrape of /metrics shows every worker.

The supervisor makes ``FASTWS_METRICS_DIR``; each worker writes its snapshot
there once a second and whichever worker answers a scrape adds them up.  The
test opens connections until both workers hold some (checked with psutil on
the worker processes), sends a known number of messages, and checks that
every scrape, whichever worker answers it, shows the totals.
"""

from __future__ import annotations

import asyncio
import glob
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import websockets
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from fastws.cli.main import main; main()"]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def scrape(port, retries=0) -> dict:
    """{(sample name, frozenset(labels)): value}.  ``retries``: after a worker
    was killed, a scrape queued on its listening socket is reset by the kernel."""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
                body = r.read().decode()
            break
        except (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError):
            if attempt == retries:
                raise
            time.sleep(0.1)
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples, name, **labels) -> float:
    """Sum of every sample ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def per_worker(samples, name, **labels) -> dict:
    return {dict(ls)["worker"]: v for (n, ls), v in samples.items()
            if n == name and set(labels.items()) <= ls}


class Workers:
    """``fastws serve examples.echo:app --workers 2`` on a free port."""

    def __init__(self, tmp_path, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.port = free_port()
        self.log_path = tmp_path / "workers.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*CLI, "serve", "examples.echo:app", "--host", HOST, "--port",
                                          str(self.port), "--workers", "2", *args],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        ok = wait_for(lambda: self.proc.poll() is not None or len(self.listening()) == 2, timeout=30)
        assert ok and self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self):
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def listening(self):
        return [c for c in self.children() if any(
            k.status == psutil.CONN_LISTEN and k.laddr.port == self.port for k in _conns(c))]

    def established(self) -> dict[int, int]:
        """{worker pid: WebSocket connections it holds} (seen by the kernel)."""
        return {c.pid: sum(1 for k in _conns(c) if k.status == psutil.CONN_ESTABLISHED
                           and k.laddr.port == self.port) for c in self.children()}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def _conns(proc):
    try:
        return proc.net_connections(kind="tcp")
    except AttributeError:                          # psutil < 6
        return proc.connections(kind="tcp")
    except psutil.NoSuchProcess:
        return []


def test_one_scrape_shows_every_worker(tmp_path):
    server = Workers(tmp_path)
    loop = asyncio.new_event_loop()
    clients = []
    try:
        # connect in small batches until the kernel has given both workers some
        async def connect(n):
            for _ in range(n):
                clients.append(await websockets.connect(f"ws://{HOST}:{server.port}/"))

        while True:
            loop.run_until_complete(connect(4))
            held = wait_for(lambda: (lambda e: e if sum(e.values()) == len(clients) else None)(
                server.established()), timeout=5)
            assert held, server.established()
            if sum(1 for n in held.values() if n > 0) == 2:
                break
            assert len(clients) < 200, f"SO_REUSEPORT never used the second worker: {held}"
        n = len(clients)

        # i + 1 messages on connection i: a known total
        async def traffic():
            for i, c in enumerate(clients):
                for _ in range(i + 1):
                    await c.send("ping")
                    assert await c.recv() == "ping"

        loop.run_until_complete(traffic())
        sent = n * (n + 1) // 2

        # the other worker's numbers are up to ~1 s old: wait until they settle
        settled = wait_for(lambda: (lambda m: m if total(m, "websocket_messages_total", direction="inbound")
                                    == sent else None)(scrape(server.port)), timeout=10)
        assert settled, f"inbound never reached {sent}: {scrape(server.port)}"
        time.sleep(1.2)                        # every worker has written its settled snapshot
        answered_by = set()
        for _ in range(12):                    # SO_REUSEPORT spreads the scrapes over the workers
            m = scrape(server.port)
            ages = per_worker(m, "fastws_worker_snapshot_age_seconds")
            answered_by |= {w for w, age in ages.items() if age == 0.0}
            assert total(m, "fastws_workers") == 2
            assert total(m, "websocket_connections_total") == n
            assert total(m, "websocket_messages_total", direction="inbound") == sent
            assert total(m, "websocket_messages_total", direction="outbound") == sent
            assert total(m, "websocket_handshakes_total", result="101") == n
            conns = per_worker(m, "websocket_worker_connections")
            assert sorted(conns.values()) == sorted(float(v) for v in held.values())
            assert sum(per_worker(m, "websocket_worker_messages_total", direction="inbound").values()) == sent
            assert total(m, "websocket_message_latency_ms_count") > 0
        assert len(answered_by) >= 1

        # a worker killed with SIGKILL: its numbers leave the totals once the
        # supervisor has noticed, the replacement starts from zero
        victim = max(held, key=held.get)
        survivors = sum(v for pid, v in held.items() if pid != victim)
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: (lambda m: m if total(m, "fastws_workers") == 2
                                  and total(m, "websocket_connections_total") == survivors
                                  and len(server.listening()) == 2 else None)(scrape(server.port, 5)),
                         timeout=15)
        assert after, f"totals never dropped the killed worker: {scrape(server.port, 5)}\n{server.log()}"
        assert "exited with code" in server.log()

        async def close_all():
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

        loop.run_until_complete(close_all())
        gone = wait_for(lambda: total(scrape(server.port, 5), "websocket_connections_total") == 0, timeout=10)
        assert gone
    finally:
        loop.close()
        rc = server.stop()
    assert rc == 0, server.log()
    # the snapshot directory is removed when the supervisor exits
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"fastws-metrics-{server.proc.pid}-*"))
