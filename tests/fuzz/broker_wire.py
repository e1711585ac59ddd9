"""Fuzz target ``broker_wire``: every unpack function of ``fastws.broker.wire``.

Run: ``python -m tests.fuzz.broker_wire -max_total_time=600 tests/fuzz/corpus/broker_wire``

An input is read two ways:

* whole, by every parser of the module: the envelope (``unpack_envelope``,
  ``envelope_origin``), the bridge payloads (``payload_kind``,
  ``unpack_room``, ``room_message``, ``unpack_direct``, ``unpack_reply``,
  ``unpack_close``: a CLOSE that unpacks is one an engine can carry out),
  link frame bodies (``link_channels``, ``link_split_channel``), stream
  entry ids (``parse_id``, bytes and str) and entry field lists
  (``entry_fields``, the input split at NUL bytes);
* as an embedded-broker link stream: link frames (``LINK_HEAD``: body
  length u32, type u8, body) one after the other, each body read by the
  parser of its type, the envelope inside a PUB/MSG body unpacked and its
  payload read as a bridge payload, as a worker and the hub do.

Nothing may raise but the module's documented errors:
``BrokerProtocolError`` (``MalformedFrame`` is one) from the unpackers,
``ValueError`` from ``parse_id``; never ``struct.error`` or ``IndexError``.
Whatever unpacks packs back to the same bytes (where the layout has no
unused bits: a ROOM payload's flag bits 1-3, a DIRECT payload's priority
bits, a REPLY's trailing bytes and a CLOSE's flags are not carried).
"""

from __future__ import annotations

import struct

from tests.fuzz import _harness

with _harness.instrumented(__name__ == "__main__", "fastws"):
    from fastws import core
    from fastws.broker import wire
    from fastws.errors import BrokerProtocolError
    from fastws.frames import BINARY, TEXT

#: the most link frames of one input read as a stream
MAX_FRAMES = 64


def _expect_error(fn, *args, errors=(BrokerProtocolError,)):
    """``fn(*args)``, or None if it raised one of ``errors`` (anything else propagates)."""
    try:
        return fn(*args)
    except errors:
        return None


#: the close codes the HTTP API lets a backend ask for (the only ones a CLOSE is packed with)


def closable(code: int, reason: str) -> None:
    """The receiving node can carry out the CLOSE: an engine accepts the
    code and reason (``Connection.close`` makes the engine's checks)."""
    core.Engine().close(code, reason)


def check_envelope(data: bytes):
    env = wire.unpack_envelope(data)
    origin = wire.envelope_origin(data)
    if env is None:
        assert origin is None, f"envelope_origin read an origin from no envelope: {data!r:.200}"
        return None
    origin_, payload = env
    assert origin == origin_
    assert wire.pack_envelope(origin_, payload) == data, "envelope round trip"
    return payload


def check_payload(data: bytes) -> None:
    kind = _expect_error(wire.payload_kind, data)
    if kind is None:
        assert len(data) < 2
    room = _expect_error(wire.unpack_room, data)
    message = _expect_error(wire.room_message, data)
    if room is not None:
        opcode, priority, body = room
        assert kind == wire.ROOM and opcode in (TEXT, BINARY) and 0 <= priority <= 15
        assert message == wire.decode_message(opcode, body)
        if not data[1] & 0x0E:
            assert wire.pack_room(opcode, body, priority) == data, "ROOM round trip"
            assert wire.pack_room_message(message, priority) == data, "ROOM message round trip"
    elif kind == wire.ROOM:
        assert message is None     # a TEXT body that is not UTF-8: both refuse it
    direct = _expect_error(wire.unpack_direct, data)
    if direct is not None:
        rid, cid, msg = direct
        assert kind == wire.DIRECT and isinstance(msg, (str, bytes))
        if data[1] in (0, wire.F_BINARY):
            assert wire.pack_direct(rid, cid, msg) == data, "DIRECT round trip"
    reply = _expect_error(wire.unpack_reply, data)
    if reply is not None:
        rid, ok = reply
        assert kind == wire.REPLY
        if len(data) == wire.REPLY_HEAD.size and data[1] in (0, wire.F_OK):
            assert wire.pack_reply(rid, ok) == data, "REPLY round trip"
    close = _expect_error(wire.unpack_close, data)
    if close is not None:
        rid, cid, code, reason = close
        assert kind == wire.CLOSE and isinstance(reason, str) and len(reason.encode()) <= 123
        if data[1] == 0:
            assert wire.pack_close(rid, cid, code, reason) == data, "CLOSE round trip"
        closable(code, reason)


def check_channels(body: bytes, pos: int):
    chans = _expect_error(wire.link_channels, body, pos)
    if chans is not None:
        assert all(len(c) <= wire.MAX_CHANNEL for c in chans)
        assert b"".join(wire.U32.pack(len(c)) + c for c in chans) == body[pos:], "SUB body round trip"
        if chans and pos == 0:
            assert b"".join(wire.link_batches(chans)) == body
    return chans


def check_pub(body: bytes):
    split = _expect_error(wire.link_split_channel, body)
    if split is None:
        return None
    channel, envelope = split
    assert len(channel) <= wire.MAX_CHANNEL
    assert wire.link_pub_body(channel, envelope) == body, "PUB body round trip"
    return envelope


def check_stream_id(data: bytes) -> None:
    for eid in (data, data.decode("latin-1")):
        got = _expect_error(wire.parse_id, eid, errors=(ValueError,))
        if got is not None:
            ms, seq = got
            assert ms >= 0 and seq >= 0
            assert wire.parse_id(f"{ms}-{seq}") == got
            after = wire.parse_id(wire.id_after(got))
            assert after > got
    data_, counter = wire.entry_fields(data.split(b"\x00"))
    assert counter is None or isinstance(counter, int)


def read_link_stream(data: bytes) -> None:
    """The link frames of ``data``, each body read as its type says."""
    pos = 0
    for _ in range(MAX_FRAMES):
        if len(data) - pos < wire.LINK_HEAD.size:
            return
        length, kind = wire.LINK_HEAD.unpack_from(data, pos)
        pos += wire.LINK_HEAD.size
        if length > wire.MAX_FRAME:
            return                       # the link is dropped
        body = data[pos:pos + length]
        pos += length
        if kind in (wire.SUB, wire.UNSUB):
            check_channels(body, 4)
        elif kind in (wire.PUB, wire.MSG):
            envelope = check_pub(body)
            if envelope is not None:
                payload = check_envelope(envelope)
                if payload is not None:
                    check_payload(payload)
        elif kind == wire.HELLO:
            body.decode("utf-8", "replace")


def TestOneInput(data: bytes) -> None:
    payload = check_envelope(data)
    if payload is not None:
        check_payload(payload)
    check_payload(data)
    check_channels(data, 0)
    check_channels(data, 4)
    check_pub(data)
    check_stream_id(data)
    read_link_stream(data)


# -- seeds (written by tests.fuzz.seeds) ---------------------------------------------------


def seeds() -> dict:
    env = wire.pack_envelope
    room = wire.pack_room_message
    node = b"node-7f3a"
    chans = [wire.channel_name("p", ("", "lobby")), wire.channel_name("p", ("chat:ns", "r%1")),
             wire.channel_name("", "node-7f3a")]
    sub = struct.pack("!I", 42) + b"".join(wire.link_batches(chans))
    pub = wire.link_pub_body(chans[0], env(node, room("hello")))
    return {
        "envelope-room-text": env(node, room("hello 🌍")),
        "envelope-room-binary-high": env(node, room(b"\x00\xff", priority=2)),
        "envelope-direct": env(b"n2", wire.pack_direct(7, 123456789, "to one connection")),
        "envelope-reply": env(b"n2", wire.pack_reply(7, True)),
        "envelope-close": env(b"n2", wire.pack_close(8, 42, 4000, "kicked")),
        "close-bad-reason": wire.pack_close(8, 42, 1000) + b"\xff" * 3,
        "close-reason-124": wire.pack_close(8, 42, 1000) + b"r" * 124,
        "close-code-1006": wire.pack_close(0, 1, 1006),
        "envelope-empty-origin": env(b"", b""),
        "envelope-stray": b"FW\x02\x05abc",
        "room-bad-utf8": bytes([wire.ROOM, 0]) + b"\xed\xa0\x80",
        "direct-short": wire.pack_direct(1, 2, b"x")[:9],
        "reply-long": wire.pack_reply(9, False) + b"extra",
        "link-hello": wire.link_frame(wire.HELLO, node),
        "link-sub": wire.link_frame(wire.SUB, sub),
        "link-unsub-truncated": wire.link_frame(wire.UNSUB, sub[:-3]),
        "link-pub-then-ping": wire.link_frame(wire.PUB, pub) + wire.link_frame(wire.PING, struct.pack("!I", 5)),
        "link-msg": wire.link_frame(wire.MSG, pub),
        "link-huge-length": struct.pack("!IB", 0xFFFFFFFF, wire.PUB) + b"x" * 16,
        "link-channel-too-long": wire.link_frame(wire.PUB, struct.pack("!I", wire.MAX_CHANNEL + 1) + b"c"),
        "sub-body": sub,
        "pub-body": pub,
        "stream-id": b"1700000000000-3",
        "stream-id-bare": b"1700000000000",
        "stream-id-max-seq": b"1700000000000-18446744073709551615",
        "stream-id-bad": b"17-x-3",
        "entry-fields": b"d\x00" + env(node, room("x")) + b"\x00n\x0012",
    }


if __name__ == "__main__":
    _harness.main(TestOneInput)
