"""Cross-site WebSocket hijacking and the operations endpoints' Host guard,
against real ``fastws serve`` processes (both engines; native and ASGI mode).

A browser page on any site can open a WebSocket to any server, and the
browser sends the user's cookies along; only the ``Origin`` header tells the
server which site's page is asking.  fastws's ``allowed_origins`` setting
(default ``same-host``) refuses a browser request from another site with 403
before any application code sees it, lets requests without ``Origin``
(not browsers) through, and ``--ops-hosts`` hides /health, /livez,
/metrics and the publish API from requests for other host names.

Clients: ``websockets`` (``origin=``), ``websocket-client`` (sends a
same-host ``Origin`` by default), raw sockets for exact heads, and one
headless Chromium page on another port (a real cross-site page).
All traffic goes to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest
import websockets

ECHO = "examples.echo:app"
STARLETTE = "examples.starlette_app:app"
CHROMIUM = os.environ.get("FASTWS_CHROMIUM", "/usr/bin/chromium")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
TOKEN = "publish-token-for-tests"
EVIL = "http://evil.example"
CLI = [sys.executable, "-c", "from fastws.cli.main import main; main()"]


@pytest.fixture(params=["native", "asgi"])
def front(request):
    """(application, WebSocket path that echoes): a fastws.App or a Starlette app."""
    return (ECHO, "/") if request.param == "native" else (STARLETTE, "/ws/echo")


# -- helpers -------------------------------------------------------------------------


def raw(server, head: str, body: bytes = b"") -> bytes:
    """Send one request head (+ body), return everything the server answers
    until it closes (bounded: 10 s)."""
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        with contextlib.suppress(socket.timeout):
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 101"):
                    break          # upgraded: the connection stays open
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def upgrade_head(path: str, host: str, origin: str | None = None) -> str:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return "\r\n".join(lines) + "\r\n\r\n"


def http_head(method: str, path: str, host: str | None, extra=()) -> str:
    lines = [f"{method} {path} HTTP/1.1", *([f"Host: {host}"] if host is not None else []),
             "Connection: close", *extra]
    return "\r\n".join(lines) + "\r\n\r\n"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def echo_once(url: str, origin: str | None = None) -> str:
    async with websockets.connect(url, origin=origin, open_timeout=10) as ws:
        await ws.send("ping")
        return await asyncio.wait_for(ws.recv(), 10)


async def refused_status(url: str, origin: str) -> tuple[int, bytes]:
    with pytest.raises(websockets.InvalidStatus) as info:
        await echo_once(url, origin)
    return info.value.response.status_code, info.value.response.body


def handshakes(server, result: str) -> float:
    """websocket_handshakes_total{result=...} from /metrics."""
    resp = raw(server, http_head("GET", "/metrics", f"127.0.0.1:{server.port}"))
    assert status_of(resp) == 200, resp[:200]
    for line in resp.split(b"\r\n\r\n", 1)[1].decode().splitlines():
        if line.startswith(f'websocket_handshakes_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- the default: same-host ------------------------------------------------------------


def test_cross_site_origin_gets_403_by_default(server_factory, front):
    app, path = front
    server = server_factory(app=app)
    url = f"ws://127.0.0.1:{server.port}{path}"
    before = handshakes(server, "403")
    status, body = run(refused_status(url, EVIL))
    assert status == 403 and b"origin not allowed" in body
    # the same host on another port is another site's page
    status, body = run(refused_status(url, f"http://127.0.0.1:{server.port + 1}"))
    assert status == 403 and b"origin not allowed" in body
    # look-alikes and opaque origins
    for origin in (f"http://127.0.0.1:{server.port}.evil.example", "null", f"ftp://127.0.0.1:{server.port}"):
        resp = raw(server, upgrade_head(path, f"127.0.0.1:{server.port}", origin))
        assert status_of(resp) == 403, (origin, resp[:200])
    assert handshakes(server, "403") - before == 5
    # nothing was upgraded for them, and the server still serves
    assert run(echo_once(url)) == "ping"


def test_same_host_origin_passes(server_factory, front):
    app, path = front
    server = server_factory(app=app)
    url = f"ws://127.0.0.1:{server.port}{path}"
    assert run(echo_once(url, f"http://127.0.0.1:{server.port}")) == "ping"
    assert run(echo_once(url, f"https://127.0.0.1:{server.port}")) == "ping"   # a TLS page, same host
    # another name for the host, any case: what matters is the Host asked
    resp = raw(server, upgrade_head(path, f"LocalHost:{server.port}", f"http://localhost:{server.port}"))
    assert status_of(resp) == 101, resp[:200]
    # a page served on the default port, Host without port (as behind a proxy)
    resp = raw(server, upgrade_head(path, "app.example.com", "https://app.example.com"))
    assert status_of(resp) == 101, resp[:200]


def test_no_origin_passes(server_factory, front):
    app, path = front
    server = server_factory(app=app)
    assert run(echo_once(f"ws://127.0.0.1:{server.port}{path}")) == "ping"
    resp = raw(server, upgrade_head(path, "anything.example"))
    assert status_of(resp) == 101, resp[:200]


def test_websocket_client_default_origin_passes(server_factory, front):
    """websocket-client sends ``Origin: http://<host:port>`` of the URL."""
    import websocket

    app, path = front
    server = server_factory(app=app)
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}{path}", timeout=10)
    try:
        ws.send("ping")
        assert ws.recv() == "ping"
    finally:
        ws.close()


# -- "*" and explicit lists ------------------------------------------------------------


def test_star_allows_every_origin(server_factory, front):
    app, path = front
    server = server_factory("--allowed-origins", "*", app=app)
    url = f"ws://127.0.0.1:{server.port}{path}"
    for origin in (EVIL, "null", None, f"http://127.0.0.1:{server.port}"):
        assert run(echo_once(url, origin)) == "ping", origin


@pytest.mark.parametrize("how", ["cli", "env"])
def test_explicit_list(server_factory, front, how):
    app, path = front
    origins = "https://app.example.com, https://*.example.org"
    if how == "cli":
        server = server_factory("--allowed-origins", origins, app=app)
    else:
        server = server_factory(env={"FASTWS_ALLOWED_ORIGINS": origins}, app=app)
    url = f"ws://127.0.0.1:{server.port}{path}"
    for origin in ("https://app.example.com", "https://APP.example.com:443", "https://a.example.org",
                   "https://b.c.example.org", None):
        assert run(echo_once(url, origin)) == "ping", origin
    for origin in ("http://app.example.com", "https://app.example.com:8443", "https://example.org",
                   "https://evil-example.org", EVIL, f"http://127.0.0.1:{server.port}", "null"):
        status, body = run(refused_status(url, origin))
        assert status == 403 and b"origin not allowed" in body, origin


def test_bad_setting_is_one_line_naming_the_key():
    r = subprocess.run([*CLI, "serve", ECHO, "--port", "0", "--allowed-origins", "app.example.com"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "allowed_origins" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([*CLI, "serve", ECHO, "--port", "0", "--ops-hosts", "admin:8080"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "ops_hosts" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- a real browser page on another port ------------------------------------------------

PAGE = """<!doctype html><html><body><script>
const targets = %(targets)s;
function attempt(url) {
  return new Promise((resolve) => {
    let opened = false;
    const ws = new WebSocket(url);
    const timer = setTimeout(() => resolve('timeout'), 15000);
    ws.onopen = () => { opened = true; ws.send('ping'); };
    ws.onmessage = (ev) => { clearTimeout(timer); ws.close(1000); resolve('echo:' + ev.data); };
    ws.onclose = (ev) => { clearTimeout(timer); if (!opened) resolve('refused:' + ev.code); };
  });
}
(async () => {
  const out = {};
  for (const [name, url] of Object.entries(targets)) out[name] = await attempt(url);
  await fetch('/result', {method: 'POST', body: JSON.stringify(out)});
})();
</script></body></html>
"""


class _Pages(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        self.results: queue.Queue = queue.Queue()
        self.targets = {}
        super().__init__(("127.0.0.1", 0), _PageHandler)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (PAGE % {"targets": json.dumps(self.server.targets)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.server.results.put(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_chromium_page_of_another_site(server_factory, tmp_path, missing_client):
    """A page on http://127.0.0.1:<other port> is refused by a default server
    (the browser reports 1006, the server counted a 403) and connects to a
    server that lists its origin."""
    if not os.path.exists(CHROMIUM):
        missing_client(f"{CHROMIUM} is not installed (apt-get install chromium)")
    pages = _Pages()
    page_origin = f"http://127.0.0.1:{pages.server_address[1]}"
    guarded = server_factory()
    listed = server_factory("--allowed-origins", page_origin)
    pages.targets = {"guarded": f"ws://127.0.0.1:{guarded.port}/", "listed": f"ws://127.0.0.1:{listed.port}/"}
    before = handshakes(guarded, "403")
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", page_origin + "/page.html"]
    log_path = tmp_path / "chromium.log"
    with open(log_path, "wb") as log:
        browser = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        try:
            result = json.loads(pages.results.get(timeout=90))
        except queue.Empty:
            pytest.fail(f"no result from the page within 90s (chromium rc={browser.poll()})\n"
                        f"{log_path.read_text(errors='replace')[-4000:]}", pytrace=False)
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
    assert result == {"guarded": "refused:1006", "listed": "echo:ping"}, result
    assert handshakes(guarded, "403") - before == 1


# -- operations endpoints only for the ops hosts ----------------------------------------


OPS = [("GET", "/health"), ("GET", "/livez"), ("GET", "/metrics")]


def test_ops_hosts_hide_endpoints_for_other_hosts(server_factory, front):
    app, path = front
    server = server_factory("--ops-hosts", "admin.internal, localhost", "--broker", "memory://",
                            "--publish-token", TOKEN, app=app)
    port = server.port
    publish = json.dumps({"room": "r", "text": "hi"}).encode()
    pub_extra = (f"Authorization: Bearer {TOKEN}", "Content-Type: application/json",
                 f"Content-Length: {len(publish)}")
    for host in (f"admin.internal:{port}", "ADMIN.internal", f"localhost:{port}"):
        for method, p in OPS:
            resp = raw(server, http_head(method, p, host))
            assert status_of(resp) == 200, (host, p, resp[:200])
        resp = raw(server, http_head("POST", "/publish", host, pub_extra), publish)
        assert status_of(resp) == 200, (host, resp[:300])
    for host in (f"127.0.0.1:{port}", "evil.example", "admin.internal.evil.example", "internal", None):
        for method, p in OPS:
            resp = raw(server, http_head(method, p, host))
            assert status_of(resp) == 404, (host, p, resp[:200])
            assert b"websocket_" not in resp and b'"status"' not in resp
        resp = raw(server, http_head("POST", "/publish", host, pub_extra), publish)
        assert status_of(resp) == 404, (host, resp[:300])
        resp = raw(server, http_head("POST", "/connections/x:1", host, pub_extra), publish)
        assert status_of(resp) == 404 and b"no such connection" not in resp, (host, resp[:300])
    # the WebSocket side is not an operations endpoint: any Host
    resp = raw(server, upgrade_head(path, f"127.0.0.1:{port}"))
    assert status_of(resp) == 101, resp[:200]
    assert run(echo_once(f"ws://127.0.0.1:{port}{path}")) == "ping"


def test_without_ops_hosts_any_host_gets_the_endpoints(server_factory, front):
    app, _ = front
    server = server_factory(app=app)
    for host in ("evil.example", f"127.0.0.1:{server.port}", None):
        for method, p in OPS:
            resp = raw(server, http_head(method, p, host))
            assert status_of(resp) == 200, (host, p, resp[:200])
