"""Fuzz target ``frames``: the Cython frame engine against the wsproto twin.

Run: ``python -m tests.fuzz.frames -max_total_time=600 tests/fuzz/corpus/frames``

An input is four setting bytes, then the client's byte stream::

    byte 0   bits 0-2  max_message_size  (MESSAGE_LIMITS)
             bits 3-4  max_frame_size    (FRAME_LIMITS)
             bits 5-7  the server action between the two segments (ACTIONS)
    byte 1   bit 0     permessage-deflate negotiated
             bit 1     server_no_context_takeover
             bit 2     client_no_context_takeover
             bits 3-5  client_max_window_bits - 9 (capped at 15)
             bits 6-7  server_max_window_bits (SERVER_BITS)
    byte 2   chunking: 0 feeds each segment whole; else the seed of the
             piece sizes (1, 2, 3, 5, 8, 13, 64 or 1000 bytes each)
    byte 3   where the stream splits into the two segments (byte 3 / 255
             of its length); the server action runs in between
    4..      the bytes the client sends

Both engines get the same pieces through ``receive``; after each segment the
trace (events, ERROR events by code only, the bytes queued for the peer,
state, close code and reason) and the result of the server action must be
equal: the trace is ``tests/unit/test_differential.run``, the comparison the
hypothesis differential test makes.  Nothing may raise out of ``receive``
(the action may raise ``errors.ConnectionClosed`` only, which ``run``
records).

Limits: every TEXT/BINARY event is at most ``max_message_size`` bytes (UTF-8
for text), and, with a limit set, what an engine allocates while it reads
(tracemalloc's peak) stays within what it hands out (the trace) plus the
limit (twice the limit for the wsproto twin, see ``LIMIT_COPIES``), a few
times the input and ``SLACK``: compressed input is never inflated past the
limit and nothing declared is buffered ahead.
"""

from __future__ import annotations

import random
import sys
import tracemalloc

from tests.fuzz import _harness

with _harness.instrumented(__name__ == "__main__", "fastws", "wsproto"):
    from fastws import core
    from fastws.core import BINARY, TEXT, DeflateParams

from tests.unit.test_differential import pieces, run  # after the instrumented imports

#: byte 0, bits 0-2: 0 is "no limit"; 125/126 and 65535/65536 sit on the
#: 7/16/64-bit length encodings
MESSAGE_LIMITS = (0, 64, 125, 126, 300, 4096, 65536, 1 << 20)
#: byte 0, bits 3-4
FRAME_LIMITS = (0, 40, 100, 1000)
#: byte 0, bits 5-7: what the server does between the segments
ACTIONS = (
    None,
    ("close", 1000, ""),
    ("close", 1001, "bye"),
    ("close", 1005, ""),
    ("close", 4000, "é" * 70),            # cut to 123 bytes on a character boundary
    ("send", "hello from the server " * 4),
    ("send", bytes(range(256)) + b"\x00" * 44),
    ("ping", b"are you there"),
)
#: byte 1, bits 6-7
SERVER_BITS = (15, 9, 12, 15)
#: piece sizes of a seeded chunking (as tests/unit/conftest.py's "random" chunker)
STEPS = (1, 2, 3, 5, 8, 13, 64, 1000)
#: allocation allowed on top of the limits: zlib's deflate state for a "send"
#: action (about 300 KiB with 15 window bits), its inflate state (about
#: 45 KiB), the engine objects (measured peaks stay under 350 KiB)
SLACK = 512 << 10
#: how many message-sized buffers an engine may hold at once besides what it
#: hands out: the Cython engine one (the message buffer it inflates into);
#: the wsproto twin two (a message's chunks while ``join`` builds the result)
LIMIT_COPIES = {"cython": 1, "wsproto": 2}

ENGINES = {name: core.engine_module(name) for name in ("cython", "wsproto")}


def decode(data: bytes):
    """``(config, segments, action)`` of an input, as ``run`` takes them."""
    head = data[:4].ljust(4, b"\x00")
    stream = data[4:]
    b0, b1, b2, b3 = head
    config = {"max_message_size": MESSAGE_LIMITS[b0 & 7], "max_frame_size": FRAME_LIMITS[(b0 >> 3) & 3]}
    if b1 & 1:
        config["deflate"] = DeflateParams(
            server_no_context_takeover=bool(b1 & 2),
            client_no_context_takeover=bool(b1 & 4),
            server_max_window_bits=SERVER_BITS[b1 >> 6],
            client_max_window_bits=min(15, 9 + ((b1 >> 3) & 7)),
        )
    action = ACTIONS[b0 >> 5]
    split = len(stream) * b3 // 255
    segments = []
    rnd = random.Random(b2)
    for part in (stream[:split], stream[split:]):
        cuts = []
        if b2:
            at = 0
            while at < len(part):
                at += rnd.choice(STEPS)
                cuts.append(at)
        segments.append(pieces(part, [c for c in cuts if c < len(part)]))
    return config, segments, action


def encode(config: dict, stream: bytes, *, action=None, chunking: int = 0, split: int = 255) -> bytes:
    """The input that ``decode`` turns back into ``config`` (the seeds use it)."""
    b0 = MESSAGE_LIMITS.index(config.get("max_message_size", 1 << 20))
    b0 |= FRAME_LIMITS.index(config.get("max_frame_size", 0)) << 3
    b0 |= ACTIONS.index(action) << 5
    b1 = 0
    params = config.get("deflate")
    if params is not None:
        b1 = 1 | (2 if params.server_no_context_takeover else 0) | (4 if params.client_no_context_takeover else 0)
        b1 |= (params.client_max_window_bits - 9) << 3
        b1 |= SERVER_BITS.index(params.server_max_window_bits) << 6
    return bytes([b0, b1, chunking, split]) + stream


def _objects_size(obj) -> int:
    """Memory held by the bytes/str objects inside a trace (nested tuples/lists)."""
    if isinstance(obj, (bytes, bytearray, str)):
        return sys.getsizeof(obj)
    if isinstance(obj, (tuple, list)):
        return sys.getsizeof(obj) + sum(_objects_size(o) for o in obj)
    return 0


def traced_run(module, config, segments, action):
    """``run`` under tracemalloc: ``(trace, peak bytes allocated during it)``.

    Tracing starts on the first call and stays on (``reset_peak`` per run):
    CPython 3.11 keeps about 36 bytes per distinct traceback on every
    ``tracemalloc.start``/``stop`` cycle, which a stop per input turns into a
    steady RSS climb that looks like a leak of the code under test."""
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    trace = run(module, config, segments, action)
    peak = tracemalloc.get_traced_memory()[1] - base
    return trace, peak


def check_limits(name: str, config: dict, trace, peak: int, input_size: int) -> None:
    limit = config["max_message_size"]
    if not limit:
        return
    for entry in trace:
        if entry[0] != "segment":
            continue
        for event in entry[2]:
            if event[0] in (TEXT, BINARY):
                size = len(event[1].encode("utf-8", "surrogatepass")) if event[0] == TEXT else len(event[1])
                assert size <= limit, f"{name}: a message of {size} bytes passed max_message_size {limit}"
    budget = _objects_size(trace) + LIMIT_COPIES[name] * (limit + 1) + 8 * input_size + SLACK
    assert peak <= budget, (
        f"{name}: allocated {peak} bytes reading {input_size} bytes with max_message_size {limit} "
        f"(budget {budget}: the trace holds {_objects_size(trace)})"
    )


def TestOneInput(data: bytes) -> None:
    config, segments, action = decode(data)
    traces = {}
    for name, module in ENGINES.items():
        trace, peak = traced_run(module, config, segments, action)
        check_limits(name, config, trace, peak, len(data))
        traces[name] = trace
    if traces["cython"] != traces["wsproto"]:
        raise AssertionError(
            f"the engines disagree on {data!r:.300}\nconfig {config} action {action}\n"
            f"cython:  {traces['cython']!r:.2000}\nwsproto: {traces['wsproto']!r:.2000}"
        )


if __name__ == "__main__":
    _harness.main(TestOneInput)
