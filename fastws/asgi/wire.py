"""The HTTP/1.1 bytes the ASGI front writes, and what many scopes share.

* status lines and response heads (:func:`response_head`,
  :func:`plain_response`), with a ``Date`` clock formatted at most once a
  second;
* bounded tables that make what is the same on most connections one shared
  object: header names and common header pairs, paths, request targets,
  client hosts and the server address.  An idle WebSocket keeps its scope
  for as long as it lives, so this is most of what an ASGI WebSocket costs
  beyond the application's own objects (see docs/asgi.md).  Bytes and str
  objects are immutable, so sharing them is invisible to applications.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote

import httptools

ASGI_HTTP = {"version": "3.0", "spec_version": "2.4"}
ASGI_WS = {"version": "3.0", "spec_version": "2.4"}
ASGI_LIFESPAN = {"version": "3.0", "spec_version": "2.0"}

class _Clock:
    """The Date header, formatted at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


clock = _Clock()


# -- sharing what many connections have in common ----------------------------
#
# An idle WebSocket keeps its scope for as long as it lives, so what is the
# same on most connections (header names, values such as "websocket" or the
# Host, paths, the server address, the client's host) is one shared object,
# looked up in bounded tables (at most INTERN_MAX entries each; past that,
# new values are simply not shared).  Bytes and str objects are immutable, so
# sharing them is invisible to applications.

INTERN_MAX = 4096           # entries per table
INTERN_LEN_MAX = 256        # longer names, values, paths and targets are never shared

#: headers whose values repeat across clients (values of others, e.g.
#: sec-websocket-key, cookie or authorization, are per connection)
_SHARED_VALUE_HEADERS = frozenset((
    b"host", b"upgrade", b"connection", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"origin", b"user-agent", b"accept", b"accept-encoding",
    b"accept-language", b"cache-control", b"pragma", b"content-type", b"dnt", b"te",
    b"sec-fetch-dest", b"sec-fetch-mode", b"sec-fetch-site", b"sec-ch-ua", b"sec-ch-ua-mobile",
    b"sec-ch-ua-platform", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
))
_header_names: dict = {}    # name as sent -> lower-case name (shared)
_header_pairs: dict = {}    # (name as sent, value) -> shared (lower-case name, value) tuple
_interned: dict = {}        # str/bytes -> the shared equal object (paths, hosts, ...)
_targets: dict = {}         # request target -> (raw_path, path, query_string), no query only


def intern(value):
    shared = _interned.get(value)
    if shared is None:
        if len(_interned) < INTERN_MAX and len(value) <= INTERN_LEN_MAX:
            _interned[value] = value
        return value
    return shared


def header_pair(name: bytes, value: bytes) -> tuple:
    """``(lower-case name, value)`` for a scope's header list, shared when
    the same header line was seen before."""
    pair = _header_pairs.get((name, value))
    if pair is not None:
        return pair
    lname = _header_names.get(name)
    if lname is None:
        lname = name.lower()
        if len(_header_names) < INTERN_MAX and len(name) <= INTERN_LEN_MAX:
            _header_names[name] = lname
    pair = (lname, value)
    if (lname in _SHARED_VALUE_HEADERS and len(value) <= INTERN_LEN_MAX
            and len(_header_pairs) < INTERN_MAX):
        _header_pairs[(name, value)] = pair
    return pair


def address(info):
    if isinstance(info, tuple) and len(info) >= 2:
        return (intern(str(info[0])), int(info[1]))
    return None


_local_addrs: dict = {}     # sockname -> the shared scope["server"] tuple


def local_address(info):
    shared = _local_addrs.get(info)
    if shared is None:
        shared = address(info)
        if len(_local_addrs) < 64:
            _local_addrs[info] = shared
    return shared


def split_target(url: bytes) -> tuple:
    """``(raw_path, path, query_string)`` of a request target, shared for
    targets seen before (those without a query string)."""
    shared = _targets.get(url)
    if shared is not None:
        return shared
    parsed = httptools.parse_url(url)
    raw_path = parsed.path or b"/"
    query = parsed.query or b""
    out = (raw_path, unquote(raw_path.decode("latin-1")), query)
    if not query and len(_targets) < INTERN_MAX and len(url) <= INTERN_LEN_MAX:
        _targets[url] = out
    return out


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


_STATUS_LINES = {s: _status_line(s) for s in (101, 200, 201, 204, 301, 302, 304, 400, 401,
                                              403, 404, 405, 413, 422, 500, 503)}


def response_head(status: int, headers) -> list:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _status_line(status)
    out = [line]
    for name, value in headers:
        out.append(b"%s: %s\r\n" % (bytes(name), bytes(value)))
    return out


def plain_response(status: int, body: bytes, keep_alive: bool = False) -> bytes:
    head = response_head(status, [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"date", clock.date()),
        (b"connection", b"keep-alive" if keep_alive else b"close"),
    ])
    head.append(b"\r\n")
    return b"".join(head) + body


def is_disconnect(exc) -> bool:
    """An exception that only says the client went away (ours, or a
    framework's WebSocketDisconnect / ClientDisconnect)."""
    return isinstance(exc, OSError) or any(
        c.__name__ in ("WebSocketDisconnect", "ClientDisconnect") for c in type(exc).__mro__)
