"""Engine.IO v4 and Socket.IO v5 packets over WebSocket: encode and decode.

Over the WebSocket transport one WebSocket message is one Engine.IO packet:
a text message starts with the packet type (``0`` open, ``1`` close, ``2``
ping, ``3`` pong, ``4`` message, ``5`` upgrade, ``6`` noop); a binary
message is a binary Engine.IO message with no type byte.

A Socket.IO packet rides in an Engine.IO message (``4``)::

    <type>[<attachments>-][<namespace>,][<ack id>][<JSON>]

with the types ``0`` CONNECT, ``1`` DISCONNECT, ``2`` EVENT, ``3`` ACK,
``4`` CONNECT_ERROR, ``5`` BINARY_EVENT, ``6`` BINARY_ACK; the namespace is
left out for ``/``.  A binary packet replaces each ``bytes`` value of its
data by ``{"_placeholder": true, "num": i}`` and is followed by one binary
WebSocket message per attachment, in order.

Examples::

    42["chat",{"text":"hi"}]           EVENT "chat" on "/"
    42/admin,17["list"]                EVENT "list" on "/admin", asking for ack 17
    43/admin,17[["a","b"]]             ACK 17 with one argument
    451-["file",{"_placeholder":true,"num":0}]   + one binary message

Nothing here touches a socket: text in, packets out, and the reverse.
"""

from __future__ import annotations

import json

# Engine.IO packet types (the first character of a text message)
EIO_OPEN, EIO_CLOSE, EIO_PING, EIO_PONG, EIO_MESSAGE, EIO_UPGRADE, EIO_NOOP = "0123456"

# Socket.IO packet types
CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)

#: most attachments one binary packet may announce (socket.io-parser's default)
MAX_ATTACHMENTS = 10
#: longest ack id accepted, in digits (socket.io-parser refuses longer ones)
MAX_ID_DIGITS = 15

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


class PacketError(ValueError):
    """A message that is no valid Socket.IO packet (the connection is closed
    with 1007)."""


def dumps(value) -> str:
    """Compact JSON, as the Socket.IO parsers write it."""
    return _dumps(value)


def args_of(data) -> list:
    """The event arguments of python-socketio's ``data``: None -> none, a
    tuple -> one argument per item, anything else -> one argument."""
    if data is None:
        return []
    if type(data) is tuple:
        return list(data)
    return [data]


def has_binary(value) -> bool:
    """Does ``value`` hold a ``bytes``-like value anywhere?"""
    t = type(value)
    if t is bytes or t is bytearray or t is memoryview:
        return True
    if t is list or t is tuple:
        return any(has_binary(v) for v in value)
    if t is dict:
        return any(has_binary(v) for v in value.values())
    return False


def deconstruct(value, attachments: list):
    """``value`` with each binary value replaced by its placeholder; the
    values go to ``attachments`` in order."""
    t = type(value)
    if t is bytes or t is bytearray or t is memoryview:
        attachments.append(bytes(value))
        return {"_placeholder": True, "num": len(attachments) - 1}
    if t is list or t is tuple:
        return [deconstruct(v, attachments) for v in value]
    if t is dict:
        return {k: deconstruct(v, attachments) for k, v in value.items()}
    return value


def reconstruct(value, attachments: list):
    """The reverse of :func:`deconstruct`; PacketError for a placeholder
    that names no attachment."""
    t = type(value)
    if t is list:
        return [reconstruct(v, attachments) for v in value]
    if t is dict:
        if value.get("_placeholder") is True and "num" in value:
            num = value["num"]
            if type(num) is not int or not 0 <= num < len(attachments):
                raise PacketError("a placeholder names no attachment")
            return attachments[num]
        return {k: reconstruct(v, attachments) for k, v in value.items()}
    return value


def prefix(ptype: int, namespace: str, ack_id=None, attachments: int = 0) -> str:
    """The Engine.IO message + Socket.IO header before the JSON."""
    head = f"4{ptype}"
    if attachments:
        head += f"{attachments}-"
    if namespace != "/":
        head += namespace + ","
    if ack_id is not None:
        head += str(ack_id)
    return head


def encode(ptype: int, namespace: str, data, ack_id=None) -> tuple:
    """``(text, attachments)``: the text message of a Socket.IO packet of
    ``ptype`` (EVENT or ACK: turned into BINARY_EVENT / BINARY_ACK when
    ``data`` holds bytes) and the binary messages that follow it (an empty
    tuple for a plain packet)."""
    if data is not None and has_binary(data):
        attachments: list = []
        data = deconstruct(data, attachments)
        ptype = BINARY_EVENT if ptype == EVENT else BINARY_ACK if ptype == ACK else ptype
        return prefix(ptype, namespace, ack_id, len(attachments)) + _dumps(data), tuple(attachments)
    head = prefix(ptype, namespace, ack_id)
    return (head if data is None else head + _dumps(data)), ()


def open_packet(sid: str, ping_interval: float, ping_timeout: float, max_payload: int) -> str:
    """The Engine.IO open packet of a WebSocket-only server."""
    return EIO_OPEN + _dumps({"sid": sid, "upgrades": [], "pingInterval": int(ping_interval * 1000),
                              "pingTimeout": int(ping_timeout * 1000), "maxPayload": int(max_payload)})


class Packet:
    """One decoded Socket.IO packet (its attachments not yet joined)."""

    __slots__ = ("type", "namespace", "id", "data", "attachments")

    def __init__(self, ptype: int, namespace: str, ack_id, data, attachments: int) -> None:
        self.type = ptype
        self.namespace = namespace
        self.id = ack_id
        self.data = data
        self.attachments = attachments


def decode(text: str) -> Packet:
    """The Socket.IO packet in the Engine.IO message body ``text`` (after
    the ``4``).  PacketError when it is not one."""
    n = len(text)
    if not n:
        raise PacketError("empty Socket.IO packet")
    c = text[0]
    if not ("0" <= c <= "6"):
        raise PacketError(f"unknown Socket.IO packet type {c!r}")
    ptype = ord(c) - 48
    i = 1
    attachments = 0
    if ptype in (BINARY_EVENT, BINARY_ACK):
        dash = text.find("-", 1)
        count = text[1:dash]
        if dash < 0 or not count.isdigit() or not count.isascii() or len(count) > 3:
            raise PacketError("a binary packet without its attachment count")
        attachments = int(count)
        if attachments > MAX_ATTACHMENTS:
            raise PacketError(f"more than {MAX_ATTACHMENTS} attachments")
        i = dash + 1
    namespace = "/"
    if i < n and text[i] == "/":
        comma = text.find(",", i)
        if comma < 0:
            namespace = text[i:]
            i = n
        else:
            namespace = text[i:comma]
            i = comma + 1
        q = namespace.find("?")        # a query after the namespace (Socket.IO v2 clients)
        if q >= 0:
            namespace = namespace[:q]
    ack_id = None
    j = i
    while j < n and "0" <= text[j] <= "9":
        j += 1
    if j > i:
        if j - i > MAX_ID_DIGITS:
            raise PacketError("ack id too long")
        ack_id = int(text[i:j])
        i = j
    data = None
    if i < n:
        try:
            data = _loads(text[i:] if i else text)
        except ValueError:
            raise PacketError("the packet's data is not JSON") from None
    return Packet(ptype, namespace, ack_id, data, attachments)


__all__ = [
    "EIO_OPEN", "EIO_CLOSE", "EIO_PING", "EIO_PONG", "EIO_MESSAGE", "EIO_UPGRADE", "EIO_NOOP",
    "CONNECT", "DISCONNECT", "EVENT", "ACK", "CONNECT_ERROR", "BINARY_EVENT", "BINARY_ACK",
    "MAX_ATTACHMENTS", "PacketError", "Packet", "dumps", "args_of", "has_binary", "deconstruct",
    "reconstruct", "prefix", "encode", "open_packet", "decode",
]
