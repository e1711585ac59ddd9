"""Fixtures shared by the frame-engine tests: the engines, a wire builder, chunkers.

Every protocol test takes ``make_engine`` and so runs once per engine
(``[cython]`` and ``[wsproto]``). The Cython engine is never skipped: if
``fastws._core`` is not built its tests fail, with the reason in the message.

The frames fed to the engines are built here, independently of the engines'
own ``encode_frame`` (which is tested separately), so that a bug in an
engine's encoder cannot hide the same bug in its parser.
"""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from fastws import core, errors

ENGINES = ["cython", "wsproto"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "deflate: needs permessage-deflate (RFC 7692) support in the engine",
    )


def load_engine(name: str):
    """The engine module ``name``; fails the test (never skips) if missing."""
    try:
        return core.engine_module(name)
    except ImportError as exc:
        pytest.fail(
            f"engine {name!r} is not importable ({exc}); build it with "
            "`python setup.py build_ext --inplace`",
            pytrace=False,
        )


@pytest.fixture(scope="session", name="load_engine")
def load_engine_fixture():
    """``load_engine(name)``: for tests that need both engines at once."""
    return load_engine


@pytest.fixture(params=ENGINES)
def engine_module(request):
    return load_engine(request.param)


@pytest.fixture
def make_engine(engine_module):
    """``make_engine(**kwargs)`` -> a fresh Engine of the engine under test."""
    return engine_module.Engine


# -- building bytes -----------------------------------------------------------

RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10
#: The masking key of the RFC 6455 section 5.7 examples.
MASK = b"\x37\xfa\x21\x3d"


class Wire:
    """Builds client frames (the input) and server frames (the expected output)."""

    MASK = MASK

    @staticmethod
    def header(opcode, length, *, fin=True, rsv=0, mask=MASK, length_bits=None):
        """A frame header declaring ``length`` payload bytes.

        ``length_bits`` forces the 7/16/64-bit length encoding (default: the
        shortest), so non-minimal encodings can be built; ``mask=None`` gives
        an unmasked header; ``rsv`` is an OR of RSV1/RSV2/RSV3.
        """
        if length_bits is None:
            length_bits = 7 if length <= 125 else 16 if length <= 0xFFFF else 64
        first = (0x80 if fin else 0) | rsv | opcode
        mask_bit = 0 if mask is None else 0x80
        if length_bits == 7:
            head = struct.pack("!BB", first, mask_bit | length)
        elif length_bits == 16:
            head = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, length)
        return head + (mask or b"")

    @staticmethod
    def mask(payload, key=MASK):
        return bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    @classmethod
    def frame(cls, opcode, payload=b"", *, fin=True, rsv=0, mask=MASK, length_bits=None):
        """A whole client frame (masked unless ``mask=None``)."""
        if isinstance(payload, str):
            payload = payload.encode()
        head = cls.header(opcode, len(payload), fin=fin, rsv=rsv, mask=mask, length_bits=length_bits)
        return head + (payload if mask is None else cls.mask(payload, mask))

    @classmethod
    def server_frame(cls, opcode, payload=b"", *, fin=True, rsv=0):
        """The unmasked frame a server sends."""
        if isinstance(payload, str):
            payload = payload.encode()
        return cls.frame(opcode, payload, fin=fin, rsv=rsv, mask=None)

    @staticmethod
    def parse_client(data):
        """The masked frames a client engine produced, unmasked: a list of
        ``(first byte, payload, masking key)``.  Fails on an unmasked frame
        or a frame cut short."""
        out, at = [], 0
        while at < len(data):
            assert len(data) - at >= 2, data[at:]
            first, second = data[at], data[at + 1]
            at += 2
            assert second & 0x80, f"unmasked frame from a client: {data[at - 2:at + 8]!r}"
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack_from("!H", data, at)
                at += 2
            elif length == 127:
                (length,) = struct.unpack_from("!Q", data, at)
                at += 8
            key = data[at : at + 4]
            at += 4
            assert len(key) == 4 and len(data) - at >= length, "frame cut short"
            out.append((first, Wire.mask(data[at : at + length], key), key))
            at += length
        return out

    @classmethod
    def client_view(cls, data):
        """``parse_client`` without the keys: ``[(first byte, payload)]``."""
        return [(first, payload) for first, payload, _ in cls.parse_client(data)]

    @staticmethod
    def close_payload(code, reason=b""):
        if isinstance(reason, str):
            reason = reason.encode()
        return struct.pack("!H", code) + reason

    @classmethod
    def error_close(cls, code):
        """The close frame an engine queues for an ERROR with ``code``."""
        return cls.server_frame(core.CLOSE, cls.close_payload(code, errors.CLOSE_REASONS[code]))

    @classmethod
    def fragments(cls, opcode, payload, sizes):
        """A message cut into frames of the given sizes (the last takes the rest)."""
        if isinstance(payload, str):
            payload = payload.encode()
        parts, at = [], 0
        for size in sizes:
            parts.append(payload[at : at + size])
            at += size
        parts.append(payload[at:])
        frames = []
        for i, part in enumerate(parts):
            op = opcode if i == 0 else core.CONT
            frames.append(cls.frame(op, part, fin=i == len(parts) - 1))
        return b"".join(frames)

    @staticmethod
    def deflate(message, compressor=None, wbits=15):
        """``message`` compressed as RFC 7692 says (sync flush, tail stripped)."""
        if isinstance(message, str):
            message = message.encode()
        if compressor is None:
            compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -wbits)
        data = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(b"\x00\x00\xff\xff")
        return data[:-4]

    @staticmethod
    def inflate(data, decompressor=None):
        if decompressor is None:
            decompressor = zlib.decompressobj(-15)
        return decompressor.decompress(data + b"\x00\x00\xff\xff")


@pytest.fixture(scope="session")
def wire():
    return Wire


# -- feeding bytes ------------------------------------------------------------


class Chunker:
    """Feeds a byte stream to an engine in pieces and collects the events."""

    def __init__(self, name):
        self.name = name

    def split(self, data):
        if self.name == "whole":
            return [data]
        if self.name == "random":
            rnd = random.Random(len(data))
            pieces, at = [], 0
            while at < len(data):
                step = rnd.choice((1, 2, 3, 5, 8, 13, 64, 1000))
                pieces.append(data[at : at + step])
                at += step
            return pieces
        step = int(self.name)
        return [data[i : i + step] for i in range(0, len(data), step)]

    def feed(self, engine, data):
        events = []
        for piece in self.split(data):
            events += engine.receive(piece)
        return events


#: one byte per feed, small odd pieces, seeded random pieces, everything at once.
CHUNKINGS = ["1", "2", "3", "7", "random", "whole"]


@pytest.fixture(params=CHUNKINGS)
def chunks(request):
    return Chunker(request.param)


@pytest.fixture(scope="session")
def chunker():
    """``chunker(name).feed(engine, data)``: for tests that pick their chunkings."""
    return Chunker
