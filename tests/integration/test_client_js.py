"""fastws.js, the browser client: served by the server, built for npm, run in Node and in headless Chromium.

* ``--serve-client-js`` serves ``/fastws.js`` (the ES module, byte for byte
  ``fastws/client/fastws.js``) and ``/fastws.global.js`` (the plain script),
  for a fastws.App and for an ASGI app alike;
  without it neither is served; ``clients/js/build.mjs`` (the npm package's
  build) writes the same two files;
* in Node (with the ``ws`` package as its WebSocket): the room protocol and
  its error codes, resume across a SIGKILLed node without gap or duplicate,
  a trimmed history reported, shuffled messages put in order, a refusing
  server not retried in a storm, the first retries of 200 clients spread
  by full jitter, the server's reconnect hint waited, the bounded send queue;
* in headless Chromium, a page that imports ``/fastws.js`` from the server
  (and loads ``/fastws.global.js``) resumes a room across a SIGKILLed node:
  every message once, in order.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from brokerutil import STREAMS_URL, need_redis, new_prefix
from client_helpers import NODE_DIR, Node, build_js, nodes
from conftest import REPO, free_port

CHROMIUM = os.environ.get("FASTWS_CHROMIUM", "/usr/bin/chromium")
ECHO = "examples.echo:app"


@pytest.fixture(scope="module")
def js(tmp_path_factory) -> str:
    """The npm package's build of fastws.js (an ES module in a directory of type module)."""
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        pytest.fail("tests/integration/node needs `npm install` (bash .ci/run does it)", pytrace=False)
    return str(build_js(tmp_path_factory.mktemp("fastws-js")))


class Scenario:
    """``node client_scenarios.mjs NAME`` running, its JSON lines read as they come."""

    def __init__(self, name: str, js: str, **config) -> None:
        self.proc = subprocess.Popen(["node", "client_scenarios.mjs", name, js, json.dumps(config)], cwd=NODE_DIR,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.events: queue.Queue = queue.Queue()
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))

    def wait(self, event: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.01, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty() or time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"no {event!r} from node (rc {self.proc.returncode}): "
                                         f"{self.proc.stderr.read()[-3000:]}") from None
                continue
            if ev["event"] == event:
                return ev

    def tell(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def http_get(url: str):
    """(status, headers (case-insensitive), body)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


# -- served and built -----------------------------------------------------------------------------


def test_the_server_serves_the_client_when_asked(engine, tmp_path, js):
    source = (REPO / "fastws" / "client" / "fastws.js").read_bytes()
    built = (REPO / "fastws" / "client" / "fastws.js").parent
    with nodes() as ns:
        on = Node(engine, tmp_path, "--serve-client-js", name="on")
        off = Node(engine, tmp_path, name="off")
        asgi = Node(engine, tmp_path, "--serve-client-js", app="examples.starlette_app:app", name="asgi")
        ns += [on.start(), off.start(), asgi.start()]
        for node in (on, asgi):                       # both fronts serve it
            status, headers, body = http_get(node.http + "/fastws.js")
            assert status == 200 and body == source
            assert headers["Content-Type"].startswith("text/javascript")
        status, _, script = http_get(on.http + "/fastws.global.js")
        with open(os.path.join(os.path.dirname(js), "fastws.global.js"), "rb") as f:
            assert status == 200 and script == f.read()
        with open(js, "rb") as f:
            assert f.read() == source
        for path in ("/fastws.js", "/fastws.global.js"):   # not served (a plain GET is no upgrade)
            status, _, body = http_get(off.http + path)
            assert status in (400, 404) and b"globalThis" not in body
    # the plain script defines the global in a fresh Node context
    out = subprocess.run(["node", "-e", "require(process.argv[1]); console.log(Object.keys(globalThis.fastws).join())",
                          os.path.join(os.path.dirname(js), "fastws.global.js")], capture_output=True, text=True,
                         timeout=30, cwd=built)
    assert out.returncode == 0, out.stderr
    assert {"connect", "RoomClient", "Backoff"} <= set(out.stdout.strip().split(","))
    package = json.loads((REPO / "clients" / "js" / "package.json").read_text())
    assert package["type"] == "module" and set(package["files"]) >= {"fastws.js", "fastws.global.js"}


# -- in Node ---------------------------------------------------------------------------------------------


def test_node_room_protocol(engine, tmp_path, js):
    with nodes() as ns:
        node = Node(engine, tmp_path)
        ns.append(node.start())
        with Scenario("basic", js, url=node.url) as s:
            done = s.wait("done")
    assert done["protocol"] == "fastws.rooms.v1"
    assert (done["recovered"], done["history"]) == (True, False)
    assert done["acks"] == [1, 2]
    assert done["gotA"] == [[1, "one"], [2, [0, 255, 7]]]
    assert done["gotB"] == 3
    assert done["codes"] == ["denied", "denied", "room_name", "rate_limited"]
    assert done["rtt"] < 1.0


def test_node_resume_across_nodes_without_gap_or_duplicate(engine, tmp_path, js):
    need_redis()
    n = 300
    prefix = new_prefix("js-resume-")
    args = ["--broker", STREAMS_URL, "--broker-prefix", prefix]
    with nodes() as ns:
        a = Node(engine, tmp_path, *args, name="a")
        b = Node(engine, tmp_path, *args, name="b")
        ns += [a.start(), b.start()]
        with Scenario("resume", js, urls=[a.url, b.url], room="r", n=n, killAfter=80) as s:
            first = s.wait("subscribed")
            mine = a if first["url"].startswith(a.url) else b
            other = b if mine is a else a
            assert first["history"] is True
            for i in range(0, n, 10):
                other.get(f"/publish?room=r&text=n{i // 10}&count=10")
                if i == 100:                       # the client has 80 by now: kill its node mid-stream
                    s.wait("progress", timeout=30)
                    mine.kill()
                time.sleep(0.01)
            done = s.wait("done", timeout=60)
    expected = [f"n{i}#{j}" for i in range(n // 10) for j in range(10)]
    assert done["data"] == expected
    ids = [tuple(map(int, x.split("-"))) for x in done["ids"]]
    assert ids == sorted(ids) and len(set(ids)) == n
    assert done["connections"] == 2 and done["url"].startswith(other.url)
    assert done["gaps"] == 0 and done["recovered"] is True


def test_node_trimmed_history_is_reported(engine, tmp_path, js):
    need_redis()
    prefix = new_prefix("js-trim-")
    args = ["--broker", STREAMS_URL + "?maxlen=20", "--broker-prefix", prefix]
    with nodes() as ns:
        a = Node(engine, tmp_path, *args, name="a")
        b = Node(engine, tmp_path, *args, name="b")
        ns += [a.start(), b.start()]
        with Scenario("gap", js, url=a.url, room="t") as s:
            s.wait("subscribed")
            b.get("/publish?room=t&text=before")
            ready = s.wait("ready")
            a.kill()
            b.get("/publish?room=t&text=missed&count=500")
            a.start()
            gap = s.wait("gap", timeout=30)
            b.get("/publish?room=t&text=live")
            done = s.wait("done", timeout=30)
    assert gap["info"]["since"] == ready["position"] and gap["info"]["room"] == "t"
    assert done["recovered"] is False and len(done["gaps"]) == 1
    replayed = done["data"][1:-1]
    assert done["data"][0] == "before" and done["data"][-1] == "live"
    assert replayed and replayed[-1] == "missed#499" and "missed#0" not in replayed


def test_node_reorder_buffer(engine, tmp_path, js):
    with nodes() as ns:
        node = Node(engine, tmp_path)
        ns.append(node.start())
        with Scenario("order", js, url=node.url) as s:
            done = s.wait("done")
    assert done["got"] == list(range(1, 301))
    assert done["got2"] == [i for i in range(1, 51) if i != 20]
    assert len(done["gaps"]) == 1 and done["gaps"][0][1] == 1 and 0.3 <= done["gaps"][0][0] < 2.0


def test_node_dropped_messages_are_reported_with_their_count(engine, tmp_path, js):
    """No history: the server drops messages for a client that does not
    read; once it reads again, its gaps (in the middle: by seq; at the end:
    by the periodic sync) add up to exactly what the server dropped."""
    with nodes() as ns:
        node = Node(engine, tmp_path, "--high-water", "16KiB", "--max-queue", "4MiB", "--slow-grace", "60")
        ns.append(node.start())

        def dropped() -> float:
            for line in node.metrics().splitlines():
                if line.startswith("websocket_dropped_messages_total") and 'priority="normal"' in line:
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        with Scenario("drops", js, url=node.url, room="flood") as s:
            s.wait("paused")
            before, sent = dropped(), 0
            while sent < 30000 and dropped() == before:
                node.get("/publish?room=flood&text=x&count=200&size=2000")
                sent += 200
                time.sleep(0.05)
            lost = int(dropped() - before)
            assert lost > 0
            s.tell(f"resume {sent}")
            done = s.wait("done", timeout=60)
    assert len(done["got"]) + lost == sent and sum(done["gaps"]) == lost
    assert done["got"] == sorted(done["got"]) and len(set(done["got"])) == len(done["got"])


def test_node_refusing_server_is_not_stormed(engine, tmp_path, js):
    with nodes() as ns:
        node = Node(engine, tmp_path)
        ns.append(node.start())
        with Scenario("refused", js, url=node.url + "/rt-auth?token=bad") as s:
            done = s.wait("done")
    assert (done["name"], done["status"], done["connections"]) == ("GaveUp", 401, 0)
    delays = done["delays"]
    assert 3 <= len(delays) <= 4, delays
    for i, d in enumerate(delays):
        assert 0.5 * 2 ** i / 2 <= d <= 0.5 * 2 ** i, delays


def test_node_first_retries_spread_by_full_jitter(engine, tmp_path, js):
    n, base = 200, 1.0
    with nodes() as ns:
        node = Node(engine, tmp_path, app=ECHO)
        ns.append(node.start())
        with Scenario("jitter", js, url=node.url + "/e", n=n, base=base) as s:
            s.wait("connected")
            node.kill()
            done = s.wait("done")
    firsts = done["firsts"]
    assert all(0 <= d <= base for d in firsts) and len(set(firsts)) == n
    quarters = [sum(1 for d in firsts if q / 4 <= d / base < (q + 1) / 4) for q in range(4)]
    assert all(20 <= c <= 80 for c in quarters), quarters
    assert 0.2 * base < statistics.pstdev(firsts) < 0.4 * base


def test_node_the_fastest_handshake_of_several_urls_wins(engine, tmp_path, js):
    """Three URLs, one of them dead: the handshakes race, the first open
    socket is kept (each live URL's handshake time is measured, the dead one
    is not); when that server dies the client goes to the other live one."""
    with nodes() as ns:
        a = Node(engine, tmp_path, app=ECHO, name="a")
        b = Node(engine, tmp_path, app=ECHO, name="b")
        ns += [a.start(), b.start()]
        dead = f"ws://127.0.0.1:{free_port()}"
        with Scenario("regions", js, urls=[a.url, b.url], dead=dead) as s:
            first = s.wait("connected")
            mine = a if first["url"].startswith(a.url) else b
            other = b if mine is a else a
            rtts = first["rtts"]
            assert rtts[mine.url + "/e"] is not None and 0 <= rtts[mine.url + "/e"] < 1.0, rtts
            assert rtts.get(dead + "/e") is None            # Infinity: never opened (JSON null)
            mine.kill()
            done = s.wait("done", timeout=30)
    assert done["url"].startswith(other.url) and done["got"] == ["after the failover"]
    assert done["connections"] == 2


def test_node_reconnect_hint_and_send_queue(engine, tmp_path, js):
    with nodes() as ns:
        node = Node(engine, tmp_path, "--reconnect-delay", "1.5", app=ECHO)
        ns.append(node.start())
        with Scenario("hint", js, url=node.url + "/e") as s:
            s.wait("connected")
            node.stop()
            node.start()
            done = s.wait("done", timeout=30)
        assert done["lastClose"]["code"] == 1001
        hint = float(done["lastClose"]["reason"].split("reconnect in ")[1].rstrip("s"))
        assert 1.5 <= hint <= 3.05 and done["delays"][0] == hint and done["waited"] >= hint - 0.05

        with Scenario("queue", js, url=node.url + "/e") as s:
            s.wait("connected")
            node.kill()
            queued = s.wait("queued")
            node.start()
            done = s.wait("done", timeout=30)
    assert (queued["queued"], queued["dropped"], queued["thrown"]) == (3, 2, "SendQueueFull")
    assert done["got"] == ["m2", "m3", "m4"]


# -- in Chromium ------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fastws.js</title>
<script src="%(base)s/fastws.global.js"></script></head>
<body><pre id="out">running</pre>
<script type="module">
import { RoomClient, SUBPROTOCOL } from "%(base)s/fastws.js";
const post = (path, obj) => fetch(path, { method: "POST", body: JSON.stringify(obj) });
const result = { errors: [],
                 global: typeof window.fastws === "object" && typeof window.fastws.RoomClient === "function",
                 sameClass: window.fastws && window.fastws.SUBPROTOCOL === SUBPROTOCOL };
try {
  const got = [];
  const rt = new RoomClient(%(urls)s, { base: 0.05, cap: 0.2 });
  await rt.ready();
  const sub = await rt.subscribe("web", (m) => {
    got.push(m);
    if (got.length === %(kill_after)d) post("/event", { event: "progress", url: rt.client.url });
  });
  await post("/event", { event: "subscribed", url: rt.client.url, history: sub.history });
  const end = Date.now() + 60000;
  while (got.length < %(n)d && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 300));
  Object.assign(result, { data: got.map((m) => m.data), ids: got.map((m) => m.id), connections: rt.client.connections,
                          url: rt.client.url, gaps: sub.gaps, recovered: sub.recovered, protocol: SUBPROTOCOL });
  rt.close();
} catch (e) { result.errors.push(String(e && e.stack || e)); }
document.getElementById("out").textContent = JSON.stringify(result);
post("/event", Object.assign({ event: "done" }, result));
</script></body></html>
"""


class _Pages(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, page: str) -> None:
        self.page = page.encode()
        self.events: queue.Queue = queue.Queue()
        super().__init__(("127.0.0.1", 0), _PageHandler)

    def wait(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if ev["event"] == event:
                return ev
        raise AssertionError(f"no {event!r} from the page within {timeout}s")


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.server.page)))
        self.end_headers()
        self.wfile.write(self.server.page)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.events.put(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_chromium_resumes_across_nodes(engine, tmp_path, missing_client):
    if not os.path.exists(CHROMIUM):
        missing_client(f"{CHROMIUM} is not installed (apt-get install chromium)")
    need_redis()
    n, kill_after = 200, 60
    prefix = new_prefix("chromium-")
    pages = _Pages("")
    origin = f"http://127.0.0.1:{pages.server_address[1]}"
    args = ["--broker", STREAMS_URL, "--broker-prefix", prefix, "--serve-client-js", "--allowed-origins", origin]
    with nodes() as ns:
        a = Node(engine, tmp_path, *args, name="a")
        b = Node(engine, tmp_path, *args, name="b")
        ns += [a.start(), b.start()]
        pages.page = (PAGE % {"base": a.http, "urls": json.dumps([a.url + "/rt", b.url + "/rt"]), "n": n,
                              "kill_after": kill_after}).encode()
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
                first = pages.wait("subscribed", 60)
            except AssertionError:
                pytest.fail(f"the page did not subscribe\n{log_path.read_text(errors='replace')[-3000:]}",
                            pytrace=False)
            mine = a if first["url"].startswith(a.url) else b
            other = b if mine is a else a
            assert first["history"] is True
            for i in range(0, n, 10):
                other.get(f"/publish?room=web&text=w{i // 10}&count=10")
                if i == 100:
                    pages.wait("progress", 30)
                    mine.kill()
                time.sleep(0.02)
            done = pages.wait("done", 90)
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
    assert done["errors"] == [], done["errors"]
    assert done["global"] is True and done["sameClass"] is True
    assert done["data"] == [f"w{i}#{j}" for i in range(n // 10) for j in range(10)]
    ids = [tuple(map(int, x.split("-"))) for x in done["ids"]]
    assert ids == sorted(ids) and len(set(ids)) == n
    assert done["connections"] == 2 and done["url"].startswith(other.url)
    assert done["gaps"] == 0 and done["recovered"] is True
