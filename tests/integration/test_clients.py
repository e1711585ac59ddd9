"""Real clients written by others against a real ``fastws serve examples.echo:app``.

Clients: ``websockets`` (asyncio), ``aiohttp`` (ClientSession.ws_connect),
``websocket-client`` (sync), Node ``ws`` (tests/integration/node/client.js)
and headless Chromium (a page that opens a WebSocket, echoes text and binary,
closes, and POSTs its findings to a local HTTP server run by the test).

Each client: text and binary echo of 0, 1, 125, 126, 127, 65535, 65536 and
1 MiB (exactly the default limit) bytes, a clean close with 1000 where the
close code the client sees is checked, and (most clients) a 1 MiB + 1 byte
message answered by a close with 1009. The clients that can negotiate
permessage-deflate also run against ``--compression``.

Every test runs on both engines (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

LIMIT = 1 << 20  # the default --max-message-size
SIZES = [0, 1, 125, 126, 127, 65535, 65536, LIMIT]
UNICODE = "h\u00e9llo \u2603 \U0001f600 \u4e16\u754c"
NODE_DIR = Path(__file__).with_name("node")
CHROMIUM = os.environ.get("FASTWS_CHROMIUM", "/usr/bin/chromium")
RECV_TIMEOUT = 15
CLOSE_TIMEOUT = 5


def text_of(n: int) -> str:
    unit = "abcdefghijklmnopqrstuvwxyz0123456789"
    return (unit * (n // len(unit) + 1))[:n]


def binary_of(n: int) -> bytes:
    return bytes((i * 31 + 7) & 0xFF for i in range(256)) * (n // 256) + bytes(
        (i * 31 + 7) & 0xFF for i in range(n % 256)
    )


def messages():
    """(label, message) pairs: str for text, bytes for binary."""
    out = [(f"text-{n}", text_of(n)) for n in SIZES]
    out.append(("text-unicode", UNICODE))
    out += [(f"binary-{n}", binary_of(n)) for n in SIZES]
    return out


@pytest.fixture(params=["plain", "compression"])
def compression(request) -> bool:
    return request.param == "compression"


@pytest.fixture
def server(server_factory, compression):
    return server_factory("--compression") if compression else server_factory()


def describe(message) -> str:
    kind = "text" if isinstance(message, str) else "binary"
    return f"{kind} message of {len(message)} chars/bytes"


# -- websockets -------------------------------------------------------------


def test_websockets_client(server, compression):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    async def main():
        async with connect(
            server.url,
            max_size=None,
            compression="deflate",  # always offered; the server decides
            open_timeout=10,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=None,
        ) as ws:
            ext = ws.response.headers.get("Sec-WebSocket-Extensions")
            if compression:
                assert ext and "permessage-deflate" in ext, ext
            else:
                assert ext is None, f"compression is off, server answered {ext!r}"
            for label, message in messages():
                await ws.send(message)
                got = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
                assert type(got) is type(message), f"{label}: got {type(got)}"
                assert got == message, f"{label}: echo differs"
            t0 = time.monotonic()
            await ws.close(1000, "bye")
            elapsed = time.monotonic() - t0
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1000
        assert ws.protocol.close_rcvd is not None, "no close frame from the server"
        assert ws.protocol.close_rcvd.code == 1000
        # the server closes TCP right after the close exchange (no timeout)
        assert elapsed < CLOSE_TIMEOUT - 1, f"close took {elapsed:.1f}s"

        # one byte over the limit: the server closes with 1009
        async with connect(server.url, max_size=None, open_timeout=10,
                           close_timeout=CLOSE_TIMEOUT, ping_interval=None) as ws:
            with contextlib.suppress(ConnectionClosedError):
                await ws.send(b"x" * (LIMIT + 1))
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
        assert ws.protocol.close_rcvd is not None, (
            "the client saw no close frame after a too-big message "
            "(connection dropped/reset instead of close 1009)"
        )
        assert ws.protocol.close_rcvd.code == 1009

    asyncio.run(main())


# -- aiohttp ----------------------------------------------------------------


def test_aiohttp_client(server, compression):
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                server.url,
                max_msg_size=0,
                compress=15 if compression else 0,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
            ) as ws:
                if compression:
                    assert ws.compress, "permessage-deflate offered but not negotiated"
                for label, message in messages():
                    if isinstance(message, str):
                        await ws.send_str(message)
                        want = aiohttp.WSMsgType.TEXT
                    else:
                        await ws.send_bytes(message)
                        want = aiohttp.WSMsgType.BINARY
                    msg = await ws.receive(timeout=RECV_TIMEOUT)
                    assert msg.type == want, f"{label}: got {msg.type} {msg.data!r:.100}"
                    assert msg.data == message, f"{label}: echo differs"
                assert await ws.close(code=1000, message=b"bye")
                assert ws.close_code == 1000, f"server's close code {ws.close_code}"

            async with session.ws_connect(server.url, max_msg_size=0) as ws:
                with contextlib.suppress(ConnectionError):
                    await ws.send_bytes(b"x" * (LIMIT + 1))
                msg = await ws.receive(timeout=RECV_TIMEOUT)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg
                # aiohttp answers the close; a server that has already reset the
                # connection turns that into 1006 here (see the lingering test
                # in test_wire.py)
                assert ws.close_code == 1009, (
                    f"aiohttp saw close 1009 but ended with {ws.close_code}: the "
                    "server reset the connection before the client's close reply"
                )

    asyncio.run(main())


# -- websocket-client -------------------------------------------------------


def _wsc_recv_close(ws) -> int:
    import websocket

    deadline = time.monotonic() + RECV_TIMEOUT
    while time.monotonic() < deadline:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            assert len(frame.data) >= 2, f"close frame without a code: {frame.data!r}"
            return struct.unpack("!H", frame.data[:2])[0]
    raise AssertionError("no close frame")


def test_websocket_client(echo_server):
    import websocket

    ws = websocket.create_connection(
        echo_server.url, timeout=RECV_TIMEOUT, skip_utf8_validation=True
    )
    try:
        for label, message in messages():
            if isinstance(message, str):
                ws.send(message)
                want_op, want = websocket.ABNF.OPCODE_TEXT, message.encode()
            else:
                ws.send_binary(message)
                want_op, want = websocket.ABNF.OPCODE_BINARY, message
            opcode, data = ws.recv_data()
            if isinstance(data, str):
                data = data.encode()
            assert opcode == want_op, f"{label}: opcode {opcode}"
            assert data == want, f"{label}: echo differs"
        ws.send_close(1000, b"bye")
        assert _wsc_recv_close(ws) == 1000
        ws.sock.settimeout(CLOSE_TIMEOUT)
        assert ws.sock.recv(1) == b"", "server did not close TCP after the close exchange"
    finally:
        ws.shutdown()

    ws = websocket.create_connection(echo_server.url, timeout=RECV_TIMEOUT)
    try:
        with contextlib.suppress(OSError):
            ws.send_binary(b"x" * (LIMIT + 1))
        assert _wsc_recv_close(ws) == 1009
    finally:
        ws.shutdown()


# -- Node ws ----------------------------------------------------------------


def test_node_ws_client(server, compression, missing_client):
    node = shutil.which("node")
    if node is None:
        missing_client("node is not installed")
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        missing_client(f"Node ws is not installed: run `npm ci` in {NODE_DIR}")
    proc = subprocess.run(
        [node, "client.js", server.url, "--too-big", str(LIMIT + 1)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.stdout.strip(), f"no output; rc={proc.returncode} stderr:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [], result
    assert result["ok"] and proc.returncode == 0, (result, proc.stderr)
    assert result["roundTrips"] == 2 * len(SIZES) + 1
    assert result["closeCode"] == 1000
    assert result["tooBigCloseCode"] == 1009, result
    if compression:  # ws offers permessage-deflate by default
        assert "permessage-deflate" in result["extensions"], result
    else:
        assert result["extensions"] == "", result


# -- headless Chromium ------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fastws</title></head>
<body><pre id="out">running</pre>
<script>
const params = new URLSearchParams(location.search);
const wsUrl = params.get('ws');
const tooBig = parseInt(params.get('toobig') || '0', 10);
const SIZES = %(sizes)s;
const UNICODE = %(unicode)s;
const errors = [];
const result = {errors, roundTrips: 0, closeCode: null, wasClean: null,
                tooBigCloseCode: null, extensions: null};

function textOf(n) {
  const unit = 'abcdefghijklmnopqrstuvwxyz0123456789';
  return unit.repeat(Math.ceil(n / unit.length) + 1).slice(0, n);
}
function binaryOf(n) {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}
function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error('websocket error before open'));
  });
}
function next(ws) {
  return new Promise((resolve, reject) => {
    ws.onmessage = (ev) => { ws.onmessage = null; resolve(ev.data); };
    ws.onclose = (ev) => reject(new Error('closed ' + ev.code));
  });
}
function closed(ws) {
  return new Promise((resolve) => { ws.onclose = (ev) => resolve(ev); });
}
async function run() {
  const ws = await open(wsUrl);
  result.extensions = ws.extensions;
  const texts = SIZES.map(textOf); texts.push(UNICODE);
  for (const t of texts) {
    ws.send(t);
    const got = await next(ws);
    if (typeof got !== 'string') errors.push('text ' + t.length + ': not a string');
    else if (got !== t) errors.push('text ' + t.length + ': echo differs');
    else result.roundTrips++;
  }
  for (const n of SIZES) {
    const b = binaryOf(n);
    ws.send(b);
    const got = await next(ws);
    if (!(got instanceof ArrayBuffer)) errors.push('binary ' + n + ': not binary');
    else if (!equalBytes(new Uint8Array(got), b))
      errors.push('binary ' + n + ': echo differs (' + got.byteLength + ' bytes)');
    else result.roundTrips++;
  }
  const done = closed(ws);
  ws.close(1000, 'bye');
  const ev = await done;
  result.closeCode = ev.code; result.wasClean = ev.wasClean;
  if (tooBig > 0) {
    const ws2 = await open(wsUrl);
    const done2 = closed(ws2);
    ws2.send(binaryOf(tooBig));
    const ev2 = await done2;
    result.tooBigCloseCode = ev2.code;
  }
}
run().catch((e) => errors.push(String(e && e.stack || e))).finally(() => {
  document.getElementById('out').textContent = JSON.stringify(result);
  fetch('/result', {method: 'POST', body: JSON.stringify(result)});
});
</script></body></html>
"""


class _PageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        self.results: queue.Queue = queue.Queue()
        super().__init__(("127.0.0.1", 0), _PageHandler)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if not self.path.startswith("/page.html"):
            self.send_error(404)
            return
        body = (PAGE % {"sizes": json.dumps(SIZES), "unicode": json.dumps(UNICODE)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        self.server.results.put(self.rfile.read(length))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_chromium(server_factory, compression, tmp_path, missing_client):
    if not os.path.exists(CHROMIUM):
        missing_client(f"{CHROMIUM} is not installed (apt-get install chromium)")
    pages = _PageServer()
    # the page comes from another port, so another origin: the server lists it
    # (the default, same-host, refuses it; see test_attack_origin.py)
    server = server_factory(*(["--compression"] if compression else []),
                            "--allowed-origins", f"http://127.0.0.1:{pages.server_address[1]}")
    thread = threading.Thread(target=pages.serve_forever, daemon=True)
    thread.start()
    page_url = (
        f"http://127.0.0.1:{pages.server_address[1]}/page.html"
        f"?ws={quote(server.url, safe='')}&toobig={LIMIT + 1}"
    )
    log_path = tmp_path / "chromium.log"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}",
        page_url,
    ]
    with open(log_path, "wb") as log:
        browser = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            raw = pages.results.get(timeout=90)
        except queue.Empty:
            pytest.fail(
                f"no result from the browser page within 90s (chromium rc="
                f"{browser.poll()})\n--- chromium log ---\n"
                f"{log_path.read_text(errors='replace')[-4000:]}",
                pytrace=False,
            )
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
    result = json.loads(raw)
    assert result["errors"] == [], result
    assert result["roundTrips"] == 2 * len(SIZES) + 1, result
    assert result["closeCode"] == 1000, result
    assert result["wasClean"] is True, result
    assert result["tooBigCloseCode"] == 1009, result
    if compression:  # Chromium always offers permessage-deflate
        assert "permessage-deflate" in result["extensions"], result
    else:
        assert result["extensions"] == "", result
