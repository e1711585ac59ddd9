"""The opening handshake (RFC 6455 section 4.2): parse, validate, answer.

wsproto defines the semantics.  Two parsers produce the same answer:

* :func:`parse_fast` handles the plain, common request (``GET``, HTTP/1.1,
  one line per header, no duplicated WebSocket headers) with a few bytes
  operations;
* :func:`parse_wsproto` hands anything else to wsproto's ``H11Handshake``.

:func:`parse_request` tries the fast path and falls back.  Both return a
:class:`Request` or raise :class:`~fastws.errors.HandshakeError` with the
status wsproto would answer with (400; 426 for a wrong version, with
``Sec-WebSocket-Version: 13``); a differential test feeds the same requests to
both.  fastws adds one check wsproto does not make: the key must be the
base64 encoding of 16 bytes (RFC 6455 4.2.1 item 5), else 400.

Nothing from wsproto or h11 outlives the handshake: the Request holds plain
strings.  The 101 response is written by :func:`accept_response` for both.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs

import h11
from wsproto import ConnectionType
from wsproto.events import Request as WsRequest
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from .errors import HandshakeError
from .frames import DeflateParams

# RFC 9110 token and field-value characters; anything else goes to h11.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_FIELD_VALUE = re.compile(rb"[\x20-\x7e\t]*\Z")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_VERSION_HEADER = [("Sec-WebSocket-Version", "13")]

# Headers that frame a request body: a request carrying one (valid or not)
# goes to wsproto, which decides how to answer it.
_BODY_HEADERS = frozenset((b"content-length", b"transfer-encoding"))

# Headers whose duplication changes the meaning; the fast path leaves those
# requests to wsproto.
_WS_HEADERS = frozenset(
    (
        b"connection",
        b"upgrade",
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    )
)


class _Fields:
    """Header and query access shared by :class:`Request` and :class:`HttpRequest`."""

    __slots__ = ()
    headers: list[tuple[str, str]]     # (what the subclasses hold)
    query_string: str

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (any case), else ``default``."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, first value of each."""
        return {k: v[0] for k, v in parse_qs(self.query_string).items()}


@dataclass(slots=True)
class Request(_Fields):
    """An upgrade request, as the application's ``on_connect`` sees it.

    ``headers`` is a list of ``(name, value)`` with lower-case names, in
    request order; ``header(name)`` returns the first value or None.
    """

    path: str
    query_string: str
    headers: list[tuple[str, str]]
    key: str
    subprotocols: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=list)
    conn: Any = field(default=None, repr=False)   # the connection asking (for remote_address)
    client: Any = field(default=None, repr=False)  # the client's address a trusted proxy named

    @property
    def remote_address(self) -> Any:
        """The client's (host, port): the one a trusted proxy named
        (``proxy_headers``), else the peer's, looked up on first use (a syscall)."""
        if self.client is not None:
            return self.client
        return self.conn.remote_address if self.conn is not None else None


    @property
    def origin(self) -> str | None:
        return self.header("origin")


def _split_tokens(value: str) -> list[str]:
    # wsproto's split_comma_header: empty pieces are kept, as wsproto does
    return [t.strip() for t in value.split(",")]


def _check_key(key: str) -> None:
    try:
        raw = binascii.a2b_base64(key.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key is not 16 base64-encoded bytes")


def _validate(method: str, connection: str | None, version: str | None, key: str | None, upgrade: str | None,
              host: str | None) -> None:
    """The checks, in h11's then wsproto's order, with wsproto's statuses."""
    if host is None:  # h11 refuses an HTTP/1.1 request without Host first
        raise HandshakeError(400, "Missing mandatory Host: header")
    if method != "GET":
        raise HandshakeError(400, "Request method must be GET")
    if connection is None or not any(t.lower() == "upgrade" for t in _split_tokens(connection)):
        raise HandshakeError(400, "Missing header, 'Connection: Upgrade'")
    if version != "13":
        raise HandshakeError(
            426 if version else 400, "Missing header, 'Sec-WebSocket-Version'", list(_VERSION_HEADER)
        )
    if key is None:
        raise HandshakeError(400, "Missing header, 'Sec-WebSocket-Key'")
    if (upgrade or "").lower() != "websocket":
        raise HandshakeError(400, "Missing header, 'Upgrade: websocket'")
    _check_key(key)


def _split_target(target: str) -> tuple[str, str]:
    path, _, query = target.partition("?")
    return path, query


def parse_fast(head: bytes) -> Request | None:
    """Parse a plain upgrade request; None if it is not plain (use wsproto)."""
    if not head.startswith(b"GET ") or not head.endswith(b"\r\n\r\n"):
        return None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    headers: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # a token name (so no folding, no space before the colon), a plain value
        if not sep or not _TOKEN.match(name) or not _FIELD_VALUE.match(value):
            return None
        lname = name.lower()
        if lname in _BODY_HEADERS:
            return None
        if lname in _WS_HEADERS:
            if lname in seen:
                return None
            seen.add(lname)
        try:
            headers.append((lname.decode("ascii"), value.strip(b" \t").decode("ascii")))
        except UnicodeDecodeError:
            return None
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    if any(c in target for c in " \t\x7f") or any(ord(c) < 32 for c in target):
        return None
    h = dict(headers)
    _validate(
        "GET",
        h.get("connection"),
        h.get("sec-websocket-version"),
        h.get("sec-websocket-key"),
        h.get("upgrade"),
        h.get("host"),
    )
    path, query = _split_target(target)
    return Request(
        path=path,
        query_string=query,
        headers=headers,
        key=h["sec-websocket-key"],
        subprotocols=_split_tokens(h["sec-websocket-protocol"]) if "sec-websocket-protocol" in h else [],
        extensions=_split_tokens(h["sec-websocket-extensions"]) if "sec-websocket-extensions" in h else [],
    )


def request_from_fields(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Request:
    """The upgrade request that another HTTP parser (the ASGI front's
    httptools) has already split into ``method``, ``target`` and ``headers``
    (``(lower-case name, value)`` bytes pairs, in order): the same checks
    and the same answer :func:`parse_request` gives for that request, without
    parsing it again.  A request that is not plain (a WebSocket header
    twice, bytes outside printable ASCII) is rebuilt and left to wsproto,
    which defines the semantics; that is rare and costs one more parse."""
    plain = method == b"GET" and target.startswith(b"/") and _FIELD_VALUE.match(target) is not None \
        and b" " not in target and b"\t" not in target
    out: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    if plain:
        for name, value in headers:
            if name in _BODY_HEADERS:
                plain = False
                break
            if name in _WS_HEADERS:
                if name in seen:
                    plain = False
                    break
                seen.add(name)
            if not _FIELD_VALUE.match(value):
                plain = False
                break
            out.append((name.decode("ascii"), value.strip(b" \t").decode("ascii")))
    if not plain:
        head = b"".join([method, b" ", target, b" HTTP/1.1\r\n",
                         *(b"%s: %s\r\n" % (k, v) for k, v in headers), b"\r\n"])
        return parse_wsproto(head)
    h = dict(out)
    _validate("GET", h.get("connection"), h.get("sec-websocket-version"), h.get("sec-websocket-key"),
              h.get("upgrade"), h.get("host"))
    path, query = _split_target(target.decode("ascii"))
    return Request(
        path=path,
        query_string=query,
        headers=out,
        key=h["sec-websocket-key"],
        subprotocols=_split_tokens(h["sec-websocket-protocol"]) if "sec-websocket-protocol" in h else [],
        extensions=_split_tokens(h["sec-websocket-extensions"]) if "sec-websocket-extensions" in h else [],
    )


def parse_wsproto(head: bytes) -> Request:
    """Parse any upgrade request with wsproto's server handshake."""
    hs = H11Handshake(ConnectionType.SERVER)
    try:
        hs.receive_data(head)
        events = list(hs.events())
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        status = getattr(hint, "status_code", 400) or 400
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in (getattr(hint, "headers", None) or [])]
        raise HandshakeError(status, str(exc), headers) from None
    except (h11.RemoteProtocolError, ValueError, UnicodeError) as exc:
        raise HandshakeError(400, f"malformed request: {exc}") from None
    req = next((e for e in events if isinstance(e, WsRequest)), None)
    if req is None:
        raise HandshakeError(400, "incomplete request")
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in req.extra_headers]
    key = dict(headers).get("sec-websocket-key", "")
    _check_key(key)
    path, query = _split_target(req.target)
    # wsproto drops these from extra_headers; keep them visible to the app.
    headers.append(("host", req.host))
    return Request(
        path=path,
        query_string=query,
        headers=headers,
        key=key,
        subprotocols=list(req.subprotocols),
        extensions=list(cast("Sequence[str]", req.extensions)),   # a server's are offers: str
    )


def parse_request(head: bytes) -> Request:
    """Fast path for the plain request, wsproto for everything else."""
    req = parse_fast(head)
    if req is None:
        req = parse_wsproto(head)
    return req


@dataclass(slots=True)
class HttpRequest(_Fields):
    """A plain (non-upgrade) HTTP request to one of the server's HTTP routes
    (``/health``, ``/metrics``, ``POST /publish`` ...)."""

    method: str
    path: str
    query_string: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    remote_address: Any = None



def parse_http_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]] | None:
    """Method, target and lower-cased headers of a request head, or None if
    it is not a well-formed HTTP/1.x request head."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else None
    if not lines:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not _TOKEN.match(parts[0]):
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name) or not _FIELD_VALUE.match(value.strip(b" \t")):
            return None
        headers.append((name.lower().decode("ascii"), value.strip(b" \t").decode("latin-1")))
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return parts[0].decode("ascii"), target, headers


def http_response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
                  headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    for k, v in headers:
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def accept_key(key: str) -> str:
    return binascii.b2a_base64(hashlib.sha1(key.encode("ascii") + _GUID).digest(),
                               newline=False).decode("ascii")


def negotiate_deflate(offers: list[str], *, server_no_context_takeover: bool = False,
                      client_no_context_takeover: bool = False) -> tuple[str | None, DeflateParams | None]:
    """Run wsproto's permessage-deflate negotiation on the client's offers.

    Returns ``(header_value_or_None, DeflateParams_or_None)``.
    """
    if not offers:
        return None, None
    from wsproto.extensions import PerMessageDeflate
    from wsproto.handshake import server_extensions_handshake

    ext = PerMessageDeflate(
        client_no_context_takeover=client_no_context_takeover,
        server_no_context_takeover=server_no_context_takeover,
    )
    header = server_extensions_handshake(offers, [ext])
    if header is None or not ext.enabled():
        return None, None
    params = DeflateParams(
        server_no_context_takeover=ext.server_no_context_takeover,
        client_no_context_takeover=ext.client_no_context_takeover,
        server_max_window_bits=ext.server_max_window_bits,
        client_max_window_bits=ext.client_max_window_bits,
    )
    return header.decode("ascii"), params


def accept_response(request: Request, subprotocol: str | None = None, extensions_header: str | None = None,
                    headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The 101 Switching Protocols response."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Accept: " + accept_key(request.key),
    ]
    if subprotocol:
        lines.append("Sec-WebSocket-Protocol: " + subprotocol)
    if extensions_header:
        lines.append("Sec-WebSocket-Extensions: " + extensions_header)
    for k, v in headers:
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, body: str = "", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A plain-text HTTP error response that closes the connection."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    payload = (body or phrase).encode("utf-8") + b"\n"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    for k, v in headers:
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


# -- the client side (RFC 6455 4.1): the request a client sends, the 101 it checks --------

#: permessage-deflate, the one extension fastws speaks
DEFLATE = "permessage-deflate"


def client_key() -> str:
    """A fresh ``Sec-WebSocket-Key``: 16 random bytes, base64 (as wsproto's)."""
    return binascii.b2a_base64(os.urandom(16), newline=False).decode("ascii")


def deflate_offer(*, client_no_context_takeover: bool = False, server_no_context_takeover: bool = False,
                  client_max_window_bits: int = 15, server_max_window_bits: int = 15) -> str:
    """The permessage-deflate offer of a client, written as wsproto's
    ``PerMessageDeflate.offer()`` writes it (both window sizes, then the
    no_context_takeover flags)."""
    for bits in (client_max_window_bits, server_max_window_bits):
        if not 9 <= bits <= 15:
            raise ValueError("window bits must be 9..15")
    params = [DEFLATE, f"client_max_window_bits={client_max_window_bits}",
              f"server_max_window_bits={server_max_window_bits}"]
    if client_no_context_takeover:
        params.append("client_no_context_takeover")
    if server_no_context_takeover:
        params.append("server_no_context_takeover")
    return "; ".join(params)


def client_request(host: str, path: str = "/", key: str | None = None, subprotocols: Sequence[str] = (),
                   extensions: Sequence[str] = (),
                   headers: Iterable[tuple[str | bytes, str | bytes]] = ()) -> bytes:
    """The opening handshake request of a client, byte for byte what
    wsproto's client handshake writes for the same arguments: ``GET path``,
    ``Host``, ``Upgrade: websocket``, ``Connection: Upgrade``,
    ``Sec-WebSocket-Key`` (``key``, else :func:`client_key`),
    ``Sec-WebSocket-Version: 13``, ``Sec-WebSocket-Protocol`` (the
    ``subprotocols``, comma-joined), ``Sec-WebSocket-Extensions`` (the
    ``extensions`` offers, e.g. :func:`deflate_offer`, comma-joined), then
    ``headers`` (``(name, value)`` pairs, str or bytes).  ``path`` may carry a
    query string.  Refuses (ValueError) what cannot go in a request head:
    a control character, space or non-ASCII byte in the path, CR/LF in a value."""
    if not path.startswith("/") or not path.isascii() or any(c in path for c in " \t\x7f") \
            or any(ord(c) < 32 for c in path):
        raise ValueError(f"bad request path {path!r}")
    if key is None:
        key = client_key()
    lines = [f"GET {path} HTTP/1.1".encode("ascii"),
             b"Host: " + host.encode("idna"),
             b"Upgrade: websocket",
             b"Connection: Upgrade",
             b"Sec-WebSocket-Key: " + key.encode("ascii"),
             b"Sec-WebSocket-Version: 13"]
    if subprotocols:
        lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(subprotocols).encode("ascii"))
    if extensions:
        lines.append(b"Sec-WebSocket-Extensions: " + ", ".join(extensions).encode("ascii"))
    for name, value in headers:
        raw_name = name.encode("ascii") if isinstance(name, str) else bytes(name)
        raw_value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
        if not _TOKEN.match(raw_name) or b"\r" in raw_value or b"\n" in raw_value or b"\x00" in raw_value:
            raise ValueError(f"bad header {raw_name!r}: {raw_value!r}")
        lines.append(raw_name + b": " + raw_value.strip(b" \t"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass(slots=True)
class ClientAccept:
    """What a server's 101 answer agreed to (see :func:`check_accept`)."""

    subprotocol: str | None                 # the server's choice, one of those offered
    extensions: list[str]                   # the accepted extensions, as the server wrote them
    deflate: DeflateParams | None = None    # permessage-deflate, negotiated (client: swap roles)
    headers: list[tuple[str, str]] = field(default_factory=list)   # the other headers, (lower-case name, value)


def _response_head(head: bytes) -> tuple[int, list[tuple[str, str]]] | None:
    """Status and ``(lower-case name, value)`` headers of a response head, or None."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = head[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 \
            or not parts[1].isdigit():
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if not sep or not _TOKEN.match(name) or any(b < 0x20 and b != 0x09 or b == 0x7F for b in value):
            return None
        headers.append((name.lower().decode("ascii"), value.decode("latin-1")))
    return int(parts[1]), headers


def check_accept(response_head: bytes, key: str, subprotocols: Sequence[str] = (),
                 extensions: Iterable[str] = ()) -> ClientAccept:
    """Check the server's answer to :func:`client_request` (its head, up to
    and including the blank line; bytes after it are not looked at) with
    wsproto's client semantics, in wsproto's order: the status must be 101,
    ``Connection`` must hold the token ``upgrade``, ``Upgrade`` must be
    ``websocket`` (any case), ``Sec-WebSocket-Accept`` must be the one
    ``key`` calls for, a ``Sec-WebSocket-Protocol`` must be one of the
    ``subprotocols`` offered, and every accepted extension one of the
    ``extensions`` offered (by name).  For a repeated header the last one
    counts, as in wsproto.

    Returns a :class:`ClientAccept`; its ``deflate`` holds the negotiated
    permessage-deflate parameters (the offer's, updated by what the server
    wrote, as wsproto's ``finalize``), to be given to
    ``Engine(client=True, deflate=...)``.  Raises
    :class:`~fastws.errors.HandshakeError` otherwise, with ``status`` the
    response's status (101 when the 101 itself is wrong, 0 when the bytes
    are no HTTP response head) and, for a refusal, its ``headers`` (e.g.
    ``Retry-After``)."""
    parsed = _response_head(bytes(response_head))
    if parsed is None:
        raise HandshakeError(0, "not an HTTP response head")
    status, headers = parsed
    if status != 101:
        raise HandshakeError(status, f"the server answered {status} instead of 101", headers)
    connection: list[str] | None = None
    accepted: list[str] | None = None
    accept: str | None = None
    subprotocol: str | None = None
    upgrade = ""
    extra: list[tuple[str, str]] = []
    for name, value in headers:
        if name == "connection":
            connection = _split_tokens(value)
        elif name == "sec-websocket-extensions":
            accepted = _split_tokens(value)
        elif name == "sec-websocket-accept":
            accept = value
        elif name == "sec-websocket-protocol":
            subprotocol = value
        elif name == "upgrade":
            upgrade = value
        else:
            extra.append((name, value))
    if connection is None or not any(t.lower() == "upgrade" for t in connection):
        raise HandshakeError(101, "Missing header, 'Connection: Upgrade'")
    if upgrade.lower() != "websocket":
        raise HandshakeError(101, "Missing header, 'Upgrade: websocket'")
    if accept != accept_key(key):
        raise HandshakeError(101, "Bad accept token")
    if subprotocol is not None and subprotocol not in subprotocols:
        raise HandshakeError(101, f"unrecognized subprotocol {subprotocol}")
    offers: dict[str, str] = {}
    for offer in extensions:
        offers.setdefault(offer.split(";", 1)[0].strip(), offer)
    deflate: DeflateParams | None = None
    for ext in accepted or ():
        name = ext.split(";", 1)[0].strip()
        if name not in offers:
            raise HandshakeError(101, f"unrecognized extension {name}")
        if name == DEFLATE:
            deflate = _finalize_deflate(offers[name], ext)
    return ClientAccept(subprotocol, list(accepted or ()), deflate, extra)


def _finalize_deflate(offer: str, accept: str) -> DeflateParams:
    """The parameters a client negotiated: those of its ``offer``, updated
    by the server's ``accept`` (wsproto's ``PerMessageDeflate.finalize``)."""
    state: dict[str, Any] = {"client_no_context_takeover": False, "server_no_context_takeover": False,
             "client_max_window_bits": 15, "server_max_window_bits": 15}
    for text in (offer, accept):
        for bit in (b.strip() for b in text.split(";")[1:]):
            for flag in ("client_no_context_takeover", "server_no_context_takeover"):
                if bit.startswith(flag):
                    state[flag] = True
                    break
            else:
                for bits in ("client_max_window_bits", "server_max_window_bits"):
                    if bit.startswith(bits):
                        try:
                            n = int(bit.split("=", 1)[1].strip())
                        except (IndexError, ValueError):
                            raise HandshakeError(101, f"bad permessage-deflate parameter {bit!r}") from None
                        if not 9 <= n <= 15:
                            raise HandshakeError(101, f"permessage-deflate {bits}={n} is not 9..15")
                        state[bits] = n
                        break
    return DeflateParams(**state)
