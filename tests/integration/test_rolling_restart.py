"""The rolling-restart recipe of the README loses nothing.

Two ``fastws serve --reuse-port`` processes on one port (the old version and
the new one); a steady stream of new WebSocket connections (real
``websockets`` clients, one every few milliseconds, each sending a message
and waiting for its echo) runs across the SIGTERM of the old one, started
with ``--drain-delay``.  Every connection must succeed: the old server stops
listening at SIGTERM after taking the connections the kernel had already
queued on it, so the kernel gives the new ones to its sibling, instead of
answering them 503 for the whole delay.  Both fronts, both engines.

The recipe (README, docs/deployment.md) includes ``net.ipv4.tcp_migrate_req
= 1``: without it Linux resets a connection whose TCP handshake is half done
at the very moment the old listener closes (about one restart in fifty at
this rate).  The scenario therefore runs in a network namespace of its own
(``unshare(CLONE_NEWNET)``, its own loopback, that sysctl set there), so the
host's settings are left alone: this file runs itself as a child process in
it (``python tests/integration/test_rolling_restart.py FRONT ENGINE DIR``),
which prints its findings as JSON.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APPS = {"native": "examples.echo:app", "asgi": "tests.integration.apps.asgi_scope_app:app"}
RATE = 100                  # new connections per second
BEFORE, AFTER = 0.8, 3.5    # seconds of the stream before and after the SIGTERM
CLONE_NEWNET = 0x40000000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("front", ["native", "asgi"])
def test_rolling_restart_turns_no_new_connection_away(engine, front, tmp_path):
    child = subprocess.run([sys.executable, __file__, front, engine, str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=100)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["migrate_req"] == "1"
    assert not got["failures"], f"{len(got['failures'])} of {got['count']} connections failed: {got['failures'][:10]}"
    assert got["old_exit"] == 0, got["old_log"][-3000:]
    # both served: the old one until its SIGTERM (and what it had queued), the new one after
    assert got["served_old"] > 0 and got["served_new"] > 0, got
    assert got["served_old"] + got["served_new"] == got["count"], got
    assert "stopped listening" in got["old_log"]
    assert got["new_alive"]


# -- the child: one scenario in a network namespace of its own ---------------------------


def own_network() -> str:
    """Enter a new network namespace, bring its loopback up, set
    tcp_migrate_req there; the value read back."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed (root or CAP_SYS_ADMIN is needed)")
    with socket.socket() as s:                      # ifconfig lo up
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, req))[1]           # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))         # SIOCSIFFLAGS, IFF_UP
    with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
        f.write("1")
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        return f.read().strip()


def start(app, port, engine, log_path, *args):
    env = dict(os.environ)
    env.pop("FASTWS_NO_EXTENSIONS", None)
    if engine == "wsproto":
        env["FASTWS_NO_EXTENSIONS"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", app,
             "--host", "127.0.0.1", "--port", str(port), "--reuse-port", "--access-log", *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while "listening on" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log_path.read_text(errors="replace"))
        time.sleep(0.05)
    return proc


def scenario(front: str, engine: str, tmp: Path) -> dict:
    import websockets

    migrate = own_network()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old_log, new_log = tmp / "old.log", tmp / "new.log"
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

    async def stream():
        failures, tasks = [], []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent_term, i = False, 0
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
        count, failures = asyncio.run(stream())
        old_exit = old.wait(20)
        return {"migrate_req": migrate, "count": count, "failures": failures, "old_exit": old_exit,
                "served_old": old_log.read_text(errors="replace").count("101 upgraded"),
                "served_new": new_log.read_text(errors="replace").count("101 upgraded"),
                "old_log": old_log.read_text(errors="replace"), "new_alive": new.poll() is None}
    finally:
        for p in (old, new):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


if __name__ == "__main__":
    print(json.dumps(scenario(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
