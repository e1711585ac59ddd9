"""Three regions on one machine: a chat whose users are in different regions.

    python examples/regions.py          # starts everything, chats, stops by itself

Each region (``a``, ``b``, ``c``) gets its own ``redis-server`` on a free port
and one ``fastws serve examples.regions:app`` node with ``--region`` and
``--region-peers`` (the other regions' Redis).  Then alice (in a), bob (in b)
and carol (in c) connect to their own region's node; alice says hello to the
lobby, which has members in all three regions, and sends carol a direct
message; bob answers the lobby.  What each user received is printed, then
every process is stopped.  Needs ``redis-server`` and ``pip install
"fastws[redis]" websockets``.

The app itself (what ``fastws serve examples.regions:app`` runs):

* ``ws://host:port/chat?user=NAME`` binds the connection to user NAME
  (``app.bind_user``: other regions find the user in this region's
  directory) and joins it to the room ``lobby``;
* a message ``@NAME text`` goes to user NAME, in whatever region
  (``app.send_to_user``); any other message goes to the lobby, in every
  region (``app.publish``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fastws

app = fastws.App()


@app.on_open("/chat")
def opened(conn):
    user = dict(p.split("=", 1) for p in (conn.query_string or "").split("&") if "=" in p).get("user")
    if not user:
        conn.close(4000, "say who you are: /chat?user=NAME")
        return
    conn.store["user"] = user
    app.bind_user(conn, user)
    conn.join("lobby")


@app.on_message("/chat")
async def said(conn, text):
    me = f"{conn.store['user']}@{app.node.config.region}"
    if text.startswith("@"):
        user, _, words = text[1:].partition(" ")
        regions = await app.send_to_user(user, f"(direct) {me}: {words}")
        if not regions:
            conn.send(f"{user} is not connected anywhere")
    else:
        app.publish("lobby", f"[lobby] {me}: {text}")


# -- the demo: three regions on this machine -----------------------------------------

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer 200 within {seconds:g}s")
        time.sleep(0.1)


async def chat(ports: dict[str, int]) -> dict[str, list[str]]:
    import websockets

    users = {"alice": "a", "bob": "b", "carol": "c"}
    conns = {u: await websockets.connect(f"ws://{HOST}:{ports[r]}/chat?user={u}") for u, r in users.items()}
    got: dict[str, list[str]] = {u: [] for u in users}

    async def read(user: str) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in conns[user]:
                got[user].append(message)

    readers = [asyncio.create_task(read(u)) for u in users]
    await asyncio.sleep(0.5)                       # the joins reach every node's broker
    await conns["alice"].send("hello everyone")
    await conns["alice"].send("@carol see you in c")
    await asyncio.sleep(1.0)
    await conns["bob"].send("hi alice, from b")
    await asyncio.sleep(1.0)
    for ws in conns.values():
        await ws.close()
    for t in readers:
        t.cancel()
    return got


def main() -> None:
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed")
    regions = ("a", "b", "c")
    work = Path(tempfile.mkdtemp(prefix="fastws-regions-"))
    redis_ports = {r: free_port() for r in regions}
    ports = {r: free_port() for r in regions}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for r in regions:
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(redis_ports[r]), "--bind", HOST, "--save", "",
                 "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL))
        for r in regions:
            peers = ",".join(f"{p}=redis://{HOST}:{redis_ports[p]}/0" for p in regions if p != r)
            log = open(work / f"node-{r}.log", "wb")  # noqa: SIM115 (closed with the process)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fastws", "serve", "examples.regions:app", "--host", HOST,
                 "--port", str(ports[r]), "--broker", f"redis://{HOST}:{redis_ports[r]}/0",
                 "--region", r, "--region-peers", peers], cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        for r in regions:
            wait_for(f"http://{HOST}:{ports[r]}/health")
        got = asyncio.run(chat(ports))
        for user in sorted(got):
            for message in got[user]:
                print(f"{user} got: {message}")
        with urllib.request.urlopen(f"http://{HOST}:{ports['a']}/regions", timeout=5) as r:
            doc = json.load(r)
        print("GET /regions on a:", ", ".join(f"{x['name']} {x['state']}" for x in doc["regions"]))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
