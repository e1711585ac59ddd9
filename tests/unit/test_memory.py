"""fastws.memory.HeapTrim: the C heap given back after many connections closed.

Real memory, no stand-ins: the test fills the heap with 1 KiB blocks (Python
allocates objects of that size with malloc), frees all but every 64th (so
the free pages lie between live ones, where free() cannot return them),
then lets HeapTrim see the connection count fall from its peak and checks
that the process's RSS went down by most of what was freed.
"""

from __future__ import annotations

import asyncio
import gc

from fastws.memory import HeapTrim, malloc_trim, rss_bytes


def test_malloc_trim_is_found_on_glibc():
    assert malloc_trim is not None        # this machine's libc is glibc


def test_heap_trim_gives_the_freed_heap_back():
    async def main():
        loop = asyncio.get_running_loop()
        counts = iter([20_000, 20_000, 100] + [100] * 50)
        trim = HeapTrim(loop, lambda: next(counts), interval=0.01, min_freed=5000)
        blocks = [bytearray(1024) for _ in range(200_000)]      # ~210 MB of 1 KiB mallocs
        keep = blocks[::64]
        del blocks
        gc.collect()
        before = rss_bytes()
        trim.start()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if trim.trims:
                break
        trim.stop()
        after = rss_bytes()
        assert trim.trims == 1, "one trim after the count fell from 20,000 to 100"
        assert before - after > 100 << 20, (before, after)      # most of the ~200 MB freed came back
        assert trim.released_bytes > 100 << 20, trim.released_bytes
        assert trim.peak == 100                                 # the next trim waits for a new peak
        del keep

    asyncio.run(main())


def test_no_trim_while_connections_stay():
    async def main():
        loop = asyncio.get_running_loop()
        counts = iter([20_000, 17_000, 12_000] + [11_000] * 50)   # down by 9,000 but more than half left
        trim = HeapTrim(loop, lambda: next(counts), interval=0.01, min_freed=5000)
        trim.start()
        await asyncio.sleep(0.3)
        trim.stop()
        assert trim.trims == 0 and trim.peak == 20_000

    asyncio.run(main())
