"""RFC 6455 server side, one suite run on both frame engines.

Every test here runs as ``[cython-...]`` and ``[wsproto-...]`` (see
conftest.py): the wsproto engine is the oracle, the Cython engine must give
the same events and the same bytes. Where a test takes the ``chunks`` fixture
it also runs with the input fed one byte at a time, in small odd pieces, in
seeded random pieces and all at once.

Events are compared exactly, except the free-text detail of ERROR events,
which ``norm`` drops after checking that it is a string. Outgoing bytes are
compared exactly.

The permessage-deflate tests at the end are marked ``deflate`` and named
``test_deflate_*`` (``-k deflate`` / ``-m deflate`` selects them).
"""

from __future__ import annotations

import random
import struct
import tracemalloc
import zlib

import pytest
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from fastws import errors
from fastws.core import (
    BINARY,
    CLOSE,
    CLOSED,
    CLOSING,
    CONT,
    ERROR,
    OPEN,
    PING,
    PONG,
    TEXT,
    DeflateParams,
)

RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10


def norm(events):
    """Events with ERROR reduced to (ERROR, code); checks the detail's type."""
    out = []
    for event in events:
        if event[0] == ERROR:
            assert len(event) == 3 and isinstance(event[2], str), event
            out.append((ERROR, event[1]))
        else:
            out.append(event)
    return out


def error_close(code):
    """The close frame queued for an ERROR: the code and its canonical reason."""
    payload = struct.pack("!H", code) + errors.CLOSE_REASONS[code].encode()
    return bytes([0x88, len(payload)]) + payload


def assert_failed(engine, events, code, before=()):
    """``events`` end in (ERROR, code), the error close is queued, CLOSED."""
    assert norm(events) == [*before, (ERROR, code)]
    assert engine.data_to_send() == error_close(code)
    assert engine.state == CLOSED
    assert engine.close_code == code
    assert engine.close_reason == errors.CLOSE_REASONS[code]


def test_engine_constants_are_the_frames_numbers(load_engine):
    """fastws.frames names the numbers once; core and the wsproto engine
    re-export them, and the Cython engine's C enums equal them."""
    from fastws import _wsproto_engine, core, frames

    names = ("CONT", "TEXT", "BINARY", "CLOSE", "PING", "PONG", "ERROR", "OPEN", "CLOSING", "CLOSED")
    for name in names:
        assert getattr(core, name) is getattr(frames, name), name
        assert getattr(_wsproto_engine, name) is getattr(frames, name), name
    cython = load_engine("cython")
    for name in names + ("PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH"):
        assert getattr(cython, name) == getattr(frames, name), name
        assert getattr(core, name) == getattr(frames, name), name


def test_initial_state(make_engine):
    engine = make_engine()
    assert engine.state == OPEN
    assert engine.close_code is None
    assert engine.close_reason is None
    assert engine.data_to_send() == b""
    assert engine.receive(b"") == []


# -- messages -------------------------------------------------------------------


def test_text_message(make_engine, wire, chunks):
    engine = make_engine()
    assert chunks.feed(engine, wire.frame(TEXT, "Hello")) == [(TEXT, "Hello")]
    assert engine.data_to_send() == b""
    assert engine.state == OPEN


def test_binary_message(make_engine, wire, chunks):
    engine = make_engine()
    payload = bytes(range(256))
    assert chunks.feed(engine, wire.frame(BINARY, payload)) == [(BINARY, payload)]
    assert engine.data_to_send() == b""


def test_empty_messages(make_engine, wire, chunks):
    engine = make_engine()
    data = wire.frame(TEXT, b"") + wire.frame(BINARY, b"")
    events = chunks.feed(engine, data)
    assert events == [(TEXT, ""), (BINARY, b"")]
    assert type(events[0][1]) is str and type(events[1][1]) is bytes


def test_rfc_example_masked_hello(make_engine):
    # RFC 6455 section 5.7: a single-frame masked text message.
    engine = make_engine()
    assert engine.receive(bytes.fromhex("818537fa213d7f9f4d5158")) == [(TEXT, "Hello")]


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 1000, 65535, 65536, 70001])
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_length_encodings(make_engine, wire, chunker, length, opcode):
    # 7-bit (<= 125), 16-bit (126 .. 65535) and 64-bit (>= 65536) lengths.
    payload = bytes(0x41 + i % 26 for i in range(length))
    message = payload.decode() if opcode == TEXT else payload
    data = wire.frame(opcode, payload)
    assert len(data) == len(payload) + 4 + {7: 2, 16: 4, 64: 10}[
        7 if length <= 125 else 16 if length <= 0xFFFF else 64
    ]
    for how in ("whole", "random", "3"):
        engine = make_engine()
        assert chunker(how).feed(engine, data) == [(opcode, message)], how


def test_many_frames_in_one_feed(make_engine, wire, chunks):
    engine = make_engine()
    data = (
        wire.frame(TEXT, "one")
        + wire.frame(BINARY, b"two")
        + wire.frame(PING, b"p")
        + wire.frame(PONG, b"q")
        + wire.frame(TEXT, "three")
    )
    assert chunks.feed(engine, data) == [
        (TEXT, "one"),
        (BINARY, b"two"),
        (PING, b"p"),
        (PONG, b"q"),
        (TEXT, "three"),
    ]
    assert engine.data_to_send() == wire.server_frame(PONG, b"p")


def test_data_to_send_is_drained(make_engine, wire):
    engine = make_engine()
    engine.receive(wire.frame(PING, b"a"))
    engine.receive(wire.frame(PING, b"b"))
    assert engine.data_to_send() == wire.server_frame(PONG, b"a") + wire.server_frame(PONG, b"b")
    assert engine.data_to_send() == b""


def test_receive_accepts_bytes_like(make_engine, wire):
    engine = make_engine()
    data = wire.frame(TEXT, "hi") + wire.frame(TEXT, "yo")
    half = len(data) // 2
    assert engine.receive(bytearray(data[:half])) + engine.receive(memoryview(data)[half:]) == [
        (TEXT, "hi"),
        (TEXT, "yo"),
    ]


# -- fragmentation --------------------------------------------------------------


def test_fragmented_text_reassembled(make_engine, wire, chunks):
    engine = make_engine()
    text = "Hello, wörld € 𝄞!"
    # Cuts fall inside the 2-, 3- and 4-byte characters.
    data = wire.fragments(TEXT, text, [1, 8, 1, 4, 2, 3])
    assert chunks.feed(engine, data) == [(TEXT, text)]


def test_fragmented_binary_reassembled(make_engine, wire, chunks):
    engine = make_engine()
    payload = bytes(range(200))
    data = wire.fragments(BINARY, payload, [0, 1, 125, 10])
    assert chunks.feed(engine, data) == [(BINARY, payload)]


def test_empty_fragments(make_engine, wire, chunks):
    engine = make_engine()
    data = (
        wire.frame(TEXT, b"", fin=False)
        + wire.frame(CONT, b"", fin=False)
        + wire.frame(CONT, b"")
        + wire.frame(BINARY, b"", fin=False)
        + wire.frame(CONT, b"")
    )
    assert chunks.feed(engine, data) == [(TEXT, ""), (BINARY, b"")]


def test_control_frames_between_fragments(make_engine, wire, chunks):
    engine = make_engine()
    data = (
        wire.frame(TEXT, "ab", fin=False)
        + wire.frame(PING, b"p1")
        + wire.frame(CONT, "cd", fin=False)
        + wire.frame(PONG, b"q")
        + wire.frame(CONT, "", fin=False)
        + wire.frame(PING, b"")
        + wire.frame(CONT, "ef")
    )
    assert chunks.feed(engine, data) == [
        (PING, b"p1"),
        (PONG, b"q"),
        (PING, b""),
        (TEXT, "abcdef"),
    ]
    assert engine.data_to_send() == wire.server_frame(PONG, b"p1") + wire.server_frame(PONG, b"")


def test_continuation_without_start(make_engine, wire, chunks):
    engine = make_engine()
    events = chunks.feed(engine, wire.frame(CONT, "x") + wire.frame(TEXT, "never"))
    assert_failed(engine, events, 1002)


def test_continuation_after_finished_message(make_engine, wire, chunks):
    engine = make_engine()
    events = chunks.feed(engine, wire.frame(TEXT, "a") + wire.frame(CONT, "b"))
    assert_failed(engine, events, 1002, before=[(TEXT, "a")])


@pytest.mark.parametrize("second", [TEXT, BINARY])
def test_data_frame_inside_fragmented_message(make_engine, wire, chunks, second):
    engine = make_engine()
    data = wire.frame(TEXT, "ab", fin=False) + wire.frame(second, b"cd") + wire.frame(CONT, "ef")
    assert_failed(engine, chunks.feed(engine, data), 1002)


@pytest.mark.parametrize(
    "prefix, opcode",
    [(b"", CONT), ("open", TEXT), ("open", BINARY)],
    ids=["continuation-first", "text-in-message", "binary-in-message"],
)
def test_sequencing_error_reported_from_header(make_engine, wire, prefix, opcode):
    # The header (masking key included) is enough: no payload byte is needed.
    engine = make_engine()
    if prefix:
        assert engine.receive(wire.frame(TEXT, prefix, fin=False)) == []
    assert_failed(engine, engine.receive(wire.header(opcode, 10)), 1002)


@pytest.mark.parametrize("how", ["whole", "random"])
def test_thousands_of_small_fragments(make_engine, wire, chunker, how):
    engine = make_engine()
    count = 10_000
    frames = []
    for i in range(count):
        frames.append(wire.frame(TEXT if i == 0 else CONT, "x", fin=i == count - 1))
        if i % 1000 == 500:
            frames.append(wire.frame(PING, str(i).encode()))
    events = chunker(how).feed(engine, b"".join(frames))
    pings = [(PING, str(i).encode()) for i in range(500, count, 1000)]
    assert events == [*pings, (TEXT, "x" * count)]


def test_fragments_count_towards_message_limit(make_engine, wire):
    engine = make_engine(max_message_size=1000)
    frames = [wire.frame(TEXT if i == 0 else CONT, "y", fin=i == 999) for i in range(1000)]
    assert engine.receive(b"".join(frames)) == [(TEXT, "y" * 1000)]

    engine = make_engine(max_message_size=1000)
    frames = [wire.frame(TEXT if i == 0 else CONT, "y", fin=False) for i in range(1000)]
    assert engine.receive(b"".join(frames)) == []
    # The 1001st byte is refused from its frame's header.
    assert_failed(engine, engine.receive(wire.header(CONT, 1)), 1009)


# -- control frames -------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", b"\x00\xff" * 10, bytes(range(125))])
def test_ping_answered_with_same_payload(make_engine, wire, chunks, payload):
    engine = make_engine()
    assert chunks.feed(engine, wire.frame(PING, payload)) == [(PING, payload)]
    assert engine.data_to_send() == wire.server_frame(PONG, payload)
    assert engine.state == OPEN


def test_pings_answered_in_order(make_engine, wire, chunks):
    engine = make_engine()
    data = b"".join(wire.frame(PING, p) for p in (b"1", b"22", b"333"))
    assert chunks.feed(engine, data) == [(PING, b"1"), (PING, b"22"), (PING, b"333")]
    assert engine.data_to_send() == b"".join(
        wire.server_frame(PONG, p) for p in (b"1", b"22", b"333")
    )


def test_unsolicited_pong_is_only_an_event(make_engine, wire, chunks):
    engine = make_engine()
    assert chunks.feed(engine, wire.frame(PONG, b"abc") + wire.frame(PONG, b"")) == [
        (PONG, b"abc"),
        (PONG, b""),
    ]
    assert engine.data_to_send() == b""


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_control_frame_longer_than_125(make_engine, wire, chunks, opcode):
    engine = make_engine()
    payload = struct.pack("!H", 1000) + b"r" * 124 if opcode == CLOSE else b"p" * 126
    assert_failed(engine, chunks.feed(engine, wire.frame(opcode, payload)), 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_control_frame_length_checked_from_first_two_bytes(make_engine, wire, opcode):
    engine = make_engine()
    assert_failed(engine, engine.receive(wire.frame(opcode, b"p" * 126)[:2]), 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_fragmented_control_frame(make_engine, wire, chunks, opcode):
    engine = make_engine()
    payload = struct.pack("!H", 1000) if opcode == CLOSE else b"p"
    data = wire.frame(opcode, payload, fin=False) + wire.frame(CONT, b"")
    assert_failed(engine, chunks.feed(engine, data), 1002)


# -- framing errors ---------------------------------------------------------------


@pytest.mark.parametrize("opcode", [TEXT, BINARY, CONT, PING, PONG, CLOSE])
def test_unmasked_client_frame(make_engine, wire, chunks, opcode):
    engine = make_engine()
    data = wire.frame(TEXT, "ok") + wire.frame(opcode, b"", mask=None)
    assert_failed(engine, chunks.feed(engine, data), 1002, before=[(TEXT, "ok")])


@pytest.mark.parametrize("rsv", [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3], ids=["rsv1", "rsv2", "rsv3", "all"])
@pytest.mark.parametrize("opcode", [TEXT, BINARY, PING, CLOSE])
def test_rsv_bits_without_extension(make_engine, wire, chunks, rsv, opcode):
    engine = make_engine()
    assert_failed(engine, chunks.feed(engine, wire.frame(opcode, b"", rsv=rsv)), 1002)


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcode(make_engine, wire, chunks, opcode):
    engine = make_engine()
    assert_failed(engine, chunks.feed(engine, wire.frame(opcode, b"xyz")), 1002)


@pytest.mark.parametrize("opcode", [0x3, 0xB])
def test_unknown_opcode_detected_from_first_two_bytes(make_engine, wire, opcode):
    engine = make_engine()
    assert_failed(engine, engine.receive(wire.frame(opcode, b"x" * 300)[:2]), 1002)


@pytest.mark.parametrize(
    "length, bits",
    [(0, 16), (125, 16), (5, 64), (125, 64), (65535, 64)],
)
def test_non_minimal_length_encoding(make_engine, wire, chunks, length, bits):
    # RFC 6455 5.2: "the minimal number of bytes MUST be used"; wsproto enforces it.
    engine = make_engine()
    data = wire.frame(BINARY, b"z" * length, length_bits=bits)
    assert_failed(engine, chunks.feed(engine, data), 1002)


def test_64_bit_length_with_top_bit_set(make_engine, wire):
    # 1002 (the length is malformed), not 1009, although it is also too big.
    engine = make_engine()
    assert_failed(engine, engine.receive(wire.header(BINARY, 1 << 63)), 1002)


def test_error_keeps_the_events_before_it(make_engine, wire, chunks):
    engine = make_engine()
    data = wire.frame(TEXT, "a") + wire.frame(PING, b"") + wire.frame(0x3, b"") + wire.frame(TEXT, "b")
    events = chunks.feed(engine, data)
    assert norm(events) == [(TEXT, "a"), (PING, b""), (ERROR, 1002)]
    assert engine.data_to_send() == wire.server_frame(PONG, b"") + wire.error_close(1002)


def test_input_after_error_is_ignored(make_engine, wire):
    engine = make_engine()
    assert_failed(engine, engine.receive(wire.frame(TEXT, "x", mask=None)), 1002)
    assert engine.receive(wire.frame(TEXT, "x")) == []
    assert engine.receive(wire.frame(PING, b"x")) == []
    assert engine.data_to_send() == b""
    assert engine.state == CLOSED


@pytest.mark.parametrize("code", [1002, 1007, 1009])
def test_error_close_frame_bytes(make_engine, code):
    # Canonical reasons only, never the parser's detail text.
    expected = {
        1002: b"\x88\x10\x03\xeaprotocol error",
        1007: b"\x88\x16\x03\xefinvalid payload data",
        1009: b"\x88\x11\x03\xf1message too big",
    }[code]
    engine = make_engine(max_message_size=1)
    bad = {
        1002: b"\x81\x00",  # an unmasked text frame
        1007: b"\x81\x81\x00\x00\x00\x00\xff",  # text b"\xff", zero mask
        1009: b"\x82\x82\x00\x00\x00\x00",  # header of 2 bytes > 1
    }[code]
    assert norm(engine.receive(bad)) == [(ERROR, code)]
    assert engine.data_to_send() == expected


# -- UTF-8 ------------------------------------------------------------------------

INVALID_UTF8 = {
    "ff": b"\xff",
    "lone-continuation": b"\x80",
    "overlong-2": b"\xc0\x80",
    "overlong-3": b"\xe0\x80\x80",
    "overlong-4": b"\xf0\x80\x80\x80",
    "surrogate": b"\xed\xa0\x80",
    "above-10ffff": b"\xf4\x90\x80\x80",
    "f5": b"\xf5\x80\x80\x80",
    "bad-continuation": b"\xc2A",
    "fe": b"ok\xfe",
}


@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_invalid_utf8_text(make_engine, wire, chunks, bad):
    engine = make_engine()
    assert_failed(engine, chunks.feed(engine, wire.frame(TEXT, b"abc" + bad + b"def")), 1007)


def test_valid_utf8_edge_cases(make_engine, wire, chunks):
    engine = make_engine()
    text = "\x00\x7f\x80\u07ff\u0800\ud7ff\ue000\ufeff\ufffe\uffff\U00010000\U0010ffff"
    assert chunks.feed(engine, wire.frame(TEXT, text.encode())) == [(TEXT, text)]


def test_binary_is_not_utf8_checked(make_engine, wire, chunks):
    engine = make_engine()
    assert chunks.feed(engine, wire.frame(BINARY, b"\xff\xfe\xed\xa0\x80")) == [
        (BINARY, b"\xff\xfe\xed\xa0\x80")
    ]


def test_invalid_utf8_in_later_fragment(make_engine, wire, chunks):
    engine = make_engine()
    data = wire.frame(TEXT, "valid", fin=False) + wire.frame(CONT, "ok", fin=False) + wire.frame(CONT, b"\xff")
    assert_failed(engine, chunks.feed(engine, data), 1007)


def test_codepoint_split_across_fragments(make_engine, wire, chunks):
    engine = make_engine()
    euro = "€".encode()
    data = wire.frame(TEXT, b"a" + euro[:1], fin=False) + wire.frame(CONT, euro[1:2], fin=False) + wire.frame(
        CONT, euro[2:] + b"b"
    )
    assert chunks.feed(engine, data) == [(TEXT, "a€b")]


FAIL_FAST_PREFIXES = {
    "ff": b"\xff",
    "c0": b"\xc0",
    "e0-80": b"\xe0\x80",
    "surrogate-prefix": b"\xed\xa0",
    "f4-90": b"\xf4\x90",
    "f8": b"\xf8",
}


@pytest.mark.parametrize("bad", FAIL_FAST_PREFIXES.values(), ids=FAIL_FAST_PREFIXES.keys())
@pytest.mark.parametrize("fin", [True, False], ids=["final", "first-fragment"])
def test_invalid_utf8_fails_before_the_frame_ends(make_engine, wire, bad, fin):
    # Only the start of the payload arrives; it can never become valid UTF-8.
    engine = make_engine()
    payload = b"ab" + bad + b"c" * 100
    data = wire.frame(TEXT, payload, fin=fin)
    cut = len(data) - len(payload) + 2 + len(bad)
    assert_failed(engine, engine.receive(data[:cut]), 1007)


def test_invalid_utf8_fails_fast_in_a_later_fragment(make_engine, wire):
    engine = make_engine()
    assert engine.receive(wire.frame(TEXT, "first", fin=False)) == []
    payload = b"ok\xc3(" + b"x" * 50
    data = wire.frame(CONT, payload)
    assert_failed(engine, engine.receive(data[: len(data) - 50]), 1007)


def test_valid_prefix_waits_for_more(make_engine, wire):
    engine = make_engine()
    data = wire.frame(TEXT, "ab€cd".encode())
    cut = len(data) - 4  # ends inside the euro sign
    assert engine.receive(data[:cut]) == []
    assert engine.receive(data[cut:]) == [(TEXT, "ab€cd")]


@pytest.mark.parametrize(
    "frames",
    [
        [(TEXT, b"a\xe2\x82", True)],
        [(TEXT, b"a\xe2", False), (CONT, b"\x82", True)],
        [(TEXT, b"a\xf0\x9f\x98", False), (CONT, b"", True)],
    ],
    ids=["one-frame", "two-fragments", "empty-last-fragment"],
)
def test_truncated_sequence_at_end_of_message(make_engine, wire, chunks, frames):
    engine = make_engine()
    data = b"".join(wire.frame(op, payload, fin=fin) for op, payload, fin in frames)
    assert_failed(engine, chunks.feed(engine, data), 1007)


def test_truncated_sequence_at_end_of_fragment_is_fine(make_engine, wire, chunks):
    engine = make_engine()
    data = wire.frame(TEXT, b"a\xf0\x9f\x98", fin=False) + wire.frame(CONT, b"\x80")
    assert chunks.feed(engine, data) == [(TEXT, "a\U0001f600")]


# -- closing ----------------------------------------------------------------------

VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
INVALID_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_close_with_valid_code_is_echoed(make_engine, wire, chunks, code):
    engine = make_engine()
    data = wire.frame(CLOSE, wire.close_payload(code, "bye ✓"))
    assert chunks.feed(engine, data) == [(CLOSE, code, "bye ✓")]
    # The echo carries the code and no reason.
    assert engine.data_to_send() == wire.server_frame(CLOSE, struct.pack("!H", code))
    assert engine.state == CLOSED
    assert (engine.close_code, engine.close_reason) == (code, "bye ✓")


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_close_with_invalid_code(make_engine, wire, chunks, code):
    engine = make_engine()
    assert_failed(engine, chunks.feed(engine, wire.frame(CLOSE, wire.close_payload(code, "x"))), 1002)


def test_close_code_is_checked_before_reason(make_engine, wire):
    engine = make_engine()
    assert_failed(engine, engine.receive(wire.frame(CLOSE, wire.close_payload(999, b"\xff"))), 1002)


def test_close_reason_invalid_utf8(make_engine, wire, chunks):
    engine = make_engine()
    assert_failed(engine, chunks.feed(engine, wire.frame(CLOSE, wire.close_payload(1000, b"ok\xff"))), 1007)


def test_close_with_one_byte_payload(make_engine, wire, chunks):
    engine = make_engine()
    assert_failed(engine, chunks.feed(engine, wire.frame(CLOSE, b"\x03")), 1002)


def test_empty_close_answered_with_empty_close(make_engine, wire, chunks):
    engine = make_engine()
    assert chunks.feed(engine, wire.frame(CLOSE, b"")) == [(CLOSE, 1005, "")]
    assert engine.data_to_send() == b"\x88\x00"
    assert engine.state == CLOSED
    assert (engine.close_code, engine.close_reason) == (1005, "")


def test_close_without_reason(make_engine, wire):
    engine = make_engine()
    assert engine.receive(wire.frame(CLOSE, b"\x03\xe8")) == [(CLOSE, 1000, "")]
    assert engine.data_to_send() == b"\x88\x02\x03\xe8"


def test_close_with_longest_reason(make_engine, wire):
    engine = make_engine()
    reason = "r" * 123
    assert engine.receive(wire.frame(CLOSE, wire.close_payload(4000, reason))) == [(CLOSE, 4000, reason)]
    assert engine.data_to_send() == b"\x88\x02\x0f\xa0"


def test_input_after_close_is_ignored(make_engine, wire, chunks):
    engine = make_engine()
    data = wire.frame(TEXT, "a") + wire.frame(CLOSE, b"\x03\xe8") + wire.frame(TEXT, "b") + b"\xff\xff garbage"
    assert chunks.feed(engine, data) == [(TEXT, "a"), (CLOSE, 1000, "")]
    assert engine.receive(wire.frame(PING, b"")) == []
    assert engine.data_to_send() == b"\x88\x02\x03\xe8"


def test_close_inside_fragmented_message(make_engine, wire, chunks):
    engine = make_engine()
    data = wire.frame(TEXT, "ab", fin=False) + wire.frame(CLOSE, b"\x03\xe9") + wire.frame(CONT, "cd")
    assert chunks.feed(engine, data) == [(CLOSE, 1001, "")]
    assert engine.data_to_send() == b"\x88\x02\x03\xe9"


def test_server_initiated_close(make_engine, wire, chunks):
    engine = make_engine()
    assert engine.close(1001, "going") == b"\x88\x07\x03\xe9going"
    assert engine.state == CLOSING
    assert engine.close_code is None
    assert engine.data_to_send() == b""
    # The peer may still send messages and pings before its close frame.
    data = wire.frame(TEXT, "late") + wire.frame(PING, b"p") + wire.frame(CLOSE, wire.close_payload(1000, "ok"))
    assert chunks.feed(engine, data) == [(TEXT, "late"), (PING, b"p"), (CLOSE, 1000, "ok")]
    # The pong is sent (RFC 6455 5.5.2), the close is not echoed.
    assert engine.data_to_send() == wire.server_frame(PONG, b"p")
    assert engine.state == CLOSED
    assert (engine.close_code, engine.close_reason) == (1000, "ok")


def test_server_initiated_close_then_empty_close(make_engine, wire):
    engine = make_engine()
    engine.close()
    assert engine.receive(wire.frame(CLOSE, b"")) == [(CLOSE, 1005, "")]
    assert engine.data_to_send() == b""
    assert engine.state == CLOSED


def test_protocol_error_while_closing_sends_no_second_close(make_engine, wire):
    engine = make_engine()
    engine.close(1000)
    events = engine.receive(wire.frame(TEXT, "x", mask=None))
    assert norm(events) == [(ERROR, 1002)]
    assert engine.data_to_send() == b""
    assert engine.state == CLOSED
    assert engine.close_code == 1002


# -- limits -------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_message_at_and_over_the_limit(make_engine, wire, chunks, opcode):
    engine = make_engine(max_message_size=100)
    ok = b"a" * 100
    assert chunks.feed(engine, wire.frame(opcode, ok)) == [(opcode, ok.decode() if opcode == TEXT else ok)]
    assert_failed(engine, chunks.feed(engine, wire.frame(opcode, b"a" * 101)), 1009)


def test_oversize_frame_fails_from_its_header(make_engine, wire):
    engine = make_engine(max_message_size=100)
    header = wire.header(BINARY, 101)
    # Without the masking key the header is not complete yet.
    assert engine.receive(header[:-4]) == []
    assert_failed(engine, engine.receive(header[-4:]), 1009)


@pytest.mark.parametrize("length", [(1 << 20) + 1, 1 << 32, (1 << 63) - 1])
def test_huge_declared_length_with_default_limit(make_engine, wire, length):
    engine = make_engine()
    assert_failed(engine, engine.receive(wire.header(TEXT, length)), 1009)


def test_default_message_limit_is_one_mebibyte(make_engine, wire):
    engine = make_engine()
    payload = b"m" * (1 << 20)
    assert engine.receive(wire.frame(BINARY, payload)) == [(BINARY, payload)]
    assert_failed(engine, engine.receive(wire.header(BINARY, (1 << 20) + 1)), 1009)


def test_fragmented_message_over_limit_fails_at_the_crossing_header(make_engine, wire):
    engine = make_engine(max_message_size=100)
    assert engine.receive(wire.frame(TEXT, "a" * 60, fin=False)) == []
    assert engine.receive(wire.frame(CONT, "b" * 40, fin=False)) == []
    assert_failed(engine, engine.receive(wire.header(CONT, 1)), 1009)


def test_limit_counts_bytes_not_characters(make_engine, wire):
    engine = make_engine(max_message_size=4)
    assert engine.receive(wire.frame(TEXT, "€")) == [(TEXT, "€")]
    assert_failed(engine, engine.receive(wire.frame(TEXT, "€€")), 1009)


def test_max_frame_size(make_engine, wire, chunks):
    engine = make_engine(max_frame_size=10)
    data = wire.frame(BINARY, b"0123456789") + wire.fragments(TEXT, "x" * 30, [10, 10])
    # Control frames are not data frames: the frame limit does not apply.
    data += wire.frame(PING, b"p" * 50)
    assert chunks.feed(engine, data) == [(BINARY, b"0123456789"), (TEXT, "x" * 30), (PING, b"p" * 50)]
    engine.data_to_send()
    assert_failed(engine, engine.receive(wire.header(TEXT, 11)), 1009)


def test_max_frame_size_applies_to_continuations(make_engine, wire):
    engine = make_engine(max_frame_size=10)
    assert engine.receive(wire.frame(TEXT, "x" * 10, fin=False)) == []
    assert_failed(engine, engine.receive(wire.header(CONT, 11)), 1009)


def test_zero_means_unlimited(make_engine, wire):
    engine = make_engine(max_message_size=0, max_frame_size=0)
    payload = b"u" * (2 << 20)
    assert engine.receive(wire.frame(BINARY, payload)) == [(BINARY, payload)]


def test_sequencing_error_wins_over_size(make_engine, wire):
    # A stray continuation that is also too big is a protocol error.
    engine = make_engine(max_message_size=10)
    assert_failed(engine, engine.receive(wire.header(CONT, 11)), 1002)


# -- sending and encode_frame ------------------------------------------------------


def test_send(make_engine):
    engine = make_engine()
    assert engine.send("Hello") == bytes.fromhex("810548656c6c6f")
    assert engine.send("€") == b"\x81\x03\xe2\x82\xac"
    assert engine.send(b"\x00\x01") == b"\x82\x02\x00\x01"
    assert engine.send(bytearray(b"ab")) == b"\x82\x02ab"
    assert engine.send(b"") == b"\x82\x00"
    assert engine.send("") == b"\x81\x00"
    assert engine.send(b"x" * 256) == b"\x82\x7e\x01\x00" + b"x" * 256
    assert engine.send(b"x" * 65536) == b"\x82\x7f" + struct.pack("!Q", 65536) + b"x" * 65536
    assert engine.data_to_send() == b""


def test_send_rejects_other_types(make_engine):
    engine = make_engine()
    with pytest.raises(TypeError):
        engine.send(123)


def test_ping(make_engine):
    engine = make_engine()
    assert engine.ping() == b"\x89\x00"
    assert engine.ping(b"Hello") == bytes.fromhex("890548656c6c6f")
    assert engine.ping(b"p" * 125) == b"\x89\x7d" + b"p" * 125
    with pytest.raises(ValueError):
        engine.ping(b"p" * 126)


def test_close_api(make_engine):
    assert make_engine().close() == b"\x88\x02\x03\xe8"
    assert make_engine().close(4999, "x") == b"\x88\x03\x13\x87x"
    assert make_engine().close(1005) == b"\x88\x00"
    # The reason is cut to 123 bytes on a character boundary.
    assert make_engine().close(3000, "é" * 70) == b"\x88\x7c\x0b\xb8" + ("é" * 61).encode()


@pytest.mark.parametrize("code", [0, 999, 1004, 1006, 1015, 2999, 5000])
def test_close_api_rejects_invalid_codes(make_engine, code):
    engine = make_engine()
    with pytest.raises(ValueError):
        engine.close(code)
    assert engine.state == OPEN


def test_close_api_rejects_reason_without_code(make_engine):
    with pytest.raises(ValueError):
        make_engine().close(1005, "why")


def test_api_after_close_raises_connection_closed(make_engine, wire):
    engine = make_engine()
    engine.close(1001, "bye")
    for call in (lambda: engine.send("x"), lambda: engine.ping(), lambda: engine.close()):
        with pytest.raises(errors.ConnectionClosed) as info:
            call()
        assert (info.value.code, info.value.reason) == (1001, "bye")

    engine = make_engine()
    engine.receive(wire.frame(CLOSE, wire.close_payload(1000, "done")))
    with pytest.raises(errors.ConnectionClosed) as info:
        engine.send("x")
    assert (info.value.code, info.value.reason) == (1000, "done")


ENCODE_CASES = {
    # RFC 6455 section 5.7 examples.
    "rfc-text": (TEXT, b"Hello", True, False, None, "810548656c6c6f"),
    "rfc-masked": (TEXT, b"Hello", True, False, bytes.fromhex("37fa213d"), "818537fa213d7f9f4d5158"),
    "rfc-first-fragment": (TEXT, b"Hel", False, False, None, "010348656c"),
    "rfc-last-fragment": (CONT, b"lo", True, False, None, "80026c6f"),
    "rfc-ping": (PING, b"Hello", True, False, None, "890548656c6c6f"),
    "rfc-masked-pong": (PONG, b"Hello", True, False, bytes.fromhex("37fa213d"), "8a8537fa213d7f9f4d5158"),
    "empty": (BINARY, b"", True, False, None, "8200"),
    "empty-masked": (BINARY, b"", True, False, b"\x01\x02\x03\x04", "828001020304"),
    "rsv1": (TEXT, b"", True, True, None, "c100"),
    "close": (CLOSE, b"\x03\xe8", True, False, None, "880203e8"),
}


@pytest.mark.parametrize("case", ENCODE_CASES.values(), ids=ENCODE_CASES.keys())
def test_encode_frame_exact(engine_module, case):
    opcode, payload, fin, rsv1, mask, expected = case
    assert engine_module.encode_frame(opcode, payload, fin=fin, mask=mask, rsv1=rsv1) == bytes.fromhex(expected)


@pytest.mark.parametrize(
    "length, header",
    [(125, "827d"), (126, "827e007e"), (256, "827e0100"), (65535, "827effff"), (65536, "827f0000000000010000")],
)
@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
def test_encode_frame_length_encodings(engine_module, wire, length, header, masked):
    payload = bytes(i % 251 for i in range(length))
    mask = wire.MASK if masked else None
    frame = engine_module.encode_frame(BINARY, payload, mask=mask)
    head = bytearray.fromhex(header)
    if masked:
        head[1] |= 0x80
        assert frame == bytes(head) + wire.MASK + wire.mask(payload)
    else:
        assert frame == bytes(head) + payload


@pytest.mark.parametrize("length", [0, 125, 126, 65536])
def test_encode_frame_client_frames_are_received(engine_module, make_engine, wire, length):
    engine = make_engine()
    text = "é" * (length // 2) + "a" * (length % 2)
    frame = engine_module.encode_frame(TEXT, text.encode(), mask=b"\xaa\x55\x00\xff")
    assert engine.receive(frame) == [(TEXT, text)]


# -- permessage-deflate (RFC 7692) --------------------------------------------------
# Every test below needs deflate support in the engine. An engine without it
# must fail them; they are never skipped.

deflate = pytest.mark.deflate


def server_side_inflater(params: DeflateParams):
    """A wsproto *client* that decodes what the server sends (an independent check)."""
    ext = PerMessageDeflate(
        client_no_context_takeover=params.client_no_context_takeover,
        client_max_window_bits=params.client_max_window_bits,
        server_no_context_takeover=params.server_no_context_takeover,
        server_max_window_bits=params.server_max_window_bits,
    )
    ext.finalize(ext.name)
    proto = FrameProtocol(client=True, extensions=[ext])

    def decode(data):
        proto.receive_bytes(data)
        out = []
        for frame in proto.received_frames():
            assert frame.frame_finished and frame.message_finished
            out.append((int(frame.opcode), frame.payload))
        return out

    return decode


@deflate
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_deflate_compressed_message(make_engine, wire, chunks, opcode):
    engine = make_engine(deflate=DeflateParams())
    message = "Hello, hello, hello, wörld! " * 20
    data = wire.frame(opcode, wire.deflate(message), rsv=RSV1)
    expected = message if opcode == TEXT else message.encode()
    assert chunks.feed(engine, data) == [(opcode, expected)]
    assert engine.data_to_send() == b""


@deflate
def test_deflate_uncompressed_messages_still_allowed(make_engine, wire, chunks):
    engine = make_engine(deflate=DeflateParams())
    data = wire.frame(TEXT, "plain") + wire.frame(BINARY, wire.deflate("z"), rsv=RSV1) + wire.frame(BINARY, b"raw")
    assert chunks.feed(engine, data) == [(TEXT, "plain"), (BINARY, b"z"), (BINARY, b"raw")]


@deflate
def test_deflate_empty_message(make_engine, wire):
    engine = make_engine(deflate=DeflateParams())
    assert engine.receive(wire.frame(TEXT, wire.deflate(b""), rsv=RSV1)) == [(TEXT, "")]
    # A compressed message may also be sent with no payload at all.
    assert engine.receive(wire.frame(BINARY, b"", rsv=RSV1)) == [(BINARY, b"")]


@deflate
def test_deflate_fragmented_with_control_frames_between(make_engine, wire, chunks):
    # wsproto 1.3.2 loses the "compressed" bit at a control frame between
    # fragments; the wsproto engine fixes that, the Cython one must match.
    engine = make_engine(deflate=DeflateParams())
    message = "fragmented and compressed " * 10
    z = wire.deflate(message)
    third = len(z) // 3
    data = (
        wire.frame(TEXT, z[:third], fin=False, rsv=RSV1)
        + wire.frame(PING, b"1")
        + wire.frame(CONT, z[third : 2 * third], fin=False)
        + wire.frame(PONG, b"2")
        + wire.frame(CONT, b"", fin=False)
        + wire.frame(CONT, z[2 * third :])
        + wire.frame(PING, b"3")
        + wire.frame(TEXT, "after")
    )
    assert chunks.feed(engine, data) == [(PING, b"1"), (PONG, b"2"), (TEXT, message), (PING, b"3"), (TEXT, "after")]


@deflate
def test_deflate_context_takeover(make_engine, wire, chunks):
    engine = make_engine(deflate=DeflateParams())
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    message = "the same sentence, again and again. " * 5
    z = [wire.deflate(message, compressor) for _ in range(3)]
    assert len(z[1]) < len(z[0]) // 2  # the later ones refer back to the first
    data = b"".join(wire.frame(TEXT, part, rsv=RSV1) for part in z)
    assert chunks.feed(engine, data) == [(TEXT, message)] * 3


@deflate
def test_deflate_client_no_context_takeover(make_engine, wire, chunks):
    params = DeflateParams(client_no_context_takeover=True)
    message = "the same sentence, again and again. " * 5
    engine = make_engine(deflate=params)
    data = b"".join(wire.frame(TEXT, wire.deflate(message), rsv=RSV1) for _ in range(3))
    assert chunks.feed(engine, data) == [(TEXT, message)] * 3

    # A client that keeps its context anyway refers to a window the server
    # has dropped: the second message cannot be inflated.
    engine = make_engine(deflate=params)
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = b"".join(wire.frame(TEXT, wire.deflate(message, compressor), rsv=RSV1) for _ in range(2))
    assert_failed(engine, chunks.feed(engine, data), 1007, before=[(TEXT, message)])


@deflate
def test_deflate_small_client_window(make_engine, wire):
    engine = make_engine(deflate=DeflateParams(client_max_window_bits=9))
    message = bytes(range(256)) * 8
    assert engine.receive(wire.frame(BINARY, wire.deflate(message, wbits=9), rsv=RSV1)) == [(BINARY, message)]


@deflate
@pytest.mark.parametrize(
    "opcode, rsv, fin_first",
    [(CONT, RSV1, False), (PING, RSV1, True), (CLOSE, RSV1, True), (TEXT, RSV2, True), (TEXT, RSV3, True)],
    ids=["rsv1-continuation", "rsv1-ping", "rsv1-close", "rsv2", "rsv3"],
)
def test_deflate_rsv_misuse(make_engine, wire, chunks, opcode, rsv, fin_first):
    engine = make_engine(deflate=DeflateParams())
    data = b""
    if opcode == CONT:
        data += wire.frame(TEXT, wire.deflate("ab"), fin=False, rsv=RSV1)
    payload = wire.close_payload(1000) if opcode == CLOSE else b""
    data += wire.frame(opcode, payload, rsv=rsv)
    assert_failed(engine, chunks.feed(engine, data), 1002)


@deflate
def test_deflate_corrupt_data(make_engine, wire, chunks):
    # 0xff: a final block of the reserved type 3.
    engine = make_engine(deflate=DeflateParams())
    assert_failed(engine, chunks.feed(engine, wire.frame(BINARY, b"\xff\xff\xff", rsv=RSV1)), 1007)


@deflate
def test_deflate_invalid_utf8_after_inflating(make_engine, wire, chunks):
    engine = make_engine(deflate=DeflateParams())
    assert_failed(engine, chunks.feed(engine, wire.frame(TEXT, wire.deflate(b"ok\xffok"), rsv=RSV1)), 1007)


@deflate
def test_deflate_limit_counts_inflated_bytes(make_engine, wire, chunks):
    engine = make_engine(deflate=DeflateParams(), max_message_size=1000)
    ok = b"a" * 1000
    assert chunks.feed(engine, wire.frame(BINARY, wire.deflate(ok), rsv=RSV1)) == [(BINARY, ok)]
    z = wire.deflate(b"a" * 1001)
    assert len(z) < 100
    assert_failed(engine, chunks.feed(engine, wire.frame(BINARY, z, rsv=RSV1)), 1009)


@deflate
def test_deflate_limit_across_fragments(make_engine, wire):
    engine = make_engine(deflate=DeflateParams(), max_message_size=1000)
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    parts = [compressor.compress(b"b" * 400) + compressor.flush(zlib.Z_SYNC_FLUSH) for _ in range(3)]
    data = wire.frame(BINARY, parts[0], fin=False, rsv=RSV1) + wire.frame(CONT, parts[1], fin=False)
    assert engine.receive(data) == []
    assert_failed(engine, engine.receive(wire.frame(CONT, parts[2][:-4])), 1009)


@deflate
def test_deflate_max_frame_size_counts_wire_bytes(make_engine, wire):
    # The frame limit applies to the compressed frame, with deflate's
    # overhead on top: 100 + 13 bytes at most.
    engine = make_engine(deflate=DeflateParams(), max_frame_size=100)
    message = b"c" * 5000
    assert engine.receive(wire.frame(BINARY, wire.deflate(message), rsv=RSV1)) == [(BINARY, message)]
    incompressible = bytes(range(0, 200, 2))
    z = wire.deflate(incompressible)
    assert 100 < len(z) <= deflate_bound(100)
    assert engine.receive(wire.frame(BINARY, z, rsv=RSV1)) == [(BINARY, incompressible)]
    assert engine.receive(wire.header(BINARY, deflate_bound(100), rsv=RSV1)) == []
    engine = make_engine(deflate=DeflateParams(), max_frame_size=100)
    assert_failed(engine, engine.receive(wire.header(BINARY, deflate_bound(100) + 1, rsv=RSV1)), 1009)


@deflate
@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
def test_deflate_zip_bomb_is_not_inflated(make_engine, wire, fragmented):
    engine = make_engine(deflate=DeflateParams(), max_message_size=1 << 20)
    z = wire.deflate(bytes(64 << 20))  # 64 MiB of zeros, about 64 KiB on the wire
    assert len(z) < 100_000
    if fragmented:
        step = len(z) // 50 + 1
        pieces = [z[i : i + step] for i in range(0, len(z), step)]
        data = b"".join(
            wire.frame(BINARY if i == 0 else CONT, piece, fin=i == len(pieces) - 1, rsv=RSV1 if i == 0 else 0)
            for i, piece in enumerate(pieces)
        )
    else:
        data = wire.frame(BINARY, z, rsv=RSV1)
    tracemalloc.start()
    try:
        events = engine.receive(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_failed(engine, events, 1009)
    assert peak < 8 << 20, f"inflating used {peak} bytes"


def deflate_bound(n):
    """zlib's compressBound: how far a compressed size may pass a limit."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


#: valid deflate data that inflates to nothing: an empty stored block
#: (block header byte, LEN 0000, NLEN ffff), repeated
EMPTY_BLOCK = b"\x00\x00\x00\xff\xff"


@deflate
@pytest.mark.parametrize("length", [deflate_bound(1000) + 1, 1 << 32, (1 << 63) - 1])
def test_deflate_declared_oversize_fails_from_its_header(make_engine, wire, length):
    # Refused as soon as the header is complete: nothing of it is stored.
    engine = make_engine(deflate=DeflateParams(), max_message_size=1000)
    header = wire.header(BINARY, length, rsv=RSV1)
    assert engine.receive(header[:-4]) == []
    assert_failed(engine, engine.receive(header[-4:]), 1009)


@deflate
@pytest.mark.parametrize("length", [(1 << 20) + 1, 1 << 32])
def test_deflate_declared_oversize_with_default_limit(make_engine, wire, length):
    engine = make_engine(deflate=DeflateParams())
    events = engine.receive(wire.header(TEXT, deflate_bound(1 << 20), rsv=RSV1))
    assert events == [] and engine.state == OPEN  # the bound itself is allowed
    engine = make_engine(deflate=DeflateParams())
    assert_failed(engine, engine.receive(wire.header(TEXT, deflate_bound(length), rsv=RSV1)), 1009)


@deflate
def test_deflate_compressed_total_of_fragments_over_limit(make_engine, wire, chunks):
    # Fragments of empty deflate blocks inflate to nothing, but their
    # compressed total is held to the limit (plus deflate's overhead) too.
    engine = make_engine(deflate=DeflateParams(), max_message_size=1000)
    bound = deflate_bound(1000)
    part = EMPTY_BLOCK * 100  # 500 bytes
    data = wire.frame(BINARY, part, fin=False, rsv=RSV1) + wire.frame(PING, b"between")
    data += wire.frame(CONT, part, fin=False)
    assert chunks.feed(engine, data) == [(PING, b"between")]
    engine.data_to_send()
    # 1000 compressed bytes so far: a header up to the bound still passes ...
    probe = make_engine(deflate=DeflateParams(), max_message_size=1000)
    assert probe.receive(data) == [(PING, b"between")]
    assert probe.receive(wire.header(CONT, bound - 1000, fin=False)) == []
    assert probe.state == OPEN
    # ... one byte more fails from the header
    assert_failed(engine, chunks.feed(engine, wire.header(CONT, bound - 999, fin=False)), 1009)


@deflate
def test_deflate_endless_empty_fragments_fail_at_the_limit(make_engine, wire):
    engine = make_engine(deflate=DeflateParams(), max_message_size=1 << 16)
    events = engine.receive(wire.frame(TEXT, b"", fin=False, rsv=RSV1))
    fragment = wire.frame(CONT, EMPTY_BLOCK * 1000, fin=False)
    sent = 0
    while not events and sent < 1 << 20:
        events = engine.receive(fragment)
        sent += 5000
    assert_failed(engine, events, 1009)
    assert sent <= deflate_bound(1 << 16) + 5000


@deflate
@pytest.mark.parametrize("step", [7, 1024, 4096])
def test_deflate_zip_bomb_inflated_as_it_arrives(make_engine, wire, step):
    # The 1009 comes while the bomb's payload is still arriving: compressed
    # bytes are inflated per read, at most up to the limit, never stored.
    limit = 1 << 16
    engine = make_engine(deflate=DeflateParams(), max_message_size=limit)
    z = wire.deflate(bytes(64 << 20))
    data = wire.frame(BINARY, z, rsv=RSV1)
    assert len(z) <= deflate_bound(limit)  # passes the header check
    tracemalloc.start()
    try:
        fed, events = 0, []
        while not events and fed < len(data):
            events = engine.receive(data[fed : fed + step])
            fed += step
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_failed(engine, events, 1009)
    assert fed < len(data) and fed <= max(2 * step, 1024), f"failed after {fed} of {len(data)} bytes"
    assert peak < 4 * limit + step + (256 << 10), f"inflating used {peak} bytes"


@deflate
@pytest.mark.parametrize("kind", ["incompressible", "compressible"])
@pytest.mark.parametrize("fragments", [1, 3])
def test_deflate_message_exactly_at_the_limit(make_engine, wire, chunker, kind, fragments):
    limit = 100_000
    if kind == "incompressible":
        message = random.Random(7).randbytes(limit)
    else:
        message = b"compressible " * (limit // 13) + b"x" * (limit % 13)
    assert len(message) == limit
    z = wire.deflate(message)
    if kind == "incompressible":
        assert limit < len(z) <= deflate_bound(limit)  # stored blocks
    cut = [len(z) * i // fragments for i in range(fragments + 1)]
    data = b"".join(
        wire.frame(BINARY if i == 0 else CONT, z[cut[i] : cut[i + 1]], fin=i == fragments - 1,
                   rsv=RSV1 if i == 0 else 0)
        for i in range(fragments)
    )
    for how in ("whole", "random", "4096"):
        engine = make_engine(deflate=DeflateParams(), max_message_size=limit)
        assert chunker(how).feed(engine, data) == [(BINARY, message)], how
        # one byte more is over
        over = message + message[:1]
        engine = make_engine(deflate=DeflateParams(), max_message_size=limit)
        assert_failed(engine, chunker(how).feed(engine, wire.frame(BINARY, wire.deflate(over), rsv=RSV1)),
                      1009)


@deflate
def test_deflate_text_at_the_limit_checked_as_utf8(make_engine, wire, chunks):
    engine = make_engine(deflate=DeflateParams(), max_message_size=300)
    message = "é" * 150  # 300 bytes of UTF-8
    assert chunks.feed(engine, wire.frame(TEXT, wire.deflate(message), rsv=RSV1)) == [(TEXT, message)]
    assert_failed(engine, chunks.feed(engine, wire.frame(TEXT, wire.deflate(message + "a"), rsv=RSV1)), 1009)


@deflate
def test_deflate_final_block_ends_the_stream(make_engine, wire, chunks):
    # A client that ends its deflate stream (a final block) starts a new one
    # with the next message, even under context takeover.
    engine = make_engine(deflate=DeflateParams())
    data = b""
    for text in ("first", "second"):
        comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        data += wire.frame(TEXT, comp.compress(text.encode()) + comp.flush(), rsv=RSV1)
    assert chunks.feed(engine, data) == [(TEXT, "first"), (TEXT, "second")]


@deflate
def test_deflate_send_compresses(make_engine, wire):
    params = DeflateParams()
    engine = make_engine(deflate=params)
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    decode = server_side_inflater(params)
    for message in ["hello hello hello", "hello hello hello", b"\x00\x01" * 50]:
        frame = engine.send(message)
        opcode = TEXT if isinstance(message, str) else BINARY
        assert frame == wire.server_frame(opcode, wire.deflate(message, compressor), rsv=RSV1)
        assert decode(frame) == [(opcode, message)]
    # Control frames are never compressed.
    assert engine.ping(b"p") == b"\x89\x01p"
    assert engine.close(1000) == b"\x88\x02\x03\xe8"


@deflate
def test_deflate_send_server_no_context_takeover(make_engine, wire):
    params = DeflateParams(server_no_context_takeover=True, server_max_window_bits=10)
    engine = make_engine(deflate=params)
    decode = server_side_inflater(params)
    message = "no context, no context, no context"
    expected = wire.server_frame(TEXT, wire.deflate(message, wbits=10), rsv=RSV1)
    for _ in range(3):
        frame = engine.send(message)
        assert frame == expected
        assert decode(frame) == [(TEXT, message)]


@deflate
def test_deflate_no_context_takeover_connections_share_nothing(make_engine, wire):
    """Connections that compress every message on its own (the Cython engine
    shares one compressor per window size between them): each frame is what
    a fresh compressor gives for that message alone, whatever the other
    connections sent before, and inflates on its own."""
    params = DeflateParams(server_no_context_takeover=True, server_max_window_bits=12)
    a, b = make_engine(deflate=params), make_engine(deflate=params)
    decode = server_side_inflater(params)
    sent = [(a, "alpha " * 40), (b, "beta beta beta " * 9), (a, "alpha " * 40), (b, b"\x00\x01" * 300),
            (a, "gamma, and alpha " * 3)]
    for engine, message in sent:
        opcode = TEXT if isinstance(message, str) else BINARY
        frame = engine.send(message)
        assert frame == wire.server_frame(opcode, wire.deflate(message, wbits=12), rsv=RSV1)
        assert decode(frame) == [(opcode, message if isinstance(message, str) else bytes(message))]


@deflate
def test_deflate_echo_of_pings_and_close_while_compressing(make_engine, wire):
    engine = make_engine(deflate=DeflateParams())
    data = wire.frame(PING, b"x") + wire.frame(CLOSE, wire.close_payload(1000, "bye"))
    assert engine.receive(data) == [(PING, b"x"), (CLOSE, 1000, "bye")]
    assert engine.data_to_send() == b"\x8a\x01x\x88\x02\x03\xe8"


# -- the client role (Engine(client=True)) --------------------------------------------
# The same engines facing a server: frames in unmasked, frames out masked with
# a fresh key each, permessage-deflate with the parameters' roles swapped.


def unmasked_fragments(wire, opcode, payload, sizes):
    """``wire.fragments`` as a server sends them (no mask)."""
    if isinstance(payload, str):
        payload = payload.encode()
    parts, at = [], 0
    for size in sizes:
        parts.append(payload[at : at + size])
        at += size
    parts.append(payload[at:])
    return b"".join(
        wire.frame(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1, mask=None)
        for i, part in enumerate(parts)
    )


def test_client_role_flag(make_engine):
    assert make_engine(client=True).client is True
    assert make_engine().client is False


def test_client_receives_server_frames(make_engine, wire, chunks):
    engine = make_engine(client=True)
    big = bytes(i % 251 for i in range(70001))
    data = (
        wire.server_frame(TEXT, "Hello")
        + wire.server_frame(BINARY, big)
        + wire.frame(TEXT, "frag", fin=False, mask=None)
        + wire.server_frame(PING, b"mid")
        + wire.frame(CONT, "mented", mask=None)
        + wire.server_frame(PONG, b"q")
        + unmasked_fragments(wire, TEXT, "wörld €", [1, 3])
        + wire.server_frame(BINARY, b"")
    )
    assert chunks.feed(engine, data) == [
        (TEXT, "Hello"),
        (BINARY, big),
        (PING, b"mid"),
        (TEXT, "fragmented"),
        (PONG, b"q"),
        (TEXT, "wörld €"),
        (BINARY, b""),
    ]
    # the pong goes back masked
    assert wire.client_view(engine.data_to_send()) == [(0x8A, b"mid")]
    assert engine.state == OPEN


@pytest.mark.parametrize("opcode, payload", [(TEXT, b"hi"), (BINARY, bytes(300)), (PING, b"p"),
                                             (CLOSE, struct.pack("!H", 1000))],
                         ids=["text", "binary-16bit", "ping", "close"])
def test_client_refuses_a_masked_frame(make_engine, wire, chunks, opcode, payload):
    engine = make_engine(client=True)
    events = chunks.feed(engine, wire.server_frame(TEXT, "ok") + wire.frame(opcode, payload)
                         + wire.server_frame(TEXT, "never"))
    assert norm(events) == [(TEXT, "ok"), (ERROR, 1002)]
    # the error close is masked too, with the canonical reason
    assert wire.client_view(engine.data_to_send()) == [(0x88, wire.close_payload(1002, "protocol error"))]
    assert engine.state == CLOSED
    assert (engine.close_code, engine.close_reason) == (1002, "protocol error")


def test_client_refuses_a_masked_frame_from_its_length_bytes(make_engine, wire):
    # stage 2: known once the length is read, before the key or the payload
    engine = make_engine(client=True)
    assert norm(engine.receive(wire.frame(TEXT, "x" * 300)[:4])) == [(ERROR, 1002)]


def test_client_frames_are_masked(make_engine, wire):
    engine = make_engine(client=True)
    big = bytes(i % 7 for i in range(70000))
    cases = [
        (engine.send("text"), 0x81, b"text"),
        (engine.send(b"bin"), 0x82, b"bin"),
        (engine.send(bytearray(b"ba")), 0x82, b"ba"),
        (engine.send("é" * 100), 0x81, ("é" * 100).encode()),
        (engine.send(big), 0x82, big),
        (engine.encode_message(TEXT, b"enc"), 0x81, b"enc"),
        (engine.encode_message(BINARY, b""), 0x82, b""),
        (engine.ping(b"p"), 0x89, b"p"),
        (engine.ping(), 0x89, b""),
    ]
    for frame, first, payload in cases:
        assert wire.client_view(frame) == [(first, payload)]
    assert engine.data_to_send() == b""
    assert wire.client_view(engine.close(1001, "leaving")) == [(0x88, wire.close_payload(1001, "leaving"))]
    assert engine.state == CLOSING


def test_client_masking_keys_are_fresh(make_engine, wire):
    """A fresh, unpredictable key per frame: 2,000 frames, 2,000 keys (a
    repeat among 2,000 random 32-bit keys has a chance of 1 in 2,000)."""
    engine = make_engine(client=True)
    keys = [wire.parse_client(engine.send(b"x"))[0][2] for _ in range(2000)]
    assert len(set(keys)) >= 1998
    assert len(set(k[i] for k in keys for i in range(4))) > 200   # every byte value shows up


def test_client_close_started_by_the_client(make_engine, wire, chunks):
    engine = make_engine(client=True)
    frame = engine.close(1000, "done")
    assert wire.client_view(frame) == [(0x88, wire.close_payload(1000, "done"))]
    assert engine.state == CLOSING and engine.close_code is None
    # messages already on their way are still delivered; then the server's echo
    data = wire.server_frame(TEXT, "late") + wire.server_frame(CLOSE, wire.close_payload(1000))
    assert chunks.feed(engine, data) == [(TEXT, "late"), (CLOSE, 1000, "")]
    assert engine.state == CLOSED
    assert engine.data_to_send() == b""                     # no second close frame
    assert (engine.close_code, engine.close_reason) == (1000, "")
    assert engine.receive(wire.server_frame(TEXT, "after")) == []
    with pytest.raises(errors.ConnectionClosed):
        engine.send("x")


def test_client_close_started_by_the_server(make_engine, wire, chunks):
    engine = make_engine(client=True)
    events = chunks.feed(engine, wire.server_frame(CLOSE, wire.close_payload(1001, "restart")))
    assert events == [(CLOSE, 1001, "restart")]
    # the echo (code only), masked; the client then waits for the server to
    # close the TCP connection: the engine has nothing more to send
    assert wire.client_view(engine.data_to_send()) == [(0x88, wire.close_payload(1001))]
    assert engine.state == CLOSED
    with pytest.raises(errors.ConnectionClosed) as info:
        engine.send("x")
    assert (info.value.code, info.value.reason) == (1001, "restart")


def test_client_empty_close_and_bad_close_from_the_server(make_engine, wire):
    engine = make_engine(client=True)
    assert engine.receive(wire.server_frame(CLOSE)) == [(CLOSE, 1005, "")]
    assert wire.client_view(engine.data_to_send()) == [(0x88, b"")]
    engine = make_engine(client=True)
    events = engine.receive(wire.server_frame(CLOSE, wire.close_payload(1005)))
    assert norm(events) == [(ERROR, 1002)]
    assert wire.client_view(engine.data_to_send()) == [(0x88, wire.close_payload(1002, "protocol error"))]


def test_client_limits(make_engine, wire, chunks):
    engine = make_engine(client=True, max_message_size=100)
    events = chunks.feed(engine, wire.server_frame(BINARY, bytes(100)) + wire.server_frame(BINARY, bytes(101)))
    assert norm(events) == [(BINARY, bytes(100)), (ERROR, 1009)]
    assert wire.client_view(engine.data_to_send()) == [(0x88, wire.close_payload(1009, "message too big"))]
    engine = make_engine(client=True)
    events = chunks.feed(engine, wire.server_frame(TEXT, b"ok\xff"))
    assert norm(events) == [(ERROR, 1007)]


@deflate
@pytest.mark.parametrize("no_context", [False, True], ids=["takeover", "client_no_context_takeover"])
def test_deflate_client_compresses_with_the_client_parameters(make_engine, wire, no_context):
    # the client's window and no_context_takeover, whatever the server's
    params = DeflateParams(client_no_context_takeover=no_context, client_max_window_bits=10,
                           server_no_context_takeover=not no_context, server_max_window_bits=12)
    engine = make_engine(client=True, deflate=params)
    server = make_engine(deflate=params)
    message = "the client says the same thing again and again. " * 4
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -10)
    for _ in range(3):
        frame = engine.send(message)
        expected = wire.deflate(message, wbits=10) if no_context else wire.deflate(message, compressor)
        assert wire.client_view(frame) == [(0xC1, expected)]
        assert server.receive(frame) == [(TEXT, message)]
    # control frames are never compressed
    assert wire.client_view(engine.ping(b"p")) == [(0x89, b"p")]


@deflate
def test_deflate_client_inflates_with_the_server_parameters(make_engine, wire, chunks):
    message = "the server says the same thing again and again. " * 4
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -9)
    data = b"".join(wire.server_frame(TEXT, wire.deflate(message, compressor), rsv=RSV1) for _ in range(3))
    # client_no_context_takeover says nothing of what the server sends
    params = DeflateParams(client_no_context_takeover=True, server_max_window_bits=9)
    engine = make_engine(client=True, deflate=params)
    assert chunks.feed(engine, data) == [(TEXT, message)] * 3
    # under server_no_context_takeover the client drops its window after each
    # message: a server that keeps its context anyway is refused
    engine = make_engine(client=True, deflate=DeflateParams(server_no_context_takeover=True))
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = b"".join(wire.server_frame(TEXT, wire.deflate(message, compressor), rsv=RSV1) for _ in range(2))
    assert norm(chunks.feed(engine, data)) == [(TEXT, message), (ERROR, 1007)]
    assert wire.client_view(engine.data_to_send()) == [(0x88, wire.close_payload(1007, "invalid payload data"))]


@deflate
def test_deflate_client_bomb_is_not_inflated(make_engine, wire):
    engine = make_engine(client=True, deflate=DeflateParams(), max_message_size=1 << 20)
    z = wire.deflate(bytes(64 << 20))
    assert norm(engine.receive(wire.server_frame(BINARY, z, rsv=RSV1))) == [(ERROR, 1009)]


@deflate
@pytest.mark.parametrize("client_impl", ["cython", "wsproto"])
@pytest.mark.parametrize("server_impl", ["cython", "wsproto"])
@pytest.mark.parametrize("params", [
    DeflateParams(),
    DeflateParams(client_no_context_takeover=True, server_no_context_takeover=True),
    DeflateParams(client_max_window_bits=9, server_max_window_bits=11),
], ids=["default", "no-context", "windows"])
def test_deflate_client_and_server_engines_talk(load_engine, client_impl, server_impl, params):
    client = load_engine(client_impl).Engine(client=True, deflate=params)
    server = load_engine(server_impl).Engine(deflate=params)
    for i in range(4):
        up = f"hello from the client, message {i}, " * (i + 1)
        down = bytes(range(256)) * (i + 1)
        assert server.receive(client.send(up)) == [(TEXT, up)]
        assert client.receive(server.send(down)) == [(BINARY, down)]
    assert server.receive(client.close(1000, "bye")) == [(CLOSE, 1000, "bye")]
    assert client.receive(server.data_to_send()) == [(CLOSE, 1000, "")]
    assert client.state == server.state == CLOSED
