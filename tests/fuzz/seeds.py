"""Write the seed inputs of every fuzz target into ``tests/fuzz/corpus/<target>/seed-*``.

Run from the repository root::

    python -m tests.fuzz.seeds            # the built seeds (deterministic)
    python -m tests.fuzz.seeds --capture  # also record real clients (below)

Built seeds: frames of every kind (text, binary, fragmented with control
frames between, pings, pongs, close frames with valid and invalid codes and
reasons, malformed headers, bad UTF-8, limits), compressed messages
(fragmented, without context takeover, small windows, corrupted), the
attacks of ``tests/integration/test_attack_compression.py`` scaled down
(a compressed frame declaring 4 GiB, endless empty deflate fragments, zip
bombs); upgrade requests (plain, with extensions and subprotocols, the
requests of the unit tests, the odd ones that go to wsproto); publish API
bodies (JSON, base64, raw text and binary, the broken ones); broker wire
layouts (envelopes, ROOM/DIRECT/REPLY payloads, link frame bodies, stream
entry ids).

``--capture`` runs a small capturing server on 127.0.0.1 and connects to it
with real clients (``websockets``, ``aiohttp``, ``websocket-client``, Node's
``ws`` and headless Chromium when they are installed): each sends a few
messages and closes; the server answers the upgrade with
``fastws.handshake`` and reads the frames with the wsproto engine.  Each
client's request head becomes an ``upgrade`` seed (``seed-client-<name>``)
and its frames, with the deflate parameters it negotiated, a ``frames``
seed.  Without ``--capture`` the recorded seeds already in the corpus are
kept as they are.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

from fastws import core
from fastws.core import BINARY, CLOSE, CONT, PING, PONG, TEXT, DeflateParams
from tests.fuzz import frames
from tests.fuzz._harness import CORPUS, ROOT
from tests.unit.conftest import RSV1, RSV2, RSV3, Wire
from tests.unit.test_differential import Client
from tests.unit.test_fast_upgrade import PLAIN, head_of

W = Wire
LIMIT = 1 << 20
DEFLATE = DeflateParams()


def close_payload(code, reason=b""):
    return W.close_payload(code, reason)


def compressed(message, params=DEFLATE, compressor=None):
    """``message`` as the client compresses it for ``params``."""
    if compressor is None:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -params.client_max_window_bits)
    return W.deflate(message, compressor)


def client_messages(params, items):
    """``items`` (descriptions as tests/unit/test_differential.py draws
    them) as the bytes a compressing client sends."""
    client = Client(W, params)
    return b"".join(client.encode(item) for item in items)


def message(opcode, data, cuts=(), between=None, compress=True, corrupt=None):
    return {"kind": "message", "opcode": opcode, "data": data, "cuts": list(cuts),
            "between": list(between or [None] * len(cuts)), "compress": compress, "corrupt": corrupt}


def bomb(inflated: int) -> bytes:
    """Raw deflate data inflating to ``inflated`` zero bytes (RFC 7692 form)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (comp.compress(bytes(inflated)) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]


def frames_seeds() -> dict:
    """name -> input of the ``frames`` target."""
    plain = {"max_message_size": LIMIT}
    small = {"max_message_size": 64, "max_frame_size": 40}
    text = "hello, wörld 🌍"
    seeds = {}

    def add(name, stream, config=plain, **kw):
        seeds[name] = frames.encode(config, stream, **kw)

    # well-formed traffic
    add("text", W.frame(TEXT, text))
    add("binary", W.frame(BINARY, bytes(range(256))))
    add("empty-messages", W.frame(TEXT, b"") + W.frame(BINARY, b""))
    add("text-126", W.frame(TEXT, "x" * 126), chunking=3)
    add("binary-65536", W.frame(BINARY, bytes(65536))[:4096], split=0)        # truncated in the payload
    add("fragmented-text", W.fragments(TEXT, text * 3, [1, 5, 9]), chunking=1)
    add("fragmented-with-controls",
        W.frame(TEXT, "abc", fin=False) + W.frame(PING, b"p1") + W.frame(CONT, "def", fin=False)
        + W.frame(PONG, b"") + W.frame(CONT, "ghi") + W.frame(BINARY, b"\x00\x01"), chunking=5)
    add("utf8-split-across-fragments", W.frame(TEXT, b"\xf0\x9f", fin=False) + W.frame(CONT, b"\x8c\x8d"))
    add("ping-pong", W.frame(PING, b"") + W.frame(PING, b"x" * 125) + W.frame(PONG, b"unsolicited"))
    add("close-normal", W.frame(TEXT, "bye") + W.frame(CLOSE, close_payload(1000, "done")) + W.frame(TEXT, "late"))
    add("close-empty", W.frame(CLOSE, b""))
    for code in (1001, 1014, 3000, 4999):
        add(f"close-{code}", W.frame(CLOSE, close_payload(code, "é" * 40)))
    # server actions between the segments
    for i, action in enumerate(frames.ACTIONS[1:], 1):
        add(f"action-{i}", W.frame(TEXT, "one") + W.frame(PING, b"?") + W.frame(CLOSE, close_payload(1000)),
            action=action, split=100)
    add("action-close-then-ping-answered", W.frame(PING, b"after our close") + W.frame(CLOSE, b""),
        action=frames.ACTIONS[1], split=0)
    # protocol errors
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
        add(f"close-invalid-{code}", W.frame(CLOSE, close_payload(code)))
    add("close-one-byte", W.frame(CLOSE, b"\x03"))
    add("close-bad-reason", W.frame(CLOSE, close_payload(1000, b"\xff\xfe")))
    add("ping-126", W.frame(PING, b"x" * 126))
    add("ping-fragmented", W.frame(PING, b"x", fin=False))
    for op in (3, 7, 0xB, 0xF):
        add(f"opcode-{op}", W.frame(op, b"abc"))
    add("rsv1-without-deflate", W.frame(TEXT, "x", rsv=RSV1))
    add("rsv2-rsv3", W.frame(BINARY, b"x", rsv=RSV2) + W.frame(BINARY, b"x", rsv=RSV3))
    add("unmasked", W.frame(TEXT, "x", mask=None))
    add("length-16-non-minimal", W.frame(TEXT, "short", length_bits=16))
    add("length-64-non-minimal", W.frame(BINARY, b"y" * 200, length_bits=64))
    add("length-64-top-bit", W.header(BINARY, 1 << 63) + b"zzzz")
    add("stray-continuation", W.frame(CONT, "x"))
    add("text-inside-fragmented", W.frame(TEXT, "a", fin=False) + W.frame(TEXT, "b"))
    add("bad-utf8-overlong", W.frame(TEXT, b"ok \xc0\x80"))
    add("bad-utf8-surrogate", W.frame(TEXT, b"\xed\xa0\x80"), chunking=1)
    add("bad-utf8-cut-short", W.frame(TEXT, b"abc\xe2\x82"))
    add("bad-utf8-in-fragment", W.frame(TEXT, b"abc", fin=False) + W.frame(CONT, b"\xff"))
    add("garbage", bytes(range(255, 200, -1)))
    # limits
    add("frame-over-max-frame-size", W.frame(BINARY, b"x" * 41), small)
    add("message-at-limit", W.fragments(BINARY, b"m" * 64, [30, 30]), small)
    add("message-over-limit-in-fragments", W.fragments(BINARY, b"m" * 65, [30, 30]), small)
    add("declared-1tib", W.header(BINARY, 1 << 40) + b"x" * 100, {"max_message_size": 65536})
    add("declared-70000-unlimited", W.header(BINARY, 70000) + b"x" * 1000, {"max_message_size": 0})
    # permessage-deflate
    deflate = dict(plain, deflate=DEFLATE)
    add("deflate-text", client_messages(DEFLATE, [message(TEXT, text.encode() * 20)]), deflate)
    add("deflate-fragmented-with-ping", client_messages(DEFLATE, [
        message(BINARY, bytes(range(200)) * 3, cuts=[10, 300], between=[PING, None]),
        message(TEXT, b"second message shares the context", compress=True),
        message(TEXT, b"not compressed", compress=False)]), deflate, chunking=9)
    nct = DeflateParams(server_no_context_takeover=True, client_no_context_takeover=True,
                        server_max_window_bits=9, client_max_window_bits=9)
    add("deflate-no-context-window-9", client_messages(nct, [message(TEXT, b"abc" * 100)] * 3),
        dict(plain, deflate=nct), action=frames.ACTIONS[5], split=128)
    w12 = DeflateParams(client_max_window_bits=12, server_max_window_bits=12)
    add("deflate-window-12", client_messages(w12, [message(BINARY, bytes(3000))]),
        dict(plain, deflate=w12))
    add("deflate-corrupt", client_messages(DEFLATE, [message(TEXT, b"hello" * 30, corrupt=0)]), deflate)
    add("deflate-corrupt-last", client_messages(DEFLATE, [message(BINARY, b"hello" * 30, corrupt=-1)]), deflate)
    add("deflate-bad-utf8", client_messages(DEFLATE, [message(TEXT, b"ok \xed\xa0\x80 no")]), deflate)
    add("deflate-rsv1-on-ping", W.frame(PING, b"p", rsv=RSV1), deflate)
    add("deflate-rsv1-on-continuation",
        W.frame(TEXT, compressed("ab"), fin=False, rsv=RSV1) + W.frame(CONT, b"\x00", rsv=RSV1), deflate)
    comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    final = comp.compress(b"stream ends here") + comp.flush(zlib.Z_FINISH)
    add("deflate-bfinal-then-next", W.frame(TEXT, final, rsv=RSV1) + W.frame(TEXT, compressed("next"), rsv=RSV1),
        deflate)
    add("deflate-empty-final-fragment",
        W.frame(BINARY, compressed(b"z" * 50), fin=False, rsv=RSV1) + W.frame(CONT, b""), deflate)
    # the attacks of test_attack_compression.py, scaled to a fuzz input
    add("attack-declared-4gib-compressed", W.header(BINARY, 1 << 32, rsv=RSV1) + bytes(512),
        dict(deflate, max_message_size=65536))
    empty_blocks = b"\x00\x00\x00\xff\xff" * 40
    add("attack-endless-empty-deflate-fragments",
        W.header(BINARY, 0, fin=False, rsv=RSV1) + b"".join(W.frame(CONT, empty_blocks, fin=False) for _ in range(25)),
        dict(deflate, max_message_size=4096))
    z = bomb(1 << 20)
    for limit in (4096, 65536, 1 << 20):
        add(f"attack-zip-bomb-limit-{limit}", W.frame(BINARY, z, rsv=RSV1), dict(deflate, max_message_size=limit))
    add("attack-zip-bomb-fragments",
        b"".join(W.frame(BINARY if i == 0 else CONT, z[i:i + 256], fin=i + 256 >= len(z), rsv=RSV1 if i == 0 else 0)
                 for i in range(0, len(z), 256)), dict(deflate, max_message_size=65536), chunking=200)
    add("attack-zip-bomb-text", W.frame(TEXT, bomb(300), rsv=RSV1), dict(deflate, max_message_size=300))
    return seeds


# -- the upgrade requests ------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_seeds() -> dict:
    def lines(*extra, drop=()):
        return [line for line in PLAIN if line.split(":")[0] not in drop] + list(extra)

    seeds = {
        "plain": head_of(PLAIN),
        "plain-origin-same-host": head_of(lines("Origin: http://example.com")),
        "origin-cross-site": head_of(lines("Origin: http://evil.example")),
        "origin-null": head_of(lines("Origin: null")),
        "two-origins": head_of(lines("Origin: http://example.com", "Origin: http://example.com")),
        "host-ipv6": head_of(lines("Host: [::1]:9000", "Origin: http://[::1]:9000", drop=("Host",))),
        "subprotocols": head_of(lines("Sec-WebSocket-Protocol: chat, superchat")),
        "subprotocol-twice": head_of(lines("Sec-WebSocket-Protocol: a", "Sec-WebSocket-Protocol: b")),
        "deflate-offer": head_of(lines(
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits; server_max_window_bits=10")),
        "connection-list": head_of(
            [line if not line.startswith("Connection") else "Connection: keep-alive, Upgrade" for line in PLAIN]),
        "case-and-spaces": head_of(["host:example.com", "UPGRADE:\tWebSocket", "connection:  upgrade",
                                    f"sec-websocket-key: {KEY} ", "sec-websocket-version:13"]),
        "http-1.0": head_of(PLAIN, "GET / HTTP/1.0"),
        "post": head_of(PLAIN, "POST /chat HTTP/1.1"),
        "absolute-target": head_of(PLAIN, "GET http://example.com/chat HTTP/1.1"),
        "folded-header": head_of(lines(" folded")),
        "control-in-value": head_of(lines("X-Ctl: a\x01b")),
        "latin1-value": (head_of(PLAIN).replace(b"\r\n\r\n", b"\r\nX-Latin: caf\xe9\r\n\r\n")),
        "version-8": head_of([line.replace("13", "8") for line in PLAIN]),
        "short-key": head_of([line.replace(KEY, "abc") for line in PLAIN]),
        "key-17-bytes": head_of([line.replace(KEY, base64.b64encode(b"x" * 17).decode()) for line in PLAIN]),
        "no-host": head_of(lines(drop=("Host",))),
        "no-upgrade": head_of(lines(drop=("Upgrade",))),
        "query-odd": head_of(PLAIN, "GET /a%20b?x=%FF&y=?&&z HTTP/1.1"),
        "partial-head": head_of(PLAIN)[:-20],                  # the slowloris head, cut short
        "lf-only": head_of(PLAIN).replace(b"\r\n", b"\n"),
        "firefox-like": head_of([
            "Host: example.com:8000",
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
            "Accept: */*", "Accept-Language: en-US,en;q=0.5", "Accept-Encoding: gzip, deflate, br, zstd",
            "Sec-WebSocket-Version: 13", "Origin: http://example.com:8000",
            "Sec-WebSocket-Extensions: permessage-deflate", f"Sec-WebSocket-Key: {KEY}",
            "Connection: keep-alive, Upgrade", "Cookie: session=abc", "Sec-Fetch-Dest: empty",
            "Sec-Fetch-Mode: websocket", "Sec-Fetch-Site: same-origin", "Pragma: no-cache",
            "Cache-Control: no-cache", "Upgrade: websocket"], "GET /ws?token=x HTTP/1.1"),
        "safari-like": head_of([
            "Host: example.com", "Origin: https://example.com", "Pragma: no-cache", "Cache-Control: no-cache",
            "Accept-Language: en-GB,en;q=0.9", "Sec-WebSocket-Version: 13", "Upgrade: websocket",
            f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Extensions: permessage-deflate",
            "User-Agent: Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.5 Safari/605.1.15", "Connection: Upgrade"], "GET /chat HTTP/1.1"),
    }
    return seeds


# -- the publish API bodies ------------------------------------------------------------


def publish_seeds() -> dict:
    def body(ctype, query, payload):
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        return ctype.encode("latin-1") + b"\n" + query.encode("latin-1") + b"\n" + payload

    j = "application/json"
    return {
        "json-text": body(j, "", {"room": "lobby", "text": "hello"}),
        "json-namespace": body(j, "", {"room": "r1", "namespace": "chat", "text": "héllo 🌍"}),
        "json-base64": body(j, "", {"room": "r", "base64": base64.b64encode(b"\x00\x01binary").decode()}),
        "json-bad-base64": body(j, "", {"room": "r", "base64": "***"}),
        "json-room-in-query": body("application/json; charset=utf-8", "room=q&namespace=n", {"text": "x"}),
        "json-surrogate": body(j, "", b'{"room": "r", "text": "\\ud800"}'),
        "json-surrogate-room": body(j, "", b'{"room": "\\udfff", "text": "x"}'),
        "json-not-object": body(j, "", [1, 2, 3]),
        "json-room-number": body(j, "", {"room": 5, "text": "x"}),
        "json-namespace-list": body(j, "", {"room": "r", "namespace": [], "text": "x"}),
        "json-text-number": body(j, "", {"room": "r", "text": 1}),
        "json-broken": body(j, "", b'{"room": "r", "text": '),
        "json-not-utf8": body(j, "", b'{"room": "\xff"}'),
        "json-empty-body": body(j, "room=r", b""),
        "json-nested": body(j, "", b'{"room": "r", "text": "x", "extra": [[[[{"a": [1e999, -0.0]}]]]]}'),
        # past the recursion limit: json raised RecursionError (a 500) until publish_api caught it
        "json-deeply-nested-array": body(j, "room=r", b"[" * 3000),
        "json-deeply-nested-object": body(j, "", b'{"room": "r", "text": "x", "a":' + b'{"a":' * 1500),
        "raw-text": body("text/plain", "room=lobby", b"plain text body"),
        "raw-binary": body("application/octet-stream", "room=lobby&namespace=ns", bytes(range(256))),
        "raw-no-content-type": body("", "room=r", "é".encode()),
        "raw-bad-utf8": body("text/plain", "room=r", b"\xff\xfe"),
        "raw-query-escapes": body("TEXT/PLAIN; charset=latin-1", "room=%F0%9F%8C%8D&namespace=%ED%A0%80", b"x"),
        "raw-query-latin1": body("text/plain", "room=caf\xe9&room=second", b"x"),
        "bearer": body("Bearer   s3cret", "id=1", b"x"),
        # DELETE /connections/{id} bodies, GET /presence and /history queries
        "close-args": body("", "", {"code": 4000, "reason": "kicked"}),
        "close-args-bad": body("", "", {"code": True, "reason": "é" * 70}),
        "close-args-1005": body("", "", {"code": 1005}),
        "close-args-unknown-field": body("", "", {"code": 1000, "why": 1}),
        "room-query": body("", "room=lobby&namespace=chat&since=1732770000000-3&limit=5", b""),
        "room-query-escaped": body("", "room=%ED%A0%80&namespace=%F0%9F%8C%8D", b""),
    }


# -- the broker wire format ---------------------------------------------------------------


def broker_seeds() -> dict:
    from tests.fuzz import broker_wire

    return broker_wire.seeds()


# -- capturing real clients -----------------------------------------------------------------

CLIENT_TEXT = "hello from a real client, ünïcödé 🌍"
CLIENT_LONG = "fastws " * 300          # compressible: deflate shows in the frames
CLIENT_BINARY = bytes(range(256))

NODE_CLIENT = """
const WebSocket = require('ws');
const ws = new WebSocket(process.argv[1]);
ws.on('open', () => {
  ws.send(%(text)s); ws.send(Buffer.from(%(binary)s)); ws.ping('node ping'); ws.send(%(long)s);
  ws.close(1000, 'done');
});
ws.on('close', () => process.exit(0));
ws.on('error', (e) => { console.error(e); process.exit(1); });
"""

PAGE = """<!doctype html><html><body><script>
const ws = new WebSocket('ws://' + location.host + '/chromium?tab=1');
ws.binaryType = 'arraybuffer';
ws.onopen = () => {
  ws.send(%(text)s); ws.send(new Uint8Array(%(binary)s)); ws.send(%(long)s);
  ws.close(1000, 'done');
};
</script></body></html>"""


async def _capture(port_holder: dict, wanted: set, timeout: float = 60.0) -> dict:
    """Serve on 127.0.0.1 until every client in ``wanted`` has closed (or
    ``timeout``); returns name -> (head, stream, DeflateParams or None)."""
    from fastws import _wsproto_engine
    from fastws.handshake import accept_response, negotiate_deflate, parse_request

    got = {}
    done = asyncio.Event()

    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"upgrade: websocket" not in head.lower():        # the page for Chromium
                page = (PAGE % {"text": json.dumps(CLIENT_TEXT), "binary": json.dumps(list(CLIENT_BINARY)),
                                "long": json.dumps(CLIENT_LONG)}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n" % len(page) + page)
                await writer.drain()
                return
            req = parse_request(head)
            ext, params = negotiate_deflate(req.extensions)
            writer.write(accept_response(req, extensions_header=ext))
            engine = _wsproto_engine.Engine(max_message_size=LIMIT, deflate=params)
            stream = b""
            while engine.state != core.CLOSED:
                data = await asyncio.wait_for(reader.read(65536), 20)
                if not data:
                    break
                stream += data
                engine.receive(data)
                writer.write(engine.data_to_send())
            got[req.path.strip("/")] = (head, stream, params)
            if wanted <= set(got):
                done.set()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port_holder["port"] = server.sockets[0].getsockname()[1]
    port_holder["ready"].set()
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        print(f"clients that did not finish: {sorted(wanted - set(got))}", file=sys.stderr)
    server.close()
    return got


async def _clients(port: int, names: list) -> None:
    url = f"ws://127.0.0.1:{port}"
    for name in names:
        try:
            if name == "websockets":
                import websockets

                async with websockets.connect(f"{url}/websockets?v=1", compression="deflate",
                                              origin=f"http://127.0.0.1:{port}") as ws:
                    await ws.send(CLIENT_TEXT)
                    await ws.send(CLIENT_BINARY)
                    await ws.ping(b"websockets ping")
                    await ws.send(CLIENT_LONG)
                    await ws.close(1000, "done")
            elif name == "aiohttp":
                import aiohttp

                async with aiohttp.ClientSession() as session, \
                        session.ws_connect(f"{url}/aiohttp", compress=15, protocols=("chat",)) as ws:
                    await ws.send_str(CLIENT_TEXT)
                    await ws.send_bytes(CLIENT_BINARY)
                    await ws.ping(b"aiohttp ping")
                    await ws.send_str(CLIENT_LONG)
                    await ws.close(code=1000, message=b"done")
            elif name == "websocket-client":
                import websocket

                def run():
                    ws = websocket.create_connection(f"{url}/websocket-client", timeout=10)
                    ws.send(CLIENT_TEXT)
                    ws.send_binary(CLIENT_BINARY)
                    ws.ping("wsc ping")
                    ws.send(CLIENT_LONG)
                    ws.close(reason=b"done")

                await asyncio.to_thread(run)
            elif name == "node-ws":
                script = NODE_CLIENT % {"text": json.dumps(CLIENT_TEXT), "binary": json.dumps(list(CLIENT_BINARY)),
                                        "long": json.dumps(CLIENT_LONG)}
                env = dict(os.environ, NODE_PATH=str(ROOT / "tests/integration/node/node_modules"))
                proc = await asyncio.create_subprocess_exec("node", "-e", script, f"{url}/node-ws", env=env)
                await asyncio.wait_for(proc.wait(), 30)
            elif name == "chromium":
                with tempfile.TemporaryDirectory() as profile:
                    proc = await asyncio.create_subprocess_exec(
                        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-dev-shm-usage", "--disable-background-networking", "--disable-extensions",
                        f"--user-data-dir={profile}", f"http://127.0.0.1:{port}/page",
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                    try:
                        await asyncio.sleep(15)
                    finally:
                        proc.terminate()
                        await proc.wait()
        except Exception as exc:  # a missing or failing client only loses its seed
            print(f"{name}: {exc!r}", file=sys.stderr)


def capture() -> dict:
    """Record the real clients; ``{"frames": {...}, "upgrade": {...}}`` seeds."""
    names = ["websockets", "aiohttp", "websocket-client"]
    if shutil.which("node"):
        names.append("node-ws")
    if shutil.which("chromium"):
        names.append("chromium")

    async def main():
        holder = {"ready": asyncio.Event()}
        task = asyncio.create_task(_capture(holder, set(names)))
        await holder["ready"].wait()
        await _clients(holder["port"], names)
        return await task

    got = asyncio.run(main())
    out = {"frames": {}, "upgrade": {}}
    for name, (head, stream, params) in got.items():
        name = name.split("?")[0]
        config = {"max_message_size": LIMIT}
        if params is not None:
            config["deflate"] = DeflateParams(
                server_no_context_takeover=params.server_no_context_takeover,
                client_no_context_takeover=params.client_no_context_takeover,
                server_max_window_bits=params.server_max_window_bits if params.server_max_window_bits in (9, 12, 15)
                else 15,
                client_max_window_bits=params.client_max_window_bits,
            )
        out["upgrade"][f"client-{name}"] = head
        out["frames"][f"client-{name}"] = frames.encode(config, stream)
        print(f"captured {name}: head {len(head)} bytes, frames {len(stream)} bytes, deflate {params}")
    return out


def write(target: str, seeds: dict, *, prefix="seed-") -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        path = d / f"{prefix}{name}"
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    write("frames", frames_seeds())
    write("upgrade", upgrade_seeds())
    write("publish_body", publish_seeds())
    write("broker_wire", broker_seeds())
    if "--capture" in argv:
        for target, seeds in capture().items():
            write(target, seeds)
    for target in ("frames", "upgrade", "publish_body", "broker_wire"):
        files = list((CORPUS / target).iterdir())
        print(f"{target}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
