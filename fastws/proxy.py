"""Who the client is behind a reverse proxy: trusted ``X-Forwarded-*`` and ``Forwarded``.

Behind nginx or HAProxy every TCP peer of the server is the proxy.  With the
``proxy_headers`` setting on, a request whose direct peer is one of
``forwarded_allow_ips`` (addresses and networks, ``*`` for any peer) is taken
to come from the client those headers name:

* ``X-Forwarded-For: client, proxy1, proxy2`` - each proxy appends the
  address it got the request from, so the list is read from the right: the
  first entry that is not a trusted proxy is the client (a client may write
  anything at the left; what a trusted proxy appended is true).  When every
  entry is trusted, the left-most one is the client.
  ``X-Forwarded-Proto`` (``https``/``http``, ``wss``/``ws``) gives the scheme:
  the entry at the client's position when the two lists have the same
  length, else the right-most one (the nearest proxy's);
* ``Forwarded: for=...;proto=...`` (RFC 7239), read the same way, the
  ``proto`` of the chosen element - used only when there is no
  ``X-Forwarded-For`` (nginx and HAProxy write the latter; a proxy that
  writes only ``Forwarded`` must drop a client's ``X-Forwarded-For``).

A peer that is not trusted is the client whatever its headers say (a
spoofed ``X-Forwarded-For`` is ignored), and so is a trusted peer whose
header holds no address (``unknown``, an obfuscated ``_name``, garbage).
A peer on a Unix socket (``--uds``: it has no address) is trusted: only a
process of this machine allowed to open the socket file can be one.

:func:`client_key` is the key per-client limits count under: the address
itself for IPv4 (an IPv4-mapped IPv6 address too), the /64 network for
IPv6 (one subscriber usually holds a whole /64, so per-address limits would
limit nothing there).

Layer 1: plain functions on strings, no I/O.
"""

from __future__ import annotations

import ipaddress

__all__ = ["TrustedProxies", "client_key", "parse_networks"]

#: the schemes X-Forwarded-Proto / Forwarded proto= may name; True: secure
_SCHEMES = {"http": False, "ws": False, "https": True, "wss": True}


def parse_networks(value: str) -> tuple:
    """``(any, networks)`` from a comma-separated list of IP addresses and
    CIDR networks, or ``*`` (any peer); ValueError names a bad entry."""
    items = [x.strip() for x in (value or "").split(",") if x.strip()]
    if "*" in items:
        if len(items) > 1:
            raise ValueError("'*' trusts every peer; list nothing else with it")
        return True, ()
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return False, tuple(nets)


def _ip(host):
    """The ``ipaddress`` object of ``host`` (str), or None; an IPv4-mapped
    IPv6 address becomes its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_keys: dict = {}            # IPv6 host -> its key (bounded): ipaddress costs microseconds


def client_key(host) -> str:
    """The key a client is counted under by per-client limits (see the module
    docstring); a host that is no IP address is its own key.  An IPv4
    address is its own key as given (the kernel's peer names and the
    addresses :class:`TrustedProxies` returns are canonical already)."""
    if not isinstance(host, str):
        return str(host)
    if ":" not in host:
        return host
    key = _keys.get(host)
    if key is not None:
        return key
    ip = _ip(host.split("%", 1)[0])          # fe80::1%eth0: the zone is no part of it
    if ip is None:
        key = host
    elif ip.version == 4:                    # IPv4-mapped
        key = str(ip)
    else:
        key = str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    if len(_keys) < 4096:
        _keys[host] = key
    return key


def _split_host_port(entry: str):
    """``(ip string, port)`` of an X-Forwarded-For / Forwarded ``for`` entry:
    ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]:443``;
    None when it names no IP address."""
    entry = entry.strip().strip('"').strip()
    port = 0
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep:
            return None
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        elif rest:
            return None
    elif entry.count(":") == 1:              # IPv4 with a port
        host, _, p = entry.partition(":")
        if not p.isdigit():
            return None
        port = int(p)
    else:
        host = entry
    ip = _ip(host)
    if ip is None or port > 65535:
        return None
    return str(ip), port


def _split_list(value: str) -> list:
    """The comma-separated entries of a header value, commas inside quoted
    strings kept (RFC 7230 section 7 list syntax)."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [x for x in out if x]


def _forwarded_elements(value: str) -> list:
    """``[(for, proto), ...]`` of a ``Forwarded`` header (RFC 7239), None for
    a missing parameter."""
    out = []
    for element in _split_list(value):
        params = {}
        for pair in element.split(";"):
            name, sep, v = pair.partition("=")
            if sep:
                params[name.strip().lower()] = v.strip().strip('"')
        out.append((params.get("for"), params.get("proto")))
    return out


class TrustedProxies:
    """Which direct peers may name the client, and the client they name.

    ``allow``: ``forwarded_allow_ips`` (``"127.0.0.1,10.0.0.0/8"``, ``"*"``).
    """

    __slots__ = ("any", "networks", "_cache")

    def __init__(self, allow: str = "127.0.0.1") -> None:
        self.any, self.networks = parse_networks(allow)
        self._cache: dict = {}     # peer host -> trusted (bounded)

    def trusts(self, host) -> bool:
        """Is ``host`` (an address string) a trusted proxy?"""
        if self.any:
            return True
        hit = self._cache.get(host)
        if hit is not None:
            return hit
        ip = _ip(host.split("%", 1)[0]) if isinstance(host, str) else None
        ok = ip is not None and any(ip in net for net in self.networks if net.version == ip.version)
        if len(self._cache) < 1024:
            self._cache[host] = ok
        return ok

    def resolve(self, peer, forwarded_for=None, forwarded_proto=None, forwarded=None):
        """``(client, secure)``: the client's ``(host, port)`` and whether it
        spoke TLS to the first proxy (None: not said, keep the connection's
        own scheme).  ``peer`` is the direct peer ``(host, port, ...)``; the
        other arguments are the values of ``X-Forwarded-For``,
        ``X-Forwarded-Proto`` and ``Forwarded`` (several lines of one header
        joined with commas), or None."""
        if isinstance(peer, tuple) and peer:
            if not self.trusts(peer[0]):
                return peer, None
        elif peer:
            return peer, None         # not an address we know how to check
        # else a Unix-socket peer (no address): a process on this machine, trusted
        if forwarded_for:
            entries = _split_list(forwarded_for)
            protos = _split_list(forwarded_proto) if forwarded_proto else []
            i = self._pick([_split_host_port(e) for e in entries])
            if i is None:
                return peer, None
            proto = None
            if protos:
                proto = protos[i] if len(protos) == len(entries) else protos[-1]
            return _split_host_port(entries[i]), _SCHEMES.get((proto or "").strip().lower())
        if forwarded:
            elements = _forwarded_elements(forwarded)
            i = self._pick([_split_host_port(f) if f else None for f, _ in elements])
            if i is None:
                return peer, None
            proto = elements[i][1]
            return _split_host_port(elements[i][0]), _SCHEMES.get((proto or "").strip().lower())
        protos = _split_list(forwarded_proto) if forwarded_proto else []
        if protos:              # a proxy that says the scheme only
            return peer, _SCHEMES.get(protos[-1].lower())
        return peer, None

    def _pick(self, hops: list):
        """The index of the client among ``hops`` (parsed entries, left to
        right): the right-most one that is not trusted, else the left-most;
        None when that entry names no address."""
        for i in range(len(hops) - 1, -1, -1):
            hop = hops[i]
            if hop is None:
                return None
            if not self.trusts(hop[0]):
                return i
        return 0 if hops else None
