"""The hub's C fast path for plain upgrades (``_core._parse_plain``).

It must be a strict subset of what the Python handshake accepts, with the
same answer: for every head it takes, ``fastws.handshake.parse_request``
accepts too, with the same path and query, and ``accept_response`` writes
the same bytes.  Heads it declines go to the Python handshake unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random

import pytest

from fastws.core import IMPLEMENTATION
from fastws.errors import HandshakeError
from fastws.handshake import accept_response, parse_request
from fastws.origins import OriginPolicy

if IMPLEMENTATION != "cython":  # the fast path is a part of the Cython engine only
    pytest.fail("the Cython engine is not built (tests need it)", pytrace=False)

from fastws import _core

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def head_of(lines, request_line="GET /chat?room=1 HTTP/1.1"):
    return (request_line + "\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode("latin-1")


PLAIN = [
    "Host: example.com",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
]


def python_answer(head):
    try:
        r = parse_request(head)
    except HandshakeError as exc:
        return ("reject", exc.status)
    return ("accept", r.path, r.query_string, accept_response(r))


def test_sha1_matches_hashlib_across_block_boundaries():
    for n in list(range(0, 130)) + [1000, 4097]:
        data = os.urandom(n)
        assert _core._sha1_for_test(data) == hashlib.sha1(data).digest(), n


def test_rfc_6455_example():
    path, query, response, ext = _core._fast_accept_for_test(head_of(PLAIN))
    assert (path, query, ext) == ("/chat", "room=1", False)
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert python_answer(head_of(PLAIN)) == ("accept", "/chat", "room=1", response)


@pytest.mark.parametrize("lines,request_line", [
    (PLAIN[1:], "GET / HTTP/1.1"),                                        # no Host
    ([line for line in PLAIN if not line.startswith("Upgrade")], "GET / HTTP/1.1"),
    (PLAIN + ["Host: b"], "GET / HTTP/1.1"),                               # duplicate
    (PLAIN + ["Sec-WebSocket-Protocol: a", "Sec-WebSocket-Protocol: b"], "GET / HTTP/1.1"),
    (PLAIN, "GET / HTTP/1.0"),
    (PLAIN, "POST / HTTP/1.1"),
    (PLAIN, "GET http://a/ HTTP/1.1"),
    (PLAIN, "GET  / HTTP/1.1"),
    (PLAIN + [" folded"], "GET / HTTP/1.1"),
    (PLAIN + ["X-Bad Name: 1"], "GET / HTTP/1.1"),
    (PLAIN + ["X-Ctl: a\x01b"], "GET / HTTP/1.1"),
    (PLAIN + ["X-Latin: caf\xe9"], "GET / HTTP/1.1"),
    ([line.replace("13", "8") for line in PLAIN], "GET / HTTP/1.1"),
    ([line.replace(KEY, KEY[:-2] + "AA") for line in PLAIN], "GET / HTTP/1.1"),
    ([line.replace(KEY, "abc") for line in PLAIN], "GET / HTTP/1.1"),
    ([line.replace("Upgrade", "keep-alive") if line.startswith("Connection") else line for line in PLAIN],
     "GET / HTTP/1.1"),
])
def test_declines_what_is_not_plain_or_not_valid(lines, request_line):
    assert _core._fast_accept_for_test(head_of(lines, request_line)) is None


def test_extension_offer_is_reported():
    got = _core._fast_accept_for_test(head_of(PLAIN + ["Sec-WebSocket-Extensions: permessage-deflate"]))
    assert got is not None and got[3] is True


def test_differential_random_requests():
    """Random mutations: every head the C path takes, Python accepts with the
    same path, query and 101 bytes; and most plain ones are taken."""
    rnd = random.Random(11)
    names = ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
             "Origin", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "User-Agent"]
    keys = [KEY, base64.b64encode(os.urandom(16)).decode(), "abc", "",
            base64.b64encode(b"x" * 15).decode(), base64.b64encode(b"x" * 17).decode(), " " + KEY + "\t"]
    values = {
        "Host": ["h", "example.com:80", ""],
        "Upgrade": ["websocket", "WebSocket", " websocket ", "h2c", "websocket, foo", ""],
        "Connection": ["Upgrade", "keep-alive, Upgrade", "upgrade", "close", "", "keep-alive,upgrade ,x"],
        "Sec-WebSocket-Key": keys,
        "Sec-WebSocket-Version": ["13", "8", "", "13, 8", " 13"],
        "Origin": ["http://a", "null"],
        "Sec-WebSocket-Protocol": ["chat", "a, b", ""],
        "Sec-WebSocket-Extensions": ["permessage-deflate"],
        "User-Agent": ["x", "Mozilla/5.0 (X11; Linux x86_64)"],
    }
    taken = 0
    for _ in range(5000):
        lines = []
        for n in names:
            if rnd.random() < 0.95:
                name = rnd.choice([n, n.lower(), n.upper()])
                value = rnd.choice(values[n]) if rnd.random() < 0.25 else values[n][0]
                lines.append(f"{name}:{rnd.choice(['', ' ', '  ', chr(9)])}{value}")
                if rnd.random() < 0.03:
                    lines.append(f"{n}: {rnd.choice(values[n])}")     # a duplicate
        if rnd.random() < 0.1:
            lines.append(rnd.choice(["Bad Name: x", "X-Ctl: a\x01b", "NoColon", ": empty", "X-Sp : v",
                                     "X-Utf8: caf\u00e9", " folded", "X-Del: \x7f"]))
        rnd.shuffle(lines)
        method = rnd.choice(["GET"] * 18 + ["POST", "get"])
        target = rnd.choice(["/", "/a?b=c", "/x/y", "/%20", "/q?", "/?a?b"] * 3 + ["*", "http://h/"])
        version = rnd.choice(["HTTP/1.1"] * 18 + ["HTTP/1.0", "HTTP/2"])
        head = (f"{method} {target} {version}\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode("utf-8")
        fast = _core._fast_accept_for_test(head)
        if fast is None:
            continue
        taken += 1
        path, query, response, _ext = fast
        assert python_answer(head) == ("accept", path, query, response), head
    assert taken > 800


def test_real_client_takes_fast_path_routes_with_on_connect_do_not():
    """A `websockets` client's upgrade is answered by the C path; a route
    with on_connect (also one given while serving) still runs it."""

    import uvloop
    import websockets

    from fastws import App
    from fastws.config import Config
    from fastws.server import NativeServer

    app = App()
    seen = []
    app.route("/echo", on_message=lambda conn, data: conn.send(data))
    app.route("/guarded", on_connect=lambda req: seen.append(req.path), on_message=lambda c, d: c.send(d))

    async def roundtrip(port, path):
        async with websockets.connect(f"ws://127.0.0.1:{port}{path}?q=1") as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"

    async def main():
        server = NativeServer(app, Config(host="127.0.0.1", port=0))
        await server.start()
        try:
            await roundtrip(server.port, "/echo")
            assert server.node.hub.fast_upgrades == 1
            await roundtrip(server.port, "/guarded")
            assert seen == ["/guarded"] and server.node.hub.fast_upgrades == 1
            app.route("/echo", on_connect=lambda req: seen.append("late " + req.query_string))
            await roundtrip(server.port, "/echo")
            assert seen == ["/guarded", "late q=1"] and server.node.hub.fast_upgrades == 1
        finally:
            await server.shutdown()

    uvloop.run(main())


def test_mutated_bytes_never_crash_and_agree_when_taken():
    """Bit flips, insertions and cuts anywhere in a valid head: the C parser
    reads only inside the head, and whatever it still takes, Python accepts
    with the same answer."""
    rnd = random.Random(5)
    base = head_of(PLAIN + ["User-Agent: x", "Origin: http://a"])
    taken = 0
    for _ in range(20000):
        b = bytearray(base[:-4])
        for _ in range(rnd.randint(1, 3)):
            op = rnd.random()
            pos = rnd.randrange(len(b))
            if op < 0.5:
                b[pos] ^= 1 << rnd.randrange(8)
            elif op < 0.8:
                b[pos:pos] = bytes([rnd.randrange(256)])
            else:
                del b[pos:pos + rnd.randint(1, 4)]
        head = bytes(b) + b"\r\n\r\n"
        end = head.find(b"\r\n\r\n") + 4          # what the hub hands over: up to the first CRLFCRLF
        head = head[:end]
        fast = _core._fast_accept_for_test(head)
        if fast is not None:
            taken += 1
            path, query, response, _ext = fast
            assert python_answer(head) == ("accept", path, query, response), head
    assert taken > 1000


# -- the Origin header (allowed_origins; fastws.origins.OriginPolicy) ----------

MODES = ("*", "same-host", "none")


@pytest.mark.parametrize("origin,host,taken", [
    # origin line (None: no Origin), Host, taken by the C path in modes *, same-host, none
    (None, "example.com:8000", (True, True, True)),
    ("http://example.com:8000", "example.com:8000", (True, True, False)),
    ("https://example.com:8000", "example.com:8000", (True, True, False)),
    ("HTTPS://Example.COM:8000", "example.com:8000", (True, True, False)),
    ("http://example.com:8000", "EXAMPLE.com:8000", (True, True, False)),
    ("http://evil.example", "example.com:8000", (True, False, False)),
    ("http://example.com:8001", "example.com:8000", (True, False, False)),
    ("http://example.com", "example.com:8000", (True, False, False)),
    ("https://example.com", "example.com", (True, True, False)),
    ("https://example.com:443", "example.com", (True, False, False)),   # Python allows it
    ("ws://example.com", "example.com", (True, False, False)),
    ("null", "example.com", (True, False, False)),
    ("", "example.com", (True, False, False)),
    ("http://", "", (True, False, False)),
])
def test_origin_modes(origin, host, taken):
    lines = [line for line in PLAIN if not line.startswith("Host")] + [f"Host: {host}"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    head = head_of(lines)
    got = tuple(_core._fast_accept_for_test(head, mode) is not None for mode in MODES)
    assert got == taken
    policy = OriginPolicy("same-host")
    for mode, took in zip(MODES, got, strict=True):
        if took and mode != "*":
            assert policy.allows_request(parse_request(head))


def test_two_origin_headers_go_to_python():
    head = head_of(PLAIN + ["Origin: http://example.com", "Origin: http://example.com"])
    assert all(_core._fast_accept_for_test(head, mode) is None for mode in MODES)


def test_unknown_origin_mode_is_an_error():
    with pytest.raises(ValueError):
        _core._fast_accept_for_test(head_of(PLAIN), "same-site")


def test_differential_random_origins():
    """Random Host and Origin values (cases, ports, schemes, look-alike
    hosts, duplicates): whatever the C path takes in a mode, Python accepts
    with the same answer and the policy of that mode allows; and the C path
    takes every plain request that has no Origin or a same-host one."""
    rnd = random.Random(23)
    hosts = ["example.com", "example.com:8000", "EXAMPLE.com:8000", "127.0.0.1:9000", "[::1]:9000",
             "a", "", "example.com:443", "xn--bcher-kva.example"]
    policies = {"same-host": OriginPolicy("same-host"),
                "none": OriginPolicy("https://app.example.com")}
    taken = {m: 0 for m in MODES}
    browser_same_host = 0
    for _ in range(6000):
        host = rnd.choice(hosts)
        bare = host.lower()
        origins = [
            None, f"http://{host}", f"https://{host}", f"HTTP://{host}", f"https://{host.upper()}",
            f"http://{bare}:1", f"ws://{host}", f"http://{host}/", f"http://{host}.evil",
            f"http://evil.{host}", f"https://{host}:443", "http://evil.example", "null", "",
            f"http:/{host}", f"http//{host}", "https://app.example.com", f" http://{host} ",
        ]
        lines = [line for line in PLAIN if not line.startswith("Host")]
        lines.append(f"{rnd.choice(['Host', 'host', 'HOST'])}:{rnd.choice(['', ' ', chr(9)])}{host}")
        origin = rnd.choice(origins)
        if origin is not None:
            lines.append(f"{rnd.choice(['Origin', 'origin', 'ORIGIN'])}: {origin}")
            if rnd.random() < 0.05:
                lines.append(f"Origin: {rnd.choice(origins[1:])}")
        rnd.shuffle(lines)
        head = head_of(lines, rnd.choice(["GET / HTTP/1.1", "GET /a?b=c HTTP/1.1"]))
        answer = python_answer(head)
        for mode in MODES:
            fast = _core._fast_accept_for_test(head, mode)
            if fast is None:
                continue
            taken[mode] += 1
            path, query, response, _ext = fast
            assert answer == ("accept", path, query, response), head
            if mode in policies:
                assert policies[mode].allows_request(parse_request(head)), (mode, head)
        # a plain request from no browser, or from the page of the host asked: fast
        if answer[0] == "accept" and _core._fast_accept_for_test(head, "*") is not None:
            req = parse_request(head)
            values = [v for k, v in req.headers if k == "origin"]
            if not values or (len(values) == 1 and values[0].lower() in (
                    f"http://{req.header('host')}".lower(), f"https://{req.header('host')}".lower())
                    and req.header("host")):
                browser_same_host += 1
                assert _core._fast_accept_for_test(head, "same-host") is not None, head
    assert taken["same-host"] > 1000 and taken["none"] > 200 and browser_same_host > 1000, taken


def test_real_clients_origin_default_and_override():
    """The default (same-host): no Origin and a same-host Origin are answered
    in C; a cross-site Origin gets 403 from Python, counted.  With an
    explicit list a listed origin passes through Python, the C path still
    takes requests without Origin."""

    import uvloop
    import websockets

    from fastws import App
    from fastws.config import Config
    from fastws.server import NativeServer

    async def roundtrip(port, origin=None):
        async with websockets.connect(f"ws://127.0.0.1:{port}/e", origin=origin) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"

    async def refused(port, origin):
        with pytest.raises(websockets.InvalidStatus) as info:
            await roundtrip(port, origin)
        assert info.value.response.status_code == 403
        assert b"origin not allowed" in info.value.response.body

    async def main():
        app = App()
        app.route("/e", on_message=lambda conn, data: conn.send(data))
        server = NativeServer(app, Config(host="127.0.0.1", port=0))
        await server.start()
        try:
            port = server.port
            await roundtrip(port)
            await roundtrip(port, f"http://127.0.0.1:{port}")
            assert server.node.hub.fast_upgrades == 2
            await refused(port, "http://evil.example")
            await refused(port, f"http://127.0.0.1:{port + 1}")
            assert server.node.handshakes.get(403) == 2 and server.node.hub.fast_upgrades == 2
        finally:
            await server.shutdown()

        app = App()
        app.route("/e", on_message=lambda conn, data: conn.send(data))
        server = NativeServer(app, Config(host="127.0.0.1", port=0,
                                          allowed_origins="https://app.example.com"))
        await server.start()
        try:
            port = server.port
            await roundtrip(port)
            assert server.node.hub.fast_upgrades == 1
            await roundtrip(port, "https://APP.example.com")
            assert server.node.hub.fast_upgrades == 1 and server.node.handshakes.get(101) == 1
            await refused(port, f"http://127.0.0.1:{port}")     # not same-host: only the list
            await refused(port, "https://evil.example")
            assert server.node.handshakes.get(403) == 2
        finally:
            await server.shutdown()

    uvloop.run(main())
