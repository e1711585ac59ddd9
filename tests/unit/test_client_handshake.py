"""The client's opening handshake: ``fastws.handshake.client_request`` and
``check_accept`` against wsproto's client handshake (the oracle).

* ``client_request`` must write, byte for byte, the request wsproto's
  ``H11Handshake(CLIENT)`` writes for the same host, target, subprotocols,
  extension offers and extra headers (the key is taken from wsproto's
  request, so nothing is patched).
* ``check_accept`` must take the responses wsproto's client takes, with the
  same subprotocol, extensions (permessage-deflate parameters included) and
  extra headers, and refuse the ones it refuses: a refusal by the server
  (not 101) with the server's status and headers, a broken 101 with status
  101.
"""

from __future__ import annotations

import itertools

import pytest
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from fastws.errors import HandshakeError
from fastws.frames import DeflateParams
from fastws.handshake import (
    ClientAccept,
    accept_key,
    check_accept,
    client_key,
    client_request,
    deflate_offer,
    parse_request,
)

HOSTS = ["example.com", "example.com:8080", "127.0.0.1:9"]
TARGETS = ["/", "/chat?room=a&x=1"]
SUBPROTOCOLS = [[], ["chat"], ["a", "b.v2"]]
DEFLATE_OFFERS = [
    None,
    {},
    {"client_no_context_takeover": True, "server_max_window_bits": 10},
    {"server_no_context_takeover": True, "client_max_window_bits": 9},
]
HEADERS = [[], [("Origin", "http://example.com"), (b"X-Token", b"t0k3n")]]


def wsproto_request(host, target, subprotocols, offer, headers):
    """(wsproto's client handshake, the bytes it wrote, the key in them)."""
    hs = H11Handshake(ConnectionType.CLIENT)
    extensions = [] if offer is None else [PerMessageDeflate(**offer)]
    data = hs.send(Request(host=host, target=target, subprotocols=subprotocols,
                           extensions=extensions, extra_headers=list(headers)))
    key = data.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0].decode()
    return hs, data, key


def offers_of(offer):
    return [] if offer is None else [deflate_offer(**offer)]


@pytest.mark.parametrize("host, target, subprotocols, offer, headers",
                         list(itertools.product(HOSTS, TARGETS, SUBPROTOCOLS, DEFLATE_OFFERS, HEADERS)))
def test_client_request_is_wsproto_s(host, target, subprotocols, offer, headers):
    _, expected, key = wsproto_request(host, target, subprotocols, offer, headers)
    mine = client_request(host, target, key, subprotocols, offers_of(offer), headers)
    assert mine == expected
    # and a server reads it as the upgrade it is
    req = parse_request(mine)
    assert (req.key, req.subprotocols, req.extensions) == (key, subprotocols, offers_of(offer))


def test_client_key_and_bad_requests():
    keys = {client_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert parse_request(client_request("h", "/", key)).key == key
    assert b"Sec-WebSocket-Key: " in client_request("h")          # a fresh key when none is given
    for path in ("no-slash", "/a b", "/\x00", "/é"):
        with pytest.raises(ValueError):
            client_request("h", path)
    with pytest.raises(ValueError):
        client_request("h", "/", headers=[("X-A", "a\r\nInjected: 1")])
    with pytest.raises(ValueError):
        client_request("h", "/", headers=[("Bad Name", "v")])
    with pytest.raises(ValueError):
        deflate_offer(client_max_window_bits=8)


def response(key, *, status="101 Switching Protocols", connection="Upgrade", upgrade="websocket",
             accept=None, protocol=None, extensions=None, extra=(), body=b""):
    """A server's answer; ``None`` leaves a header out, a list repeats it."""
    lines = [f"HTTP/1.1 {status}"]

    def add(name, value):
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                lines.append(f"{name}: {v}")

    add("Upgrade", upgrade)
    add("Connection", connection)
    add("Sec-WebSocket-Accept", accept_key(key) if accept is None else accept or None)
    add("Sec-WebSocket-Protocol", protocol)
    add("Sec-WebSocket-Extensions", extensions)
    for name, value in extra:
        add(name, value)
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


#: (name, subprotocols offered, deflate offer, response keywords)
CASES = [
    ("plain", [], None, {}),
    ("extra-headers", [], None, {"extra": [("Server", "x"), ("Set-Cookie", "a=b")]}),
    ("upgrade-any-case", [], None, {"upgrade": "WebSocket", "connection": "keep-alive, UPGRADE"}),
    ("subprotocol-chosen", ["a", "b"], None, {"protocol": "b"}),
    ("subprotocol-not-chosen", ["a", "b"], None, {}),
    ("subprotocol-not-offered", ["a"], None, {"protocol": "c"}),
    ("subprotocol-when-none-offered", [], None, {"protocol": "a"}),
    ("subprotocol-repeated-last-counts", ["a", "b"], None, {"protocol": ["c", "a"]}),
    ("no-accept", [], None, {"accept": ""}),
    ("wrong-accept", [], None, {"accept": accept_key("dGhlIHNhbXBsZSBub25jZQ==")}),
    ("no-connection", [], None, {"connection": None}),
    ("connection-close", [], None, {"connection": "close"}),
    ("no-upgrade", [], None, {"upgrade": None}),
    ("upgrade-h2c", [], None, {"upgrade": "h2c"}),
    ("deflate-accepted", [], {}, {"extensions": "permessage-deflate"}),
    ("deflate-declined", [], {}, {}),
    ("deflate-with-parameters", [], {"client_no_context_takeover": True},
     {"extensions": "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"}),
    ("deflate-server-window", [], {"server_max_window_bits": 12},
     {"extensions": "permessage-deflate; server_max_window_bits=9"}),
    ("deflate-not-offered", [], None, {"extensions": "permessage-deflate"}),
    ("other-extension", [], {}, {"extensions": "x-webkit-deflate-frame"}),
    ("deflate-and-junk", [], {}, {"extensions": "permessage-deflate, x-other"}),
    ("deflate-empty-piece", [], {}, {"extensions": "permessage-deflate, "}),
    ("deflate-window-out-of-range", [], {}, {"extensions": "permessage-deflate; client_max_window_bits=8"}),
    ("refused-403", [], None, {"status": "403 Forbidden", "body": b"no\n"}),
    ("refused-503-retry", [], None, {"status": "503 Service Unavailable", "extra": [("Retry-After", "7")],
                                      "body": b"busy\n"}),
    ("refused-200", [], None, {"status": "200 OK", "body": b"hello"}),
    ("refused-426", [], None, {"status": "426 Upgrade Required", "extra": [("Sec-WebSocket-Version", "13")],
                                "body": b"x"}),
]


def wsproto_outcome(hs, data):
    """("accept", subprotocol, extension names, deflate params, headers) |
    ("reject", status, headers) | ("error",)."""
    try:
        hs.receive_data(data)
        events = list(hs.events())
    except (RemoteProtocolError, ValueError, IndexError):
        return ("error",)
    event = events[0]
    if isinstance(event, AcceptConnection):
        deflate = None
        for ext in event.extensions:
            if isinstance(ext, PerMessageDeflate):
                deflate = DeflateParams(ext.server_no_context_takeover, ext.client_no_context_takeover,
                                        ext.server_max_window_bits, ext.client_max_window_bits)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.extra_headers]
        return ("accept", event.subprotocol, [e.name for e in event.extensions], deflate, headers)
    assert isinstance(event, RejectConnection), event
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
    return ("reject", event.status_code, headers)


def fastws_outcome(data, key, subprotocols, offers):
    try:
        got = check_accept(data, key, subprotocols, offers)
    except HandshakeError as exc:
        if exc.status == 101:
            return ("error",)
        return ("reject", exc.status, exc.headers)
    assert isinstance(got, ClientAccept)
    names = [e.split(";", 1)[0].strip() for e in got.extensions]
    return ("accept", got.subprotocol, names, got.deflate, got.headers)


@pytest.mark.parametrize("name, subprotocols, offer, kwargs", CASES, ids=[c[0] for c in CASES])
def test_check_accept_agrees_with_wsproto(name, subprotocols, offer, kwargs):
    hs, _, key = wsproto_request("example.com", "/", subprotocols, offer, [])
    data = response(key, **kwargs)
    expected = wsproto_outcome(hs, data)
    assert fastws_outcome(data, key, subprotocols, offers_of(offer)) == expected
    # what each case is about, so that two equally wrong answers fail too
    if name.startswith("refused"):
        assert expected[0] == "reject" and expected[1] == int(kwargs["status"][:3])
    elif name in ("plain", "extra-headers", "upgrade-any-case", "subprotocol-chosen", "subprotocol-not-chosen",
                  "subprotocol-repeated-last-counts", "deflate-declined"):
        assert expected[0] == "accept"
    elif name.startswith("deflate") and name not in ("deflate-not-offered", "deflate-and-junk",
                                                      "deflate-empty-piece", "deflate-window-out-of-range"):
        assert expected[0] == "accept" and expected[3] is not None
    else:
        assert expected[0] == "error", expected


def test_check_accept_results():
    key = client_key()
    got = check_accept(response(key, protocol="b", extensions="permessage-deflate; server_no_context_takeover",
                                extra=[("X-Node", "n1")]) + b"\x81\x02hi", key, ["a", "b"],
                       [deflate_offer(client_max_window_bits=10)])
    assert got.subprotocol == "b"
    assert got.deflate == DeflateParams(server_no_context_takeover=True, client_max_window_bits=10)
    assert got.headers == [("x-node", "n1")]
    with pytest.raises(HandshakeError) as info:
        check_accept(response(key, status="503 Service Unavailable", extra=[("Retry-After", "3")]), key)
    assert info.value.status == 503 and ("retry-after", "3") in info.value.headers
    for junk in (b"", b"HTTP/1.1 101 Switching Protocols\r\n", b"SSH-2.0-OpenSSH\r\n\r\n",
                 b"HTTP/1.1 1O1 x\r\n\r\n", b"HTTP/1.1 101 x\r\nBad Header\r\n\r\n"):
        with pytest.raises(HandshakeError) as info:
            check_accept(junk, key)
        assert info.value.status == 0
