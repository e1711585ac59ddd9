"""Differential test: the Cython engine against the wsproto engine (the oracle).

Hypothesis generates a connection's worth of client bytes: valid messages
(fragmented, with control frames between the fragments), control frames,
close frames with valid and invalid codes and reasons, and malformed frames
(unknown opcodes, RSV bits, unmasked frames, non-minimal lengths, bad UTF-8,
stray or missing continuations, oversize frames, bare headers, garbage). The
bytes come in two segments with a server action between them (close, send or
ping, or nothing); each segment is cut at random byte boundaries, and the
stream may end in the middle of a frame. Both engines get the same pieces;
after each segment the test compares the events (ERROR events by code only),
the bytes queued for the peer, the state and the close code and reason, and
the result of the server action (its bytes, or the exception it raised).

The client role (``Engine(client=True)``) runs through the same cases with
the roles swapped: the bytes are what a server sends (unmasked; a frame the
strategy draws unmasked goes out masked instead, the error of this role;
messages compressed with the server's parameters), and what the engines
send is unmasked before it is compared (the keys are random).

``[cython]`` is the real comparison and fails (never skips) when
``fastws._core`` is not built. ``[wsproto]`` compares the wsproto engine with
itself: it checks the harness, and that no input makes the engine raise.

Examples: ``FASTWS_DIFF_EXAMPLES`` (default 300 per test). The run is
derandomized (the same examples every time, no database written); a failure
prints the smallest input hypothesis found.
"""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastws import errors
from fastws.core import BINARY, CLOSE, CONT, ERROR, PING, PONG, TEXT, DeflateParams

RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10

EXAMPLES = int(os.environ.get("FASTWS_DIFF_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: candidate engine, compared with the wsproto engine.
CANDIDATES = ["cython", "wsproto"]

VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]
#: invalid anywhere, or (the last three) a sequence cut short.
BAD_UTF8 = [
    b"\xff", b"\x80", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
    b"\xed\xbf", b"\xe2\x82", b"\xf0\x9f\x98",
]  # fmt: skip


# -- strategies: descriptions of what goes on the wire -------------------------


def weighted(*pairs):
    """sampled_from with integer weights: weighted((a, 3), (b, 1))."""
    return st.sampled_from([value for value, weight in pairs for _ in range(weight)])


text_bytes = st.text(max_size=40).map(str.encode)


@st.composite
def bad_utf8(draw):
    return draw(text_bytes) + draw(st.sampled_from(BAD_UTF8)) + draw(text_bytes)


payloads = st.one_of(st.binary(max_size=140), text_bytes, bad_utf8())


@st.composite
def close_payloads(draw):
    kind = draw(weighted(("empty", 2), ("valid", 5), ("invalid-code", 2), ("one-byte", 1), ("bad-reason", 1)))
    if kind == "empty":
        return b""
    if kind == "one-byte":
        return draw(st.binary(min_size=1, max_size=1))
    code = draw(st.sampled_from(INVALID_CLOSE_CODES if kind == "invalid-code" else VALID_CLOSE_CODES))
    reason = draw(bad_utf8() if kind == "bad-reason" else st.text(max_size=30).map(str.encode))
    return struct.pack("!H", code) + reason[:123]


@st.composite
def raw_frames(draw):
    """One frame whose every field is drawn: often valid, often not."""
    valid = [(op, 4) for op in (TEXT, BINARY, CONT, PING, PONG, CLOSE)]
    opcode = draw(weighted(*valid, *((op, 1) for op in range(16))))
    payload = draw(close_payloads()) if opcode == CLOSE and draw(st.booleans()) else draw(payloads)
    return {
        "kind": "frame",
        "opcode": opcode,
        "payload": payload,
        "fin": draw(weighted((True, 4), (False, 1))),
        "rsv": draw(weighted((0, 12), (RSV1, 2), (RSV2, 1), (RSV3, 1))),
        "mask": draw(weighted((True, 12), (False, 1))) and draw(st.binary(min_size=4, max_size=4)),
        "length_bits": draw(weighted((None, 12), (16, 1), (64, 1))),
    }


@st.composite
def controls(draw):
    opcode = draw(st.sampled_from([PING, PONG, CLOSE]))
    payload = draw(close_payloads()) if opcode == CLOSE else draw(st.binary(max_size=125))
    return {"kind": "frame", "opcode": opcode, "payload": payload}


@st.composite
def messages(draw):
    """A well-framed message, maybe fragmented, maybe with control frames between.

    Its content may still be wrong: invalid UTF-8 in text, more bytes than
    the limits allow, corrupted deflate data.
    """
    opcode = draw(st.sampled_from([TEXT, BINARY]))
    if opcode == TEXT:
        data = draw(weighted((st.text(max_size=80).map(str.encode), 6), (bad_utf8(), 1)).flatmap(lambda s: s))
    else:
        data = draw(st.binary(max_size=draw(st.sampled_from([30, 120, 400]))))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    between = draw(st.lists(st.sampled_from([None, None, PING, PONG]), min_size=len(cuts), max_size=len(cuts)))
    return {
        "kind": "message",
        "opcode": opcode,
        "data": data,
        "cuts": cuts,
        "between": between,
        "compress": draw(weighted((True, 3), (False, 1))),
        "corrupt": draw(weighted((None, 15), (0, 1), (-1, 1))),
    }


@st.composite
def headers(draw):
    """A bare header: whatever follows is read as its payload."""
    return {
        "kind": "header",
        "opcode": draw(st.sampled_from([TEXT, BINARY, CONT, PING])),
        "length": draw(
            st.one_of(
                st.sampled_from([0, 10, 126, 300, 70000, 1 << 21, 1 << 40, (1 << 63) - 1]),
                st.integers(0, 1000),
            )
        ),
    }


# A clean case has well-framed messages and control frames only; a noisy one
# adds frames with random fields, bare headers and garbage.
clean_items = st.one_of(messages(), messages(), messages(), controls())
noisy_items = st.one_of(
    clean_items, raw_frames(), headers(),
    st.binary(min_size=1, max_size=12).map(lambda b: {"kind": "garbage", "bytes": b}),
)  # fmt: skip

actions = st.one_of(
    st.none(),
    st.tuples(st.just("close"), st.sampled_from([1000, 1001, 4000, 1005]), st.sampled_from(["", "bye", "é" * 70])),
    st.tuples(st.just("send"), st.one_of(st.text(max_size=50), st.binary(max_size=300))),
    st.tuples(st.just("ping"), st.binary(max_size=20)),
)

configs = st.fixed_dictionaries(
    {
        "max_message_size": st.sampled_from([1 << 20, 0, 64, 300]),
        "max_frame_size": st.sampled_from([0, 0, 40, 100]),
    }
)

deflate_params = st.builds(
    DeflateParams,
    server_no_context_takeover=st.booleans(),
    client_no_context_takeover=st.booleans(),
    server_max_window_bits=st.integers(9, 15),
    client_max_window_bits=st.integers(9, 15),
)


# -- from descriptions to bytes ---------------------------------------------------


class Client:
    """Serializes item descriptions; compresses messages when ``deflate`` is set.

    ``as_server``: write what a server sends (to an engine in the client role)."""

    def __init__(self, wire, deflate: DeflateParams | None, as_server: bool = False):
        self.wire = wire
        self.deflate = deflate
        self.compressor = None
        self.as_server = as_server

    def _compress(self, data: bytes) -> bytes:
        params = self.deflate
        if self.as_server:
            bits, fresh = params.server_max_window_bits, params.server_no_context_takeover
        else:
            bits, fresh = params.client_max_window_bits, params.client_no_context_takeover
        if self.compressor is None or fresh:
            self.compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -max(9, bits))
        return self.wire.deflate(data, self.compressor)

    def _mask(self, mask):
        """The key of a frame drawn with ``mask`` (a key, or False: unmasked):
        as drawn for a server engine; swapped for a client engine."""
        if not self.as_server:
            return mask or None
        return None if mask else self.wire.MASK

    def encode(self, item) -> bytes:
        wire, kind = self.wire, item["kind"]
        if kind == "garbage":
            return item["bytes"]
        if kind == "header":
            return wire.header(item["opcode"], item["length"], mask=self._mask(wire.MASK))
        if kind == "frame":
            mask = item.get("mask", wire.MASK)
            return wire.frame(
                item["opcode"],
                item["payload"],
                fin=item.get("fin", True),
                rsv=item.get("rsv", 0),
                mask=self._mask(mask),
                length_bits=item.get("length_bits"),
            )
        # A message: compress as a whole, then cut into fragments.
        data, rsv = item["data"], 0
        if self.deflate is not None and item["compress"]:
            data, rsv = self._compress(data), RSV1
            if item["corrupt"] is not None and data:
                data = bytearray(data)
                data[item["corrupt"]] ^= 0xFF
                data = bytes(data)
        cuts = [min(c, len(data)) for c in item["cuts"]]
        bounds = [0, *cuts, len(data)]
        out = []
        for i in range(len(bounds) - 1):
            last = i == len(bounds) - 2
            opcode = item["opcode"] if i == 0 else CONT
            out.append(wire.frame(opcode, data[bounds[i] : bounds[i + 1]], fin=last, rsv=rsv if i == 0 else 0,
                                  mask=self._mask(wire.MASK)))
            if not last and item["between"][i] is not None:
                out.append(wire.frame(item["between"][i], b"c%d" % i, mask=self._mask(wire.MASK)))
        return b"".join(out)


def pieces(data: bytes, cuts):
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def norm(events):
    return [(ERROR, e[1]) if e[0] == ERROR else e for e in events]


def run(module, config, segments, action, wire=None):
    """Feed ``segments`` (each a list of pieces) to a fresh engine; return a
    trace.  With ``wire``, the engine is a client: what it sends is
    compared unmasked (``wire.client_view``), its keys being random."""
    engine = module.Engine(**config, client=wire is not None)
    view = (lambda out: out) if wire is None else wire.client_view
    trace = []
    for index, segment in enumerate(segments):
        events = []
        for piece in segment:
            events += engine.receive(piece)
        out = view(engine.data_to_send())
        trace.append(("segment", index, norm(events), out, engine.state, engine.close_code, engine.close_reason))
        if index == 0 and action is not None:
            result = perform(engine, action)
            if type(result[0]) is bytes:
                result = (view(result[0]), result[1])
            trace.append(("action", action[0], result))
    return trace


def perform(engine, action):
    name, *args = action
    try:
        if name == "close":
            code, reason = args
            result = engine.close(code, "" if code == 1005 else reason)
        elif name == "send":
            result = engine.send(args[0])
        else:
            result = engine.ping(args[0])
    except errors.ConnectionClosed as exc:
        return ("ConnectionClosed", exc.code, exc.reason)
    return (bytes(result), engine.state)


def draw_case(data, wire, deflate, as_server=False):
    config = data.draw(configs, label="config")
    if deflate is not None:
        config["deflate"] = deflate
    client = Client(wire, deflate, as_server)
    items = data.draw(st.sampled_from([clean_items, noisy_items]), label="items")
    first = data.draw(st.lists(items, max_size=10), label="segment 1")
    action = data.draw(actions, label="action")
    second = data.draw(st.lists(items, max_size=5), label="segment 2")
    streams = [b"".join(client.encode(item) for item in first), b"".join(client.encode(item) for item in second)]
    if data.draw(weighted((False, 4), (True, 1)), label="truncate"):
        streams[1] = streams[1][: data.draw(st.integers(0, len(streams[1])), label="end")]
    segments = []
    for stream in streams:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
        segments.append(pieces(stream, cuts))
    return config, segments, action


@pytest.mark.parametrize("candidate", CANDIDATES)
@SETTINGS
@given(data=st.data())
def test_engines_agree(wire, load_engine, candidate, data):
    oracle, module = load_engine("wsproto"), load_engine(candidate)
    config, segments, action = draw_case(data, wire, deflate=None)
    assert run(module, config, segments, action) == run(oracle, config, segments, action)


@pytest.mark.deflate
@pytest.mark.parametrize("candidate", CANDIDATES)
@SETTINGS
@given(data=st.data())
def test_engines_agree_with_deflate(wire, load_engine, candidate, data):
    oracle, module = load_engine("wsproto"), load_engine(candidate)
    params = data.draw(deflate_params, label="deflate")
    config, segments, action = draw_case(data, wire, deflate=params)
    assert run(module, config, segments, action) == run(oracle, config, segments, action)


@pytest.mark.parametrize("candidate", CANDIDATES)
@SETTINGS
@given(data=st.data())
def test_engines_agree_as_clients(wire, load_engine, candidate, data):
    """Both engines in the client role, on what a server sends (masked frames
    among them: 1002)."""
    oracle, module = load_engine("wsproto"), load_engine(candidate)
    config, segments, action = draw_case(data, wire, deflate=None, as_server=True)
    assert run(module, config, segments, action, wire) == run(oracle, config, segments, action, wire)


@pytest.mark.deflate
@pytest.mark.parametrize("candidate", CANDIDATES)
@SETTINGS
@given(data=st.data())
def test_engines_agree_as_clients_with_deflate(wire, load_engine, candidate, data):
    oracle, module = load_engine("wsproto"), load_engine(candidate)
    params = data.draw(deflate_params, label="deflate")
    config, segments, action = draw_case(data, wire, deflate=params, as_server=True)
    assert run(module, config, segments, action, wire) == run(oracle, config, segments, action, wire)
