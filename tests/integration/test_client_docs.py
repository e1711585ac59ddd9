"""The client docs run as written: README.md's "Clients" blocks and docs/protocol.md's exchanges.

Each block is read by its marker (``<!-- test: by test_client_docs.py#ID -->``,
see ``docblocks.py``) and run against real ``fastws serve`` processes; the
only change made to a block is its port (8000 becomes a free port):

* ``connect``: the reconnecting client against the echo example prints ``hello``;
* ``rooms-app`` + ``rooms-client``: the app is served with
  ``--serve-client-js``; the Python client prints ``lobby 1 hello from
  Python``; headless Chromium opens the app's page, whose script imports
  ``/fastws.js``, subscribes and publishes, and a Python client in the room
  gets the browser's message; ``authorize_join`` refuses ``admin*`` rooms;
* ``protocol-server`` + ``exchange``: every ``>`` line of the exchange is sent
  by a raw ``websockets`` client and the ``<`` lines are what the server
  answers (as JSON, in any order within one request's answers);
* ``exchange-history``: the same on two nodes with ``redis+streams://``; the
  ids of the doc stand for the real ids, bound in order of appearance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import websockets

from brokerutil import STREAMS_URL, need_redis, new_prefix
from client_helpers import Node, nodes
from conftest import REPO
from docblocks import block
from fastws.client import RoomClient, SubscriptionError

CHROMIUM = os.environ.get("FASTWS_CHROMIUM", "/usr/bin/chromium")


def with_port(text: str, port: int) -> str:
    return text.replace("8000", str(port))


def run_script(text: str, tmp_path, name: str, timeout: float = 60.0) -> str:
    path = tmp_path / name
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    env.pop("FASTWS_NO_EXTENSIONS", None)
    out = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


class _AppNode(Node):
    """A Node serving a module written into ``tmp_path`` (importable there)."""

    def start(self):
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{self.log_path.parent}"
        try:
            return super().start()
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


def test_readme_connect(engine, tmp_path):
    with nodes() as ns:
        node = Node(engine, tmp_path, app="examples.echo:app")
        ns.append(node.start())
        out = run_script(with_port(block("README.md", "connect").text, node.port), tmp_path, "connect_demo.py")
    assert out.splitlines() == ["hello"]


def test_readme_rooms_app_python_client_and_browser(engine, tmp_path, missing_client):
    if not os.path.exists(CHROMIUM):
        missing_client(f"{CHROMIUM} is not installed (apt-get install chromium)")
    app_text = block("README.md", "rooms-app").text
    assert app_text.startswith("# chat.py - fastws serve chat:app --serve-client-js --port 8000")
    (tmp_path / "chat.py").write_text(app_text)
    with nodes() as ns:
        node = _AppNode(engine, tmp_path, "--serve-client-js", app="chat:app")
        ns.append(node.start())
        out = run_script(with_port(block("README.md", "rooms-client").text, node.port), tmp_path, "client_demo.py")
        assert out.splitlines()[0] == "lobby 1 hello from Python"

        async def browser():
            got = []
            async with RoomClient(node.url + "/rt") as rt:
                await rt.subscribe("lobby", got.append)
                with pytest.raises(SubscriptionError) as info:
                    await rt.subscribe("admin-room")
                assert info.value.code == "denied"
                cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                       "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                       "--disable-component-update", "--disable-sync", "--disable-extensions",
                       f"--user-data-dir={tmp_path / 'profile'}", node.http + "/"]
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
                try:
                    for _ in range(600):
                        if any(m.data == "hello from a browser" for m in got):
                            break
                        await asyncio.sleep(0.1)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            return got
        got = asyncio.run(browser())
    assert [m.data for m in got] == ["hello from a browser"]


# -- docs/protocol.md -------------------------------------------------------------------------------------

_ID = re.compile(r"^\d{13}-\d+$")


def exchange(text: str) -> list:
    """The exchange as steps: ("send", obj), ("recv", [obj ...]) or ("note", text)."""
    steps = []
    for line in text.splitlines():
        if line.startswith("> "):
            steps.append(["send", json.loads(line[2:])])
            steps.append(["recv", []])
        elif line.startswith("< "):
            steps[-1][1].append(json.loads(line[2:]))
        elif line.startswith("("):
            steps.append(["note", line])
    return steps


def _bind(doc, real, ids: dict) -> bool:
    """Does ``real`` match ``doc``, the doc's stream ids standing for real ones?"""
    if isinstance(doc, dict):
        return (isinstance(real, dict) and doc.keys() == real.keys()
                and all(_bind(doc[k], real[k], ids) for k in doc))
    if isinstance(doc, str) and _ID.match(doc) and isinstance(real, str) and _ID.match(real):
        return ids.setdefault(doc, real) == real
    return doc == real


def _substitute(obj, ids: dict):
    if isinstance(obj, dict):
        return {k: _substitute(v, ids) for k, v in obj.items()}
    if isinstance(obj, str) and obj in ids:
        return ids[obj]
    return obj


async def _play(steps, urls, on_note, ids: dict) -> None:
    ws = await websockets.connect(urls[0], subprotocols=["fastws.rooms.v1"])
    try:
        assert ws.subprotocol == "fastws.rooms.v1"
        for kind, what in steps:
            if kind == "note":
                ws = await on_note(ws, what)
            elif kind == "send":
                await ws.send(json.dumps(_substitute(what, ids)))
            else:
                got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in what]
                unmatched = list(got)
                for want in what:
                    for real in unmatched:
                        trial = dict(ids)
                        if _bind(want, real, trial):
                            ids.update(trial)
                            unmatched.remove(real)
                            break
                    else:
                        raise AssertionError(f"expected {want}, got {got}")
        with pytest.raises(asyncio.TimeoutError):              # nothing more than the doc says
            await asyncio.wait_for(ws.recv(), 0.3)
    finally:
        await ws.close()


def test_protocol_exchange(engine, tmp_path):
    (tmp_path / "rooms_server.py").write_text(block("docs/protocol.md", "protocol-server").text)
    steps = exchange(block("docs/protocol.md", "exchange").text)
    assert len([s for s in steps if s[0] == "send"]) >= 8
    with nodes() as ns:
        node = _AppNode(engine, tmp_path, "--max-room-name", "16", app="rooms_server:app")
        ns.append(node.start())
        asyncio.run(_play(steps, [node.url + "/rt"], None, {}))


def test_protocol_exchange_with_history(engine, tmp_path):
    need_redis()
    (tmp_path / "rooms_server.py").write_text(block("docs/protocol.md", "protocol-server").text)
    steps = exchange(block("docs/protocol.md", "exchange-history").text)
    prefix = new_prefix("doc-history-")
    args = ["--broker", STREAMS_URL, "--broker-prefix", prefix]
    with nodes() as ns:
        a = _AppNode(engine, tmp_path, *args, app="rooms_server:app", name="a")
        b = _AppNode(engine, tmp_path, *args, app="rooms_server:app", name="b")
        ns += [a.start(), b.start()]

        async def note(ws, text):
            # the connection is lost; "second" is published meanwhile; the client connects to another node
            assert "another node" in text and '"second"' in text
            await ws.close()
            async with websockets.connect(a.url + "/rt", subprotocols=["fastws.rooms.v1"]) as other:
                await other.send(json.dumps({"t": "pub", "room": "news", "data": "second", "ack": "x"}))
                assert json.loads(await asyncio.wait_for(other.recv(), 10)) == {"t": "ack", "ack": "x"}
            return await websockets.connect(b.url + "/rt", subprotocols=["fastws.rooms.v1"])

        ids: dict = {}
        asyncio.run(_play(steps, [a.url + "/rt"], note, ids))
    assert len(set(ids.values())) == 2          # "first" and "second": two real stream ids
