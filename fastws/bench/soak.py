"""Churn soak: many connect / message / close cycles against one server.

    python -m fastws.bench.soak --port 9001 --server-pid PID [--cycles 200000]

Each cycle opens a TCP connection, upgrades, sends one masked text message,
checks the echo, sends a close frame, waits for the server's close and EOF.
``--concurrency`` cycles run at once. The server's RSS is read after the
first 10% of the cycles (the warm-up) and at the end, and its open file
descriptors (``/proc/PID/fd``) before and after, so a leak of memory or of
descriptors shows. Bounded by ``--cycles`` and ``--max-seconds``; prints one
JSON line. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time

REQUEST = (b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
PAYLOAD = b"churn soak message"
MASK = b"\x01\x02\x03\x04"
MASKED = bytes(b ^ MASK[i % 4] for i, b in enumerate(PAYLOAD))
FRAME = bytes([0x81, 0x80 | len(PAYLOAD)]) + MASK + MASKED
CLOSE = bytes([0x88, 0x82]) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(struct.pack("!H", 1000)))
ECHO = bytes([0x81, len(PAYLOAD)]) + PAYLOAD


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def cycle(host: str, port: int) -> None:
    r, w = await asyncio.open_connection(host, port)
    try:
        w.write(REQUEST + FRAME)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"bad upgrade answer {head[:40]!r}")
        got = await r.readexactly(len(ECHO))
        if got != ECHO:
            raise RuntimeError(f"bad echo {got!r}")
        w.write(CLOSE)
        close = await r.readexactly(4)
        if close[0] != 0x88:
            raise RuntimeError(f"expected a close frame, got {close!r}")
        if await r.read() != b"":
            raise RuntimeError("data after the close frame")
    finally:
        w.close()


async def run(args) -> dict:
    done = 0
    errors = 0
    first_errors: list[str] = []
    warm_at = max(1, args.cycles // 10)
    rss_warm = None
    fds_before = fds(args.server_pid)
    rss_start = rss(args.server_pid)
    start = time.monotonic()
    deadline = start + args.max_seconds
    next_index = 0

    async def worker():
        nonlocal done, errors, next_index, rss_warm
        while next_index < args.cycles and time.monotonic() < deadline:
            next_index += 1
            try:
                await asyncio.wait_for(cycle(args.host, args.port), 10)
            except Exception as exc:  # counted and reported, never hidden
                errors += 1
                if len(first_errors) < 5:
                    first_errors.append(repr(exc))
            done += 1
            if rss_warm is None and done >= warm_at:
                rss_warm = rss(args.server_pid)
            if args.progress and done % 20000 == 0:
                print(f"{done} cycles, {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    await asyncio.sleep(args.settle)
    seconds = time.monotonic() - start
    rss_end = rss(args.server_pid)
    fds_after = fds(args.server_pid)
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else None
    return {
        "scenario": "churn-soak",
        "cycles": done,
        "seconds": round(seconds, 1),
        "cycles_per_s": round(done / seconds),
        "errors": errors,
        "first_errors": first_errors,
        "rss_start": rss_start,
        "rss_after_warmup": rss_warm,
        "rss_end": rss_end,
        "rss_growth_after_warmup": None if growth is None else round(growth, 4),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "ok": errors == 0 and growth is not None and growth <= 0.10 and fds_after <= fds_before,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--cycles", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if not args.host.startswith("127."):
        p.error("the soak only targets loopback addresses")
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
