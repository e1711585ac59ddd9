"""The rolling-restart recipe of the README loses nothing.

Two ``fastws serve --reuse-port`` processes on one port (the old version and
the new one); a steady stream of new WebSocket connections (real
``websockets`` clients, one every few milliseconds, each sending a message
and waiting for its echo) runs across the SIGTERM of the old one, started
with ``--drain-delay``.  Every connection must succeed: the old server stops
listening at SIGTERM after taking the connections the kernel had already
queued on it, so the kernel gives the new ones to its sibling, instead of
answering them 503 for the whole delay.  Both fronts, both engines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets

REPO = Path(__file__).resolve().parents[2]
APPS = {"native": "examples.echo:app", "asgi": "tests.integration.apps.asgi_scope_app:app"}
RATE = 100             # new connections per second
BEFORE, AFTER = 0.8, 3.5   # seconds of the stream before and after the SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app, port, engine, log_path, *args):
    env = dict(os.environ)
    env.pop("FASTWS_NO_EXTENSIONS", None)
    if engine == "wsproto":
        env["FASTWS_NO_EXTENSIONS"] = "1"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", app,
         "--host", "127.0.0.1", "--port", str(port), "--reuse-port", "--access-log", *args],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while "listening on" not in log_path.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
        time.sleep(0.05)
    return proc


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("front", ["native", "asgi"])
def test_rolling_restart_turns_no_new_connection_away(engine, front, tmp_path):
    port = free_port()
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    old = start(APPS[front], port, engine, old_log, "--drain-delay", "2", "--reconnect-delay", "0.5")
    new = start(APPS[front], port, engine, new_log)
    url = f"ws://127.0.0.1:{port}/chat"

    async def one(i, failures):
        try:
            async with websockets.connect(url, open_timeout=10, close_timeout=5) as ws:
                if front == "asgi":
                    await asyncio.wait_for(ws.recv(), 10)       # the scope it sends first
                await ws.send(f"m{i}")
                assert await asyncio.wait_for(ws.recv(), 10) == f"m{i}"
        except Exception as exc:  # every failure is reported, not just the first
            failures.append(f"connection {i}: {type(exc).__name__}: {exc}")

    async def main():
        failures, tasks = [], []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent_term = False
        i = 0
        while loop.time() - t0 < BEFORE + AFTER:
            if not sent_term and loop.time() - t0 >= BEFORE:
                old.send_signal(signal.SIGTERM)
                sent_term = True
            tasks.append(asyncio.create_task(one(i, failures)))
            i += 1
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*tasks)
        return i, failures

    try:
        count, failures = asyncio.run(main())
        assert not failures, f"{len(failures)} of {count} connections failed: {failures[:10]}"
        assert old.wait(20) == 0
        old_text = old_log.read_text(errors="replace")
        served_old = old_text.count("101 upgraded")
        served_new = new_log.read_text(errors="replace").count("101 upgraded")
        assert served_old + served_new == count
        assert served_old > 0 and served_new > 0, (served_old, served_new)
        assert "stopped listening" in old_text
        assert new.poll() is None
    finally:
        stop(old)
        stop(new)
