"""Which browser pages may open a WebSocket, and which hosts reach the
operations endpoints: the ``allowed_origins`` and ``ops_hosts`` settings.

Layer 1 (with :mod:`fastws.config`, which validates both settings with it):
plain functions on strings, nothing of fastws imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^\s/?#@:\[\]]+)(?::([0-9]{1,5}))?\Z", re.I)
_HOSTPORT = re.compile(r"(\[[0-9a-f:.]+\]|[^\s/?#@:\[\]]+)(?::([0-9]{1,5}))?\Z", re.I)


class HasHeaders(Protocol):
    """What :meth:`OriginPolicy.allows_request` reads of a request
    (:class:`fastws.Request` has both)."""

    @property
    def headers(self) -> Iterable[tuple[str, str]]: ...

    def header(self, name: str) -> str | None: ...


def _split_origin(value: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of a serialized origin (lower-case scheme and
    host; the scheme's default port when none is written), else None."""
    m = _ORIGIN.match(value)
    if m is None:
        return None
    scheme = m.group(1).lower()
    port = int(m.group(3)) if m.group(3) else _DEFAULT_PORTS.get(scheme)
    return scheme, m.group(2).lower(), port


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``(host, port or None)`` of a Host header value, else None."""
    m = _HOSTPORT.match(value)
    if m is None:
        return None
    return m.group(1).lower(), int(m.group(2)) if m.group(2) else None


def _same_host(origin: str, host: str | None) -> bool:
    """The browser page's origin names the host[:port] the request was sent
    to (its ``Host``): http(s) scheme, same host name (any case), same port
    (a port left out is the scheme's default)."""
    if host is None:
        return False
    scheme, sep, rest = origin.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        return False
    if rest and rest.lower() == host.lower():
        return True                     # the test the C fast path makes
    o = _split_origin(origin)
    h = _split_host(host)
    if o is None or h is None:
        return False
    return o[1] == h[0] and o[2] == (h[1] if h[1] is not None else _DEFAULT_PORTS[scheme])


class OriginPolicy:
    """Which browser pages may open a WebSocket (RFC 6455 10.2): the answer
    to cross-site WebSocket hijacking, where a page on another site opens a
    WebSocket to this server with the user's cookies.

    Built from the ``allowed_origins`` setting, a list of:

    * ``same-host`` (the default) - a page whose origin's host[:port] is the
      request's ``Host``;
    * ``*`` - every origin (the check is off);
    * an origin, ``https://app.example.com`` or ``http://localhost:3000``:
      exact match of scheme, host (any case) and port (the scheme's default
      when left out);
    * ``https://*.example.com`` - any subdomain of example.com (not
      example.com itself) with that scheme and port;
    * ``null`` - the opaque origin of sandboxed frames and local files.

    ``same-host`` may be combined with origins.  A request without an
    ``Origin`` header is not from a browser (browsers always send one on a
    WebSocket upgrade) and is always allowed; cookies are no threat there.
    The check keeps browser pages out; it authenticates nobody.
    """

    __slots__ = ("any", "same_host", "exact", "suffixes", "spec")

    def __init__(self, spec: str | Iterable[object]) -> None:
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else \
            [str(s).strip() for s in spec]
        items = [s for s in items if s]
        if not items:
            raise ValueError("an empty list of origins; give same-host, * or origins")
        self.any = "*" in items
        self.same_host = False
        self.exact: set[str] = set()       # normalized origins: "scheme://host:port", or "null"
        self.suffixes: list[tuple[str, str, int | None]] = []   # (scheme, ".example.com", port) of wildcards
        for item in items:
            low = item.lower()
            if low in ("*", "same-host"):
                self.same_host |= low == "same-host"
                continue
            if low == "null":
                self.exact.add("null")
                continue
            wildcard = "://*." in item
            o = _split_origin(item.replace("://*.", "://", 1) if wildcard else item)
            if o is None or (o[2] is not None and not 0 < o[2] < 65536):
                raise ValueError(f"{item!r} is no origin (scheme://host[:port], https://*.example.com, "
                                 "null, same-host or *)")
            if wildcard:
                self.suffixes.append((o[0], "." + o[1], o[2]))
            else:
                self.exact.add(f"{o[0]}://{o[1]}:{o[2]}")
        self.spec = ",".join(items)

    @property
    def fast_mode(self) -> str:
        """What the C fast path may decide alone (``Hub.set_fast_upgrade(origins=)``):
        ``"*"`` every request, ``"same-host"`` requests without Origin or with
        a same-host one, ``"none"`` requests without Origin only."""
        if self.any:
            return "*"
        return "same-host" if self.same_host else "none"

    def allows(self, origin: str | None, host: str | None) -> bool:
        """May a request with this ``Origin`` value (None: no header) sent to
        ``Host`` ``host`` be upgraded?"""
        if origin is None or self.any:
            return True
        if self.same_host and _same_host(origin, host):
            return True
        if origin.strip().lower() == "null":
            return "null" in self.exact
        o = _split_origin(origin.strip())
        if o is None:
            return False
        if f"{o[0]}://{o[1]}:{o[2]}" in self.exact:
            return True
        return any(o[0] == s and o[1].endswith(suf) and o[2] == p for s, suf, p in self.suffixes)

    def allows_request(self, request: HasHeaders) -> bool:
        """``allows`` for every ``Origin`` header of an upgrade ``request``
        (a :class:`Request`; a request with several must pass with each)."""
        if self.any:
            return True
        host = request.header("host")
        return all(self.allows(v, host) for k, v in request.headers if k == "origin")

    def __repr__(self) -> str:
        return f"OriginPolicy({self.spec!r})"


def ops_host_set(spec: str | Iterable[object]) -> frozenset[str]:
    """The host names of the ``ops_hosts`` setting (lower case, no brackets
    around an IPv6 address); ValueError for an entry that is no host name."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    out: set[str] = set()
    for item in items:
        if not item:
            continue
        name = item.lower()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if (not re.fullmatch(r"[a-z0-9._:-]+", name) or name.count(":") == 1
                or name.startswith(".")):
            raise ValueError(f"{item!r} is no host name (give names without scheme or port)")
        out.add(name)
    return frozenset(out)


def host_name(host: str | None) -> str | None:
    """The host name of a ``Host`` header value: lower case, without the port
    and without the brackets of an IPv6 address; None if there is none."""
    if not host:
        return None
    h = _split_host(host.strip())
    if h is None:
        return None
    name = h[0]
    return name[1:-1] if name.startswith("[") else name


__all__ = ["OriginPolicy", "ops_host_set", "host_name"]
