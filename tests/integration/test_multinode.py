"""Three `fastws serve` nodes behind a real nginx, sharing the local Redis.

nginx is configured as README's deployment section says (HTTP/1.1 upstream,
Upgrade/Connection headers, long read timeouts, no ip_hash); clients land on
different nodes; every message published on any node, or through the HTTP
publish API, reaches every member exactly once, in publish order per
publisher. Killing a node: its clients reconnect through nginx to the others
and the room goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import websockets

from brokerutil import REDIS_URL, new_prefix

REPO = Path(__file__).resolve().parents[2]
APP = "tests.integration.apps.rooms_app:app"
TOKEN = "s3cret-token-for-tests"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode() if proc.stdout else "exited") from None
            time.sleep(0.05)
    raise AssertionError(f"port {port} did not open")


NGINX_CONF = """
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream fastws {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fastws;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""


@pytest.fixture
def cluster(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (apt-get install nginx)", pytrace=False)
    prefix = new_prefix()
    nodes = []
    for i in range(3):
        port = free_port()
        with open(tmp_path / f"node{i}.log", "wb") as log:      # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", APP,
                 "--host", "127.0.0.1", "--port", str(port), "--broker", REDIS_URL,
                 "--broker-prefix", prefix, "--publish-token", TOKEN, "--ping-interval", "0"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append((proc, port))
    for proc, port in nodes:
        wait_port(port, proc)
    front = free_port()
    for d in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
        (tmp_path / d).mkdir()
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for _, p in nodes)
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp_path, servers=servers, port=front))
    ngx = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(front, ngx)
    yield {"front": front, "nodes": nodes, "tmp": tmp_path}
    ngx.send_signal(signal.SIGQUIT)
    try:
        ngx.wait(10)
    except subprocess.TimeoutExpired:
        ngx.kill()
    for proc, _ in nodes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in nodes:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def join(front, room="multi"):
    ws = await websockets.connect(f"ws://127.0.0.1:{front}/room", max_size=None)
    await ws.send(json.dumps({"hello": {"room": room}}))
    hello = json.loads(await ws.recv())
    return ws, hello["pid"]


async def collect(ws, expect, timeout=20):
    """Messages with a 'pub' field until ``expect`` of them arrived."""
    got = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(got) < expect:
        msg = json.loads(await asyncio.wait_for(ws.recv(), end - loop.time()))
        if "pub" in msg:
            got.append((msg["pub"], msg["i"]))
    return got


def http_publish(front, room, text, token=TOKEN):
    req = urllib.request.Request(f"http://127.0.0.1:{front}/publish",
                                 data=json.dumps({"room": room, "text": text}).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def test_room_across_three_nodes_behind_nginx(cluster):
    front = cluster["front"]

    async def main():
        clients = [await join(front) for _ in range(6)]
        pids = {pid for _, pid in clients}
        assert len(pids) == 3, pids               # round robin: every node has members
        await asyncio.sleep(0.5)                  # subscriptions reach Redis
        N = 200
        for k, (ws, _) in enumerate(clients):
            await ws.send(json.dumps({"publish": "multi", "count": N, "size": 64, "pub": k}))
        total = N * len(clients)
        for ws, _ in clients:
            got = await collect(ws, total)
            # exactly once, in publish order per publisher
            for k in range(len(clients)):
                assert [i for p, i in got if p == k] == list(range(N))
            assert len(got) == total
        # the HTTP publish API, through nginx, to any node
        status, body = http_publish(front, "multi", json.dumps({"pub": "http", "i": 0}))
        assert status == 200 and body["remote"] is True
        for ws, _ in clients:
            assert await collect(ws, 1) == [("http", 0)]
        with pytest.raises(urllib.error.HTTPError) as info:
            http_publish(front, "multi", "x", token="wrong-token-123")
        assert info.value.code == 401

        # kill one node: its clients reconnect through nginx to the others
        victim_pid = clients[0][1]
        victim = next(p for p, _ in cluster["nodes"] if p.pid == victim_pid)
        victim.kill()
        victim.wait(10)
        survivors = []
        for ws, pid in clients:
            if pid == victim_pid:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                ws2, pid2 = await join(front)
                assert pid2 != victim_pid
                survivors.append((ws2, pid2))
            else:
                survivors.append((ws, pid))
        await asyncio.sleep(0.5)
        for k, (ws, _) in enumerate(survivors):
            await ws.send(json.dumps({"publish": "multi", "count": 20, "size": 64, "pub": 100 + k}))
        for ws, _ in survivors:
            got = await collect(ws, 20 * len(survivors))
            for k in range(len(survivors)):
                assert [i for p, i in got if p == 100 + k] == list(range(20))
        for ws, _ in survivors:
            await ws.close()

    asyncio.run(main())
