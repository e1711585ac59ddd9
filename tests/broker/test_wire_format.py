"""The byte layouts of ``fastws.broker.wire``: every pack has its unpack,
the bytes are the ones the module docstring draws, and malformed input is a
``BrokerProtocolError`` (never a ``struct.error`` or ``IndexError``)."""

from __future__ import annotations

import pytest

from fastws.broker import wire
from fastws.errors import BrokerProtocolError
from fastws.frames import BINARY, PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, TEXT


def test_envelope_layout_and_round_trip():
    env = wire.pack_envelope(b"node-1", b"payload")
    assert env == b"FW\x01\x06node-1payload"
    assert wire.unpack_envelope(env) == (b"node-1", b"payload")
    assert wire.envelope_origin(env) == b"node-1"
    for bad in (b"", b"FW", b"XX\x01\x00", b"FW\x02\x00x", b"FW\x01\x09short"):
        assert wire.unpack_envelope(bad) is None and wire.envelope_origin(bad) is None


def test_room_payload_carries_opcode_priority_and_the_frame_bytes():
    text = wire.pack_room_message("héllo", PRIORITY_HIGH)
    assert text == bytes([wire.ROOM, PRIORITY_HIGH << 4]) + "héllo".encode()
    assert wire.unpack_room(text) == (TEXT, PRIORITY_HIGH, "héllo".encode())
    binary = wire.pack_room(BINARY, b"\x00\xff", PRIORITY_LOW)
    assert binary == bytes([wire.ROOM, wire.F_BINARY | PRIORITY_LOW << 4]) + b"\x00\xff"
    assert wire.unpack_room(binary) == (BINARY, PRIORITY_LOW, b"\x00\xff")
    assert wire.pack_room_message(bytearray(b"ab")) == wire.pack_room(BINARY, b"ab", PRIORITY_NORMAL)
    assert wire.room_message(text) == "héllo" and wire.room_message(binary) == b"\x00\xff"
    assert wire.room_message(wire.pack_reply(1, True)) is None and wire.room_message(b"") is None
    # a TEXT payload that is not UTF-8 never becomes a text frame
    bad = bytes([wire.ROOM, 0]) + b"\xff\xfe"
    with pytest.raises(BrokerProtocolError):
        wire.unpack_room(bad)
    with pytest.raises(BrokerProtocolError):
        wire.room_message(bad)
    assert wire.unpack_room(bytes([wire.ROOM, wire.F_BINARY]) + b"\xff") == (BINARY, 0, b"\xff")
    for short in (b"", b"\x01"):
        with pytest.raises(BrokerProtocolError):
            wire.unpack_room(short)
    with pytest.raises(BrokerProtocolError):
        wire.payload_kind(b"\x01")
    assert wire.payload_kind(text) == wire.ROOM


def test_direct_and_reply_payloads():
    d = wire.pack_direct(7, 2**40 + 3, "hi")
    assert d[:14] == bytes([wire.DIRECT, 0]) + (7).to_bytes(4, "big") + (2**40 + 3).to_bytes(8, "big")
    assert wire.unpack_direct(d) == (7, 2**40 + 3, "hi")
    assert wire.unpack_direct(wire.pack_direct(0, 1, b"\x00")) == (0, 1, b"\x00")
    r = wire.pack_reply(9, True)
    assert r == bytes([wire.REPLY, wire.F_OK]) + (9).to_bytes(4, "big")
    assert wire.unpack_reply(r) == (9, True) and wire.unpack_reply(wire.pack_reply(9, False)) == (9, False)
    for bad in (d[:10], wire.pack_reply(1, True), b""):
        with pytest.raises(BrokerProtocolError):
            wire.unpack_direct(bad)
    for bad in (r[:5], d):
        with pytest.raises(BrokerProtocolError):
            wire.unpack_reply(bad)
    with pytest.raises(BrokerProtocolError):
        wire.unpack_direct(bytes([wire.DIRECT, 0]) + bytes(12) + b"\xc3")


def test_embedded_link_frames():
    frame = wire.link_frame(wire.PING, b"\x00\x00\x00\x05")
    assert frame == (4).to_bytes(4, "big") + bytes([wire.PING]) + b"\x00\x00\x00\x05"
    body = wire.link_pub_body(b"chan", b"env")
    assert wire.link_split_channel(body) == (b"chan", b"env")
    chans = [b"a", b"bb" * 10, b""]
    (one,) = wire.link_batches(chans)
    assert wire.link_channels(one, 0) == chans
    half = [b"x" * (wire.MAX_REQUEST // 2)] * 3          # with their lengths, two do not fit one frame
    assert [len(wire.link_channels(b, 0)) for b in wire.link_batches(half)] == [1, 1, 1]
    quarter = [b"y" * (wire.MAX_REQUEST // 4)] * 5       # three fit one frame
    assert [len(wire.link_channels(b, 0)) for b in wire.link_batches(quarter)] == [3, 2]
    assert [len(b) for b in wire.link_batches([b"z" * (wire.MAX_REQUEST + 1)])] == [wire.MAX_REQUEST + 5]
    for bad in (b"\x00\x00", b"\x00\x00\x00\x09abc"):
        with pytest.raises(wire.MalformedFrame):
            wire.link_split_channel(bad)
        with pytest.raises(BrokerProtocolError):
            wire.link_channels(bad, 0)


def test_stream_ids_and_entry_fields():
    assert wire.parse_id("1700000000000-3") == (1700000000000, 3)
    assert wire.parse_id(b"17") == (17, 0)
    assert wire.parse_id("1-2") < wire.parse_id("1-10") < wire.parse_id("2-0")
    for bad in ("not-an-id", "", "-1", "1-", "1--2", " 1", "1_0", None, 5, "\udcff"):
        with pytest.raises(ValueError, match="stream entry id"):
            wire.parse_id(bad)
    assert wire.id_after((5, 1)) == "5-2" and wire.id_after((5, wire.MAX_SEQ)) == "6-0"
    assert wire.entry_fields([b"d", b"env", b"n", b"42"]) == (b"env", 42)
    assert wire.entry_fields([b"n", b"x", b"d", b"e"]) == (b"e", None)
    assert wire.entry_fields(None) == (None, None)


def test_channel_and_presence_names():
    assert wire.channel_name("p", ("a:b%", "room")) == b"fastws:p:room:a%3Ab%25:room"
    assert wire.channel_name("", "node-1") == b"fastws:node:node-1"
    with pytest.raises(TypeError):
        wire.channel_name("p", 5)
    assert wire.presence_base("p", ("ns", "r")) == "fastws:p:presence:{ns:r}"
