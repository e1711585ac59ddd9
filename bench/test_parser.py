"""Frame-parser benchmark: fastws's engines vs wsproto's and websockets' parsers.

    python -m pytest bench/test_parser.py --benchmark-only --benchmark-columns=min,median,ops

Each benchmark parses the same pre-built byte string of masked client frames
and consumes every event.  Two workloads:

* small: 1,000 masked text frames of 32 bytes each (per-frame overhead);
* large: 16 masked binary frames of 64 KiB each (unmasking and copying).

Figures and ratios are in bench/README.md.
"""

from __future__ import annotations

import os
import random

import pytest

from fastws import _core

SEED = 1234
rng = random.Random(SEED)


def _frames(opcode: int, size: int, count: int) -> bytes:
    out = []
    for _ in range(count):
        payload = bytes(rng.randrange(32, 127) for _ in range(size))
        mask = os.urandom(4)
        out.append(_core.encode_frame(opcode, payload, mask=mask))
    return b"".join(out)


SMALL = _frames(1, 32, 1000)
LARGE = _frames(2, 65536, 16)
WORKLOADS = {"small32x1000": (SMALL, 1000), "large64kx16": (LARGE, 16)}


def parse_fastws_cython(data, n):
    e = _core.Engine(max_message_size=0)
    events = e.receive(data)
    assert len(events) == n


def parse_fastws_wsproto_engine(data, n):
    from fastws import _wsproto_engine

    e = _wsproto_engine.Engine(max_message_size=0)
    events = e.receive(data)
    assert len(events) == n


def parse_wsproto(data, n):
    from wsproto.frame_protocol import FrameProtocol

    p = FrameProtocol(client=False, extensions=[])
    p.receive_bytes(data)
    count = sum(1 for f in p.received_frames() if f.frame_finished and f.message_finished)
    assert count == n


def parse_websockets(data, n):
    from websockets.protocol import OPEN
    from websockets.server import ServerProtocol

    p = ServerProtocol(state=OPEN, max_size=None)
    p.receive_data(data)
    assert len(p.events_received()) == n


PARSERS = {
    "fastws-cython": parse_fastws_cython,
    "wsproto": parse_wsproto,
    "websockets": parse_websockets,
}


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("parser", list(PARSERS))
def test_parse(benchmark, parser, workload):
    data, n = WORKLOADS[workload]
    benchmark.group = workload
    benchmark.extra_info["bytes"] = len(data)
    benchmark.extra_info["frames"] = n
    benchmark(PARSERS[parser], data, n)
