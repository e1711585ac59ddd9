"""Socket.IO on fastws with the ``socket.io-client`` npm package, in Node and in headless Chromium.

``tests/integration/node/sio_client.mjs`` runs one scenario per process against a real
``fastws serve`` of ``tests/integration/apps/sio_app.py`` (both engines, both fronts) and
prints its results as one JSON line: connect with auth, events and acks both ways,
binary attachments, rooms and skip_sid, namespaces on one connection, a refused
CONNECT, a refused polling transport, a server disconnect, a ping timeout seen by the
client (the server is stopped with SIGSTOP), and connection state recovery after the
link drops.  The browser test loads socket.io-client's own browser build in a page.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from docblocks import block

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "sio_client.mjs"
BUNDLE = NODE_DIR / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js"
CHROMIUM = os.environ.get("FASTWS_CHROMIUM", "/usr/bin/chromium")
APPS = {"native": "tests.integration.apps.sio_app:app", "asgi": "tests.integration.apps.sio_app:asgi"}


@pytest.fixture(params=sorted(APPS))
def front(request) -> str:
    return request.param


@pytest.fixture
def need_node(missing_client):
    if not shutil.which("node"):
        missing_client("node is not installed")
    if not (NODE_DIR / "node_modules" / "socket.io-client").is_dir():
        missing_client("socket.io-client is not installed in tests/integration/node (npm ci there)")


def scenario(name: str, server, *, timeout: float = 60, on_line=None) -> dict:
    base = f"http://{server.host}:{server.port}"
    proc = subprocess.Popen(["node", str(SCRIPT), name, base, base + "/emit"], cwd=NODE_DIR,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    lines = []
    try:
        end = time.monotonic() + timeout
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(json.loads(line))
            if time.monotonic() > end:
                break
        proc.wait(max(1, end - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert lines, f"no output from node ({name}): {proc.stderr.read()[-2000:]}"
    out = json.loads(lines[-1])
    assert out["errors"] == [], out["errors"]
    return out


def test_node_client_events_acks_binary_rooms_namespaces(server_factory, front, need_node):
    out = scenario("basic", server_factory(app=APPS[front]))
    assert out["whoami"] == {"sid": out["id"], "auth": {"token": "t", "user": "node"}}
    assert out["echo"] == {"n": 1, "s": "ü"}
    assert out["ask"] == {"answer": {"got": "q"}}                  # the server's call(), the client's ack
    assert out["binaryAck"] is True and out["binaryEvent"] is True
    assert out["clientTimeout"] is True                             # emitWithAck with a timeout, no handler
    assert out["rooms"] == {"a": [], "b": ["skip-a"], "c": []}      # skip_sid, non-members
    assert out["chatWhoami"]["namespace"] == "/chat" and out["chatWhoami"]["auth"] == {"who": "chat"}
    assert out["sameEngine"] is True                                # "/" and "/chat" share one connection


def test_node_client_refused(server_factory, front, need_node):
    out = scenario("refused", server_factory(app=APPS[front]))
    assert out["message"] == "bad token" and out["data"] == {"code": 4001}
    assert out["nopeMessage"] == "Invalid namespace"
    assert "connected" not in out and "nopeConnected" not in out


def test_node_client_polling_refused(server_factory, front, need_node):
    out = scenario("polling", server_factory(app=APPS[front]))
    assert "connected" not in out
    assert out["error"] == "xhr poll error" and out["description"] == 400


def test_node_client_server_disconnect(server_factory, front, need_node):
    out = scenario("serverDisconnect", server_factory(app=APPS[front]))
    assert out["reason"] == "io server disconnect" and out["active"] is False


def test_node_client_sees_ping_timeout(server_factory, front, need_node):
    """The server stops (SIGSTOP): no ping comes, the client gives up with "ping timeout"."""
    server = server_factory(app=APPS[front], env={"SIO_PING_INTERVAL": "0.5", "SIO_PING_TIMEOUT": "0.5"})
    stopped = []

    def on_line(obj):
        if obj.get("connected"):
            os.kill(server.proc.pid, signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        out = scenario("pingTimeout", server, on_line=on_line)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert stopped and out["reason"] == "ping timeout"


def test_node_client_recovers_after_a_dropped_link(server_factory, front, need_node):
    """Connection state recovery: the link drops, the room gets 3 events meanwhile; on
    reconnect the socket has its id and rooms back and gets the 3 events, in order."""
    out = scenario("recovery", server_factory(app=APPS[front], env={"SIO_RECOVERY": "1"}))
    assert out["firstRecovered"] is False
    assert out["reasons"][0] == "forced close"
    assert out["recovered"] is True and out["sameId"] is True
    assert out["data"] == ["before", "missed-1", "missed-2", "missed-3", "after"]
    assert len(set(out["offsets"])) == 5
    assert "rec" in out["rooms"]                                     # its room came back


# -- in Chromium ------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>socket.io</title><script src="/socket.io.min.js"></script></head>
<body><pre id="out">running</pre>
<script>
(async () => {
  const post = (obj) => fetch("/result", { method: "POST", body: JSON.stringify(obj) });
  const result = { errors: [] };
  try {
    const s = io(%(url)s, { transports: ["websocket"], auth: { token: "browser" }, reconnection: false });
    await new Promise((ok, fail) => { s.once("connect", ok); s.once("connect_error", fail); });
    result.whoami = await s.timeout(5000).emitWithAck("whoami");
    result.echo = await s.timeout(5000).emitWithAck("echo", [1, "two"]);
    const bytes = new Uint8Array([1, 2, 3, 250]);
    const back = await s.timeout(5000).emitWithAck("binary", { b: bytes });
    result.binary = back.b instanceof ArrayBuffer && Array.from(new Uint8Array(back.b)).join(",") === "1,2,3,250";
    s.on("question", (data, ack) => ack("browser says " + data));
    result.ask = await s.timeout(5000).emitWithAck("ask", { event: "question", data: "hi" });
    const got = [];
    s.on("all_msg", (d) => got.push(d));
    await s.timeout(5000).emitWithAck("to_all", "to everyone");
    const end = Date.now() + 5000;
    while (!got.length && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
    result.all = got;
    s.disconnect();
  } catch (e) { result.errors.push(String(e && e.stack || e)); }
  document.getElementById("out").textContent = JSON.stringify(result);
  post(result);
})();
</script></body></html>
"""


class _Pages(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.page = b""
        self.results: queue.Queue = queue.Queue()
        super().__init__(("127.0.0.1", 0), _PageHandler)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/socket.io.min.js"):
            body, ctype = BUNDLE.read_bytes(), "text/javascript"
        else:
            body, ctype = self.server.page, "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.results.put(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_chromium_socketio_client(server_factory, front, tmp_path, missing_client, need_node):
    if not os.path.exists(CHROMIUM):
        missing_client(f"{CHROMIUM} is not installed (apt-get install chromium)")
    pages = _Pages()
    origin = f"http://127.0.0.1:{pages.server_address[1]}"
    server = server_factory("--allowed-origins", origin, app=APPS[front])
    pages.page = (PAGE % {"url": json.dumps(f"http://{server.host}:{server.port}")}).encode()
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", origin + "/page.html"]
    log_path = tmp_path / "chromium.log"
    with open(log_path, "wb") as log:
        browser = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        try:
            result = pages.results.get(timeout=90)
        except queue.Empty:
            pytest.fail(f"no result from the page within 90s\n{log_path.read_text(errors='replace')[-3000:]}",
                        pytrace=False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGTERM)
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait(5)
        pages.shutdown()
        pages.server_close()
    assert result["errors"] == [], result["errors"]
    assert result["whoami"]["auth"] == {"token": "browser"}
    assert result["echo"] == [1, "two"]
    assert result["binary"] is True
    assert result["ask"] == {"answer": "browser says hi"}
    assert result["all"] == ["to everyone"]


README_CLIENT = """
import { io } from "socket.io-client";
const url = process.argv[2];
const out = {};
const a = io(url, { transports: ["websocket"], auth: { token: "secret" }, reconnection: false });
const b = io(url, { transports: ["websocket"], auth: { token: "secret" }, reconnection: false });
const bad = io(url, { transports: ["websocket"], auth: { token: "nope" }, reconnection: false });
out.refused = await new Promise((r) => {
  bad.once("connect_error", (e) => r(e.message));
  bad.once("connect", () => r("connected"));
});
await Promise.all([a, b].map((s) => new Promise((r) => (s.connected ? r() : s.once("connect", r)))));
const got = { a: [], b: [] };
a.on("chat message", (t) => got.a.push(t));
b.on("chat message", (t) => got.b.push(t));
out.ack = await a.timeout(5000).emitWithAck("chat message", "hi");
const end = Date.now() + 5000;
while (!got.b.length && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
await new Promise((r) => setTimeout(r, 200));
out.got = got;
a.disconnect(); b.disconnect(); bad.close();
console.log(JSON.stringify(out));
process.exit(0);
"""


def test_readme_example(server_factory, tmp_path, need_node):
    """README's Socket.IO example, served by `fastws serve chat:app`, with the README's client calls."""
    (tmp_path / "chat.py").write_text(block("README.md", "sio-readme").text)
    server = server_factory(app="chat:app", env={"PYTHONPATH": str(tmp_path)})
    script = NODE_DIR / "sio_readme.tmp.mjs"
    script.write_text(README_CLIENT)
    try:
        out = subprocess.run(["node", str(script), f"http://{server.host}:{server.port}"], cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=60)
    finally:
        script.unlink()
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["refused"] == "bad token"
    assert res["ack"] == "delivered"
    assert res["got"] == {"a": [], "b": ["hi"]}        # to the lobby, the sender skipped
