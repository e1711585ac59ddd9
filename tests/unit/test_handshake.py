"""The opening handshake: fast path vs wsproto (differential), statuses, seam.

The fast path and wsproto must give the same answer for every request the
fast path accepts to parse; requests it declines go to wsproto.
"""

from __future__ import annotations

import base64
import random

import pytest

from fastws.errors import HandshakeError
from fastws.handshake import (
    accept_key,
    accept_response,
    error_response,
    negotiate_deflate,
    parse_fast,
    parse_request,
    parse_wsproto,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def req(lines=None, method="GET", target="/chat?room=1", version="HTTP/1.1", drop=(), extra=()):
    headers = {
        "Host": "example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    for d in drop:
        headers.pop(d, None)
    out = [f"{method} {target} {version}"]
    out += [f"{k}: {v}" for k, v in headers.items()]
    out += list(extra)
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def answer(parser, head):
    """Normalise a parser's answer for comparison."""
    try:
        r = parser(head)
    except HandshakeError as exc:
        return ("reject", exc.status, sorted((k.lower(), v) for k, v in exc.headers))
    if r is None:
        return None
    hdrs = dict(r.headers)
    return (
        "accept",
        r.path,
        r.query_string,
        r.key,
        tuple(r.subprotocols),
        tuple(r.extensions),
        hdrs.get("origin"),
        hdrs.get("host"),
    )


def test_rfc_example_accept_key():
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_plain_request_takes_fast_path_and_matches_wsproto():
    head = req(extra=["Origin: http://example.com", "Sec-WebSocket-Protocol: chat, superchat"])
    fast = answer(parse_fast, head)
    assert fast is not None and fast[0] == "accept"
    assert fast == answer(parse_wsproto, head)
    assert fast[1:3] == ("/chat", "room=1")
    assert fast[4] == ("chat", "superchat")


@pytest.mark.parametrize(
    "head,status",
    [
        (req(method="POST"), 400),
        (req(drop=["Connection"]), 400),
        (req(drop=["Connection"], extra=["Connection: keep-alive"]), 400),
        (req(drop=["Upgrade"]), 400),
        (req(drop=["Upgrade"], extra=["Upgrade: h2c"]), 400),
        (req(drop=["Sec-WebSocket-Key"]), 400),
        (req(drop=["Sec-WebSocket-Key"], extra=["Sec-WebSocket-Key: short"]), 400),
        (req(drop=["Sec-WebSocket-Key"], extra=["Sec-WebSocket-Key: !!!!not base64!!!!!!!=="]), 400),
        (req(drop=["Sec-WebSocket-Version"]), 400),
        (req(drop=["Sec-WebSocket-Version"], extra=["Sec-WebSocket-Version: 8"]), 426),
        (req(drop=["Host"]), 400),
    ],
)
def test_rejections_agree(head, status):
    expected = answer(parse_wsproto, head)
    assert expected[0] == "reject" and expected[1] == status
    fast = answer(parse_fast, head)
    if fast is not None:  # the fast path may decline; if it answers it must agree
        assert fast == expected
    assert answer(parse_request, head) == expected


def test_wrong_version_426_carries_supported_version():
    head = req(drop=["Sec-WebSocket-Version"], extra=["Sec-WebSocket-Version: 8"])
    with pytest.raises(HandshakeError) as info:
        parse_request(head)
    assert info.value.status == 426
    assert ("sec-websocket-version", "13") in [(k.lower(), v) for k, v in info.value.headers]
    resp = error_response(426, "x", info.value.headers)
    assert resp.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in resp


def test_unusual_requests_go_to_wsproto_with_same_answer():
    # header continuation / duplicates / HTTP/1.0 are left to wsproto
    for head in (
        req(extra=["Sec-WebSocket-Protocol: a", "Sec-WebSocket-Protocol: b"]),
        req(version="HTTP/1.0"),
        req(extra=["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]),
    ):
        got = answer(parse_request, head)
        assert got == answer(parse_wsproto, head)
    dup = answer(parse_request, req(extra=["Sec-WebSocket-Protocol: a", "Sec-WebSocket-Protocol: b"]))
    assert dup[4] == ("a", "b")


def test_differential_random_requests():
    """Random mutations of a valid request: wherever the fast path answers,
    it answers exactly as wsproto does."""
    rnd = random.Random(7)
    names = ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
             "Origin", "Sec-WebSocket-Protocol", "User-Agent"]
    values = {
        "Host": ["h", "example.com:80", ""],
        "Upgrade": ["websocket", "WebSocket", "h2c", "websocket, foo", ""],
        "Connection": ["Upgrade", "keep-alive, Upgrade", "upgrade", "close", ""],
        "Sec-WebSocket-Key": [KEY, base64.b64encode(b"x" * 16).decode(), "abc", "",
                              base64.b64encode(b"x" * 15).decode()],
        "Sec-WebSocket-Version": ["13", "8", "", "13, 8"],
        "Origin": ["http://a", "null"],
        "Sec-WebSocket-Protocol": ["chat", "a, b", ""],
        "User-Agent": ["x"],
    }
    compared = 0
    for _ in range(3000):
        lines = []
        for n in names:
            if rnd.random() < 0.85:
                lines.append(f"{n if rnd.random() < 0.7 else n.lower()}: {rnd.choice(values[n])}")
        if rnd.random() < 0.1:
            lines.append(rnd.choice(["Bad Name: x", "X-Ctl: a\x01b", "NoColon", ": empty", "X-Sp : v",
                                     "X-Utf8: caf\u00e9", " folded"]))
        rnd.shuffle(lines)
        method = rnd.choice(["GET"] * 8 + ["POST", "HEAD"])
        target = rnd.choice(["/", "/a?b=c", "/x/y", "/%20"])
        head = (f"{method} {target} HTTP/1.1\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode("utf-8")
        fast = answer(parse_fast, head)
        if fast is None:
            continue
        compared += 1
        assert fast == answer(parse_wsproto, head), head
    assert compared > 1500


def test_accept_response_format():
    r = parse_request(req(extra=["Sec-WebSocket-Protocol: chat"]))
    resp = accept_response(r, "chat", None, [("X-Node", "n1")])
    assert resp.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in resp
    assert b"Sec-WebSocket-Protocol: chat\r\n" in resp
    assert b"X-Node: n1\r\n" in resp
    assert resp.endswith(b"\r\n\r\n")


def test_deflate_negotiation_through_wsproto():
    header, params = negotiate_deflate(["permessage-deflate; client_max_window_bits"])
    assert header.startswith("permessage-deflate")
    assert params is not None and params.client_max_window_bits == 15
    header, params = negotiate_deflate(["permessage-deflate; server_max_window_bits=10"])
    assert "server_max_window_bits=10" in header and params.server_max_window_bits == 10
    assert negotiate_deflate([]) == (None, None)
    assert negotiate_deflate(["x-webkit-deflate-frame"]) == (None, None)
