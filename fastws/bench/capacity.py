"""Capacity: hold N upgraded WebSocket connections to one ``fastws serve
--workers W`` (up to a million on one box), broadcast to all of them, close
them, and measure what each connection costs.

    python -m fastws.bench.capacity --connections 1000000 --out bench/results

What it does, in phases (every wait is bounded; the run stops by itself):

1. **start**: ``fastws serve fastws.bench.peers.fastws_relay:app --workers W
   --ping-interval P`` (W = ceil(N / 15,000) by default, so every worker stays
   well under the 20,000 open files one process may have here); waits until
   all W workers listen (SO_REUSEPORT: one listening socket each).
2. **baseline**: server RSS and PSS (whole process tree), /proc/meminfo
   (Slab, SUnreclaim, MemAvailable), /proc/net/sockstat (TCP inuse, orphan,
   tw, alloc, mem pages), /proc/net/netstat (listen overflows, drops).
3. **open**: K = ceil(N / 15,000) lean *holder* processes (forked here; each a
   uvloop loop of raw ``asyncio.Protocol`` objects with ``__slots__``, no
   per-connection future or task once upgraded) open their share at a
   bounded total rate (``--open-rate``) with a bounded number of handshakes
   in flight, each from its own loopback source address (127.x.y.z: one
   source address gives ~28,000 ephemeral ports toward one server port).
   Time to open all N and connections/s.
4. **hold** (``--hold``, 60 s): nothing is sent but the server's pings (the
   holders answer every PING with a PONG); the server tree's CPU
   (utime + stime from /proc, as a fraction of one core) shows what the
   timer wheel and the ping/pong traffic cost when idle. The kernel's
   memory is read while all are held: the deltas of Slab, SUnreclaim and
   TCP mem pages divided by N. The kernel figure covers *both* ends (the
   client and the server socket of every connection live on this box).
5. **broadcast**: a publisher connection sends ``--broadcasts`` (3) messages
   to the relay room; each must reach every held connection (per-connection
   counts and sequence checked) before the next is sent. Every receiver
   timestamps every message: publish-to-receive latency p50/p99/max.
6. **close**: every holder sends a close frame on each connection, waits
   (bounded) for the server's answer, aborts the rest; then the server's
   RSS, its workers' open file descriptors (/proc/PID/fd) and the kernel's
   TCP sockets are read again after a bounded wait, to show they returned
   toward the baseline.

One JSON file (``capacity-<N>-<stamp>.json``) and a PNG beside it
(connections and server RSS over time, phases marked) go to ``--out``; the
same JSON is printed as one line. If the box cannot hold N (available memory
under ``--min-available`` GiB, open-file or port limits, connect errors, a
stall, the open deadline), opening stops, the rest still runs on what is
held, and ``limit`` says what stopped it, with the evidence. Traffic goes
only to 127.0.0.1, from 127.0.0.0/8 source addresses. No sysctl is changed;
the relevant ones are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import datetime
import errno
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvloop
from matplotlib.figure import Figure

from fastws.bench.loadgen import (
    ACCEPT,
    BINARY,
    CLOSE,
    IP_BIND_ADDRESS_NO_PORT,
    PING,
    PONG,
    FrameParser,
    ProtocolError,
    client_frame,
    upgrade_request,
)
from fastws.memory import INTERVAL as HEAP_TRIM_INTERVAL

HOST = "127.0.0.1"
PER_PROCESS = 15_000          # connections per server worker and per holder process
# Connections per loopback source address. Linux hands out the ephemeral ports
# of one (source, destination) pair even ones first, then odd ones; once the
# ~14,000 even ports of 32768-60999 are taken, every connect() scans them all
# before it finds an odd one, and opening crawls (seen here: from ~4,500/s to
# ~150/s at ~14,000 per address). Staying under half the range avoids that.
PER_SOURCE = 10_000
FD_HARD_CAP = 20_000          # the per-process open-file limit on this machine
MASK = b"\x5a\x17\xc3\x96"
PING_FRAME = b"\x89\x00"      # what fastws sends: an empty ping
PONG_FRAME = client_frame(PONG, b"", MASK)
CLOSE_FRAME = client_frame(CLOSE, b"\x03\xe8", MASK)
LAT = struct.Struct("<QQ")    # broadcast payload: seq, publish time (CLOCK_MONOTONIC ns)

# slots of the shared counter array, per holder
S_OPENED, S_FAILED, S_RECEIVED, S_PONGS, S_LOST, S_CLOSED = range(6)
NSLOTS = 6

# connection states
HANDSHAKE, OPEN, CLOSING, CLOSED = range(4)

SYSCTLS = (
    "net.ipv4.ip_local_port_range", "fs.file-max", "fs.nr_open", "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_mem", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_max_orphans", "net.ipv4.tcp_max_tw_buckets", "net.ipv4.tcp_tw_reuse",
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_count", "vm.max_map_count",
)


# ------------------------------------------------------------------ /proc readers


def read_sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return " ".join(f.read().split())
    except OSError:
        return None


def meminfo() -> dict[str, int]:
    """/proc/meminfo, bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def sockstat() -> dict[str, int]:
    """The TCP line of /proc/net/sockstat (mem is in pages) and sockets used."""
    out = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            kind, _, rest = line.partition(":")
            if kind in ("TCP", "sockets"):
                vals = rest.split()
                prefix = "tcp_" if kind == "TCP" else "sockets_"
                out.update({prefix + k: int(v) for k, v in zip(vals[0::2], vals[1::2], strict=False)})
    return out


def netstat() -> dict[str, int]:
    """Listen-queue and TCP-memory counters of /proc/net/netstat (TcpExt)."""
    wanted = ("ListenOverflows", "ListenDrops", "TCPAbortOnMemory", "TCPMemoryPressures",
              "TCPTimeWaitOverflow", "TCPReqQFullDrop", "TCPReqQFullDoCookies")
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, vals in zip(lines[0::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], map(int, vals.split()[1:]), strict=False))
            return {k: table.get(k, 0) for k in wanted}
    return {}


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def proc_status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(pids: list[int]) -> int:
    """Sum of VmRSS, bytes (pages shared after a fork count once per process)."""
    return sum(proc_status_kb(p, "VmRSS:") for p in pids) * 1024


def pss(pids: list[int]) -> int:
    """Sum of Pss from smaps_rollup, bytes (shared pages split between sharers)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, seconds."""
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def established(port: int) -> int | None:
    """Server-side ESTABLISHED sockets on ``port`` (``ss``; exact, but it
    costs a few seconds of CPU per million sockets: used at a few points)."""
    try:
        out = subprocess.run(f"ss -Htn state established sport = :{port} | wc -l", shell=True,
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip())
    except (subprocess.SubprocessError, ValueError):
        return None


def percentiles_us(ns: np.ndarray) -> dict[str, float | None]:
    if not len(ns):
        return {"p50_us": None, "p99_us": None, "max_us": None, "samples": 0}
    return {"p50_us": round(float(np.percentile(ns, 50)) / 1e3, 1),
            "p99_us": round(float(np.percentile(ns, 99)) / 1e3, 1),
            "max_us": round(float(ns.max()) / 1e3, 1), "samples": int(len(ns))}


# ------------------------------------------------------------- holder processes


@dataclass
class HolderConfig:
    """What one holder process needs (fixed before the fork)."""

    index: int
    count: int
    srcs: list[str]
    port: int
    broadcasts: int
    size: int
    concurrency: int
    handshake_timeout: float


def error_class(exc: BaseException) -> str:
    """The limit a failed connect points to."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return {errno.EMFILE: "fds", errno.ENFILE: "fds", errno.EADDRNOTAVAIL: "ports",
                errno.EADDRINUSE: "ports", errno.ENOMEM: "memory", errno.ENOBUFS: "memory",
                errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset"}.get(exc.errno,
                                                                              errno.errorcode.get(exc.errno, "oserror"))
    return type(exc).__name__


class HeldConnection(asyncio.Protocol):
    """One client connection: upgrade, answer pings, count broadcasts."""

    __slots__ = ("holder", "transport", "state", "buf", "got", "waiter")

    def __init__(self, holder: Holder, waiter: asyncio.Future) -> None:
        self.holder = holder
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.buf = b""
        self.got = 0                   # broadcasts received (= the next expected seq)
        self.waiter: asyncio.Future | None = waiter

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.holder.request)

    def data_received(self, data: bytes) -> None:
        if self.state == OPEN and not self.buf and data == PING_FRAME:
            self.transport.write(PONG_FRAME)     # the common case while idle
            self.holder.shared[self.holder.slot + S_PONGS] += 1
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == HANDSHAKE:
            self.holder.handshake(self, data)
        else:
            self.holder.frames(self, data)

    def connection_lost(self, exc) -> None:
        was = self.state
        self.state = CLOSED
        self.holder.lost(self, was, exc)


class Holder:
    """A process's share of the connections (runs in a forked child)."""

    def __init__(self, cfg: HolderConfig, shared, stop, pipe) -> None:
        self.cfg = cfg
        self.shared = shared
        self.slot = cfg.index * NSLOTS
        self.stop = stop
        self.pipe = pipe
        self.request = upgrade_request(HOST, cfg.port, "/capacity")
        self.conns: list[HeldConnection] = []
        self.errors: dict[str, int] = {}
        self.first_errors: list[str] = []
        self.latency = [array.array("q") for _ in range(cfg.broadcasts)]
        self.server_closed = 0
        self.closed_clean = 0
        self.open_seconds = 0.0
        self.next_src = 0

    def error(self, kind: str, msg: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 5:
            self.first_errors.append(msg)

    # -- per-connection callbacks

    def handshake(self, c: HeldConnection, data: bytes) -> None:
        i = data.find(b"\r\n\r\n")
        if i < 0:
            if len(data) > 8192:
                self.refuse(c, "response head too long")
            else:
                c.buf = data
            return
        head = data[:i]
        if not head.startswith(b"HTTP/1.1 101") or ACCEPT not in head:
            self.refuse(c, f"upgrade refused: {head[:60]!r}")
            return
        c.state = OPEN
        self.conns.append(c)
        self.shared[self.slot + S_OPENED] += 1
        w, c.waiter = c.waiter, None
        if w is not None and not w.done():
            w.set_result(None)
        if len(data) > i + 4:
            self.frames(c, data[i + 4:])

    def refuse(self, c: HeldConnection, msg: str) -> None:
        w, c.waiter = c.waiter, None
        if w is not None and not w.done():
            w.set_exception(ConnectionError(msg))
        c.transport.abort()

    def frames(self, c: HeldConnection, data: bytes) -> None:
        """Every frame the server sends: pings, the broadcasts, a close."""
        n = len(data)
        pos = 0
        while n - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(data[pos + 2:pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2:pos + 10], "big")
                hl = 10
            if n - pos < hl + ln:
                break
            op = b0 & 0x0F
            payload = data[pos + hl:pos + hl + ln]
            pos += hl + ln
            if b1 & 0x80 or b0 & 0x70 or not b0 & 0x80:
                self.error("protocol", f"unexpected frame header {b0:#x} {b1:#x}")
                c.transport.abort()
                return
            if op == PING:
                c.transport.write(client_frame(PONG, payload, MASK) if payload else PONG_FRAME)
                self.shared[self.slot + S_PONGS] += 1
            elif op == BINARY and ln == self.cfg.size:
                t = time.monotonic_ns()
                seq, sent = LAT.unpack_from(payload)
                if seq != c.got or seq >= self.cfg.broadcasts:
                    self.error("sequence", f"broadcast {seq}, expected {c.got}")
                else:
                    self.latency[seq].append(t - sent)
                c.got += 1
                self.shared[self.slot + S_RECEIVED] += 1
            elif op == CLOSE:
                if c.state == CLOSING:
                    self.closed_clean += 1
                else:
                    code = int.from_bytes(payload[:2], "big") if ln >= 2 else 1005
                    self.server_closed += 1
                    self.shared[self.slot + S_LOST] += 1
                    self.error("server-close", f"server closed: {code} {payload[2:60]!r}")
                    c.state = CLOSED       # counted as lost here, not again in connection_lost
                    c.transport.write(CLOSE_FRAME)
                c.transport.close()
                return
            elif op != PONG:
                self.error("protocol", f"unexpected message: opcode {op}, {ln} bytes")
        if pos < n:
            c.buf = data[pos:]

    def lost(self, c: HeldConnection, was: int, exc) -> None:
        if was == HANDSHAKE:
            w, c.waiter = c.waiter, None
            if w is not None and not w.done():
                w.set_exception(ConnectionError(f"lost during the upgrade: {exc}"))
        elif was == OPEN:
            self.shared[self.slot + S_LOST] += 1
            self.error("lost", f"connection lost while held: {exc}")
        elif was == CLOSING:
            self.shared[self.slot + S_CLOSED] += 1

    # -- phases

    async def open_one(self, loop, sem: asyncio.Semaphore) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tr = None
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.cfg.srcs[self.next_src % len(self.cfg.srcs)], 0))
            self.next_src += 1
            sock.setblocking(False)
            waiter = loop.create_future()
            async with asyncio.timeout(self.cfg.handshake_timeout):
                await loop.sock_connect(sock, (HOST, self.cfg.port))
                tr, _ = await loop.create_connection(lambda: HeldConnection(self, waiter), sock=sock)
                await waiter
        except (OSError, ConnectionError, TimeoutError) as e:
            self.shared[self.slot + S_FAILED] += 1
            self.error(error_class(e), f"connect failed: {type(e).__name__}: {e}")
            if tr is not None:
                tr.abort()
            else:
                sock.close()
        finally:
            sem.release()

    async def open_all(self, rate: float, deadline: float) -> None:
        """Open ``count`` connections at ``rate``/s at most, ``concurrency``
        handshakes in flight; stop at the deadline or when told to."""
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(self.cfg.concurrency)
        t0 = time.monotonic()
        for i in range(self.cfg.count):
            if self.stop.value or time.monotonic() > deadline:
                break
            ahead = t0 + i / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
            await sem.acquire()
            loop.create_task(self.open_one(loop, sem))
        for _ in range(self.cfg.concurrency):      # the last handshakes (each bounded)
            await sem.acquire()
        self.open_seconds = time.monotonic() - t0
        gc.collect()
        gc.freeze()      # later collections need not walk the held connections

    async def close_all(self, wait: float) -> None:
        """Close frame on every open connection; the server answers and
        closes; whatever is left after ``wait`` is aborted."""
        for c in self.conns:
            if c.state == OPEN:
                c.state = CLOSING
                c.transport.write(CLOSE_FRAME)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(c.state != CLOSED for c in self.conns):
            await asyncio.sleep(0.2)
        self.aborted = 0
        for c in self.conns:
            if c.state != CLOSED:
                self.aborted += 1
                c.transport.abort()
        await asyncio.sleep(0.1)

    def report(self) -> dict:
        b = self.cfg.broadcasts
        got = [c.got for c in self.conns]
        return {
            "index": self.cfg.index, "srcs": self.cfg.srcs, "asked": self.cfg.count,
            "opened": len(self.conns), "open_seconds": round(self.open_seconds, 2),
            "complete": sum(1 for g in got if g == b), "short": sum(1 for g in got if g < b),
            "over": sum(1 for g in got if g > b), "errors": dict(self.errors),
            "first_errors": list(self.first_errors), "server_closed": self.server_closed,
            "latency_ns": [lat.tobytes() for lat in self.latency],
            "rss": proc_status_kb(os.getpid(), "VmRSS:") * 1024,
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, self.pipe.recv)
            if cmd[0] == "open":
                await self.open_all(cmd[1], cmd[2])
                self.pipe.send(("opened", {"opened": len(self.conns), "errors": dict(self.errors),
                                           "first_errors": list(self.first_errors)}))
            elif cmd[0] == "report":
                self.pipe.send(("report", self.report()))
            elif cmd[0] == "close":
                await self.close_all(cmd[1])
                self.pipe.send(("closed", {"clean": self.closed_clean, "aborted": self.aborted}))
                return


def holder_main(cfg: HolderConfig, shared, stop, pipe) -> None:
    """Entry point of a forked holder process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the parent decides when to stop
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(Holder(cfg, shared, stop, pipe).run())


# --------------------------------------------------------------------- publisher


class Publisher:
    """One blocking connection in this process that sends the broadcasts; a
    thread reads what comes back (its own copies, pings) and answers pings."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.sendall(upgrade_request(HOST, port, "/capacity-publisher"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("publisher: closed during the upgrade")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101") or ACCEPT not in head:
            raise ConnectionError(f"publisher: upgrade refused: {head[:60]!r}")
        self.sock.settimeout(None)
        self.lock = threading.Lock()
        self.parser = FrameParser()
        self.error: str | None = None
        self.pending = rest
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        data = self.pending
        while True:
            try:
                for op, payload in self.parser.feed(data):
                    if op == PING:
                        with self.lock:
                            self.sock.sendall(client_frame(PONG, payload, MASK))
                    elif op == CLOSE:
                        return
                data = self.sock.recv(65536)
            except (OSError, ProtocolError) as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            if not data:
                return

    def publish(self, seq: int, size: int) -> None:
        payload = LAT.pack(seq, time.monotonic_ns()) + bytes(size - LAT.size)
        with self.lock:
            self.sock.sendall(client_frame(BINARY, payload, MASK))

    def close(self) -> None:
        try:
            with self.lock:
                self.sock.sendall(CLOSE_FRAME)
            self.reader.join(5)
        except OSError:
            pass
        self.sock.close()


# ------------------------------------------------------------------- the driver


class Run:
    """The coordinator: server, holders, sampler, phases, report."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.n = a.connections
        self.workers = a.workers or max(1, math.ceil(self.n / PER_PROCESS))
        self.k = max(1, math.ceil(self.n / a.per_holder))
        self.t0 = time.monotonic()
        self.phases: list[list] = []           # [name, start s, end s]
        self.samples: list[dict] = []
        self.stop_sampling = threading.Event()
        self.mem_low: dict | None = None
        self.server: subprocess.Popen | None = None
        self.procs: list[multiprocessing.Process] = []
        self.pipes: list = []
        self.res: dict = {"scenario": "capacity", "connections": self.n, "workers": self.workers,
                          "holder_processes": self.k, "hold_seconds": a.hold,
                          "ping_interval": a.ping_interval, "broadcasts": a.broadcasts,
                          "size": a.size, "open_rate_limit": a.open_rate}

    # -- helpers

    def now(self) -> float:
        return time.monotonic() - self.t0

    def phase(self, name: str) -> None:
        if self.phases and self.phases[-1][2] is None:
            self.phases[-1][2] = round(self.now(), 2)
        self.phases.append([name, round(self.now(), 2), None])

    def server_pids(self) -> list[int]:
        return tree_pids(self.server.pid) if self.server else []

    def holder_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def counter(self, slot: int) -> int:
        return sum(self.shared[i * NSLOTS + slot] for i in range(self.k))

    def snapshot(self) -> dict:
        """Server RSS/PSS/fds, the kernel's memory and TCP sockets, now."""
        pids = self.server_pids()
        mi = meminfo()
        fds = {p: fd_count(p) for p in pids}
        return {"t": round(self.now(), 2), "server_rss": rss(pids), "server_pss": pss(pids),
                "server_processes": len(pids), "server_fds_total": sum(fds.values()),
                "server_fds_max_process": max(fds.values(), default=0),
                "slab": mi.get("Slab", 0), "sunreclaim": mi.get("SUnreclaim", 0),
                "mem_available": mi.get("MemAvailable", 0), "mem_free": mi.get("MemFree", 0),
                **sockstat(), **netstat()}

    def sampler(self) -> None:
        """Every --sample-interval s: connections, RSS, memory (for the plot
        and the memory guard)."""
        floor = self.a.min_available * 2**30
        while not self.stop_sampling.is_set():
            mi = meminfo()
            ss = sockstat()
            opened, lost, closed = self.counter(S_OPENED), self.counter(S_LOST), self.counter(S_CLOSED)
            s = {"t": round(self.now(), 2), "opened": opened, "lost": lost, "closed": closed,
                 "held": opened - lost - closed, "tcp_inuse": ss.get("tcp_inuse", 0),
                 "tcp_tw": ss.get("tcp_tw", 0), "server_rss": rss(self.server_pids()),
                 "mem_available": mi.get("MemAvailable", 0)}
            self.samples.append(s)
            if s["mem_available"] < floor and self.mem_low is None:
                self.mem_low = {"at_s": s["t"], "mem_available": s["mem_available"],
                                "opened": s["opened"], "floor": floor, "slab": mi.get("Slab"),
                                "server_rss": s["server_rss"], "phase": self.phases[-1][0]}
                self.stop.value = 1
            self.stop_sampling.wait(self.a.sample_interval)

    def ask(self, cmd: tuple, reply: str, timeout: float) -> list[dict | None]:
        """Send ``cmd`` to every holder; gather replies until ``timeout``."""
        for p in self.pipes:
            try:
                p.send(cmd)
            except OSError:
                pass
        return self.gather(reply, timeout)

    def gather(self, reply: str, timeout: float) -> list[dict | None]:
        out: list[dict | None] = [None] * len(self.pipes)
        waiting = {p: i for i, p in enumerate(self.pipes)}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for p in multiprocessing.connection.wait(list(waiting), max(0.0, min(1.0, deadline - time.monotonic()))):
                i = waiting.pop(p)
                try:
                    kind, body = p.recv()
                except (EOFError, OSError):
                    continue
                if kind == reply:
                    out[i] = body
        return out

    # -- phases

    def start_server(self) -> None:
        self.port = self.a.port or free_port()
        cmd = [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve",
               "fastws.bench.peers.fastws_relay:app", "--host", HOST, "--port", str(self.port),
               "--workers", str(self.workers), "--ping-interval", str(self.a.ping_interval),
               "--ping-timeout", str(self.a.ping_timeout), "--log-level", "warning",
               "--backlog", "65535"]
        self.res["server_command"] = " ".join(cmd[3:])
        self.phase("start")
        # a file, not a pipe: a full pipe would block the server (closed in cleanup)
        self.server_log = tempfile.TemporaryFile()  # noqa: SIM115
        self.server = subprocess.Popen(cmd, stdout=self.server_log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.monotonic() + 60 + 2 * self.workers
        while True:
            listening = subprocess.run(["ss", "-Hltn", f"sport = :{self.port}"], capture_output=True,
                                       text=True).stdout.count("\n")
            if listening >= self.workers:
                break
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start ({listening} of {self.workers} workers listening): "
                                 f"{self.server_log_tail()}")
            time.sleep(0.25)
        time.sleep(2.0)

    def server_log_tail(self, n: int = 2000) -> str:
        log = getattr(self, "server_log", None)
        if log is None:
            return ""
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - n))
        return log.read().decode("utf-8", "replace")

    def start_holders(self) -> None:
        """Fork the holders (before any thread of this process starts)."""
        ctx = multiprocessing.get_context("fork")
        self.shared = ctx.Array("q", self.k * NSLOTS, lock=False)
        self.stop = ctx.Value("b", 0, lock=False)
        base = random.Random().randrange(16, 240)   # fresh source addresses: no TIME_WAIT from earlier runs
        share = [self.n // self.k + (1 if i < self.n % self.k else 0) for i in range(self.k)]
        per = max(1, math.ceil(max(share) / PER_SOURCE))     # source addresses per holder
        addr = [f"127.{base}.{j // 250}.{2 + j % 250}" for j in range(self.k * per)]
        self.res["source_addresses"] = {"count": len(addr), "first": addr[0], "last": addr[-1],
                                        "per_holder": per, "connections_per_address_max": math.ceil(max(share) / per)}
        gc.collect()
        gc.freeze()
        for i in range(self.k):
            cfg = HolderConfig(index=i, count=share[i], srcs=addr[i * per:(i + 1) * per],
                               port=self.port, broadcasts=self.a.broadcasts, size=self.a.size,
                               concurrency=self.a.concurrency, handshake_timeout=self.a.handshake_timeout)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=holder_main, args=(cfg, self.shared, self.stop, child), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.pipes.append(parent)
        gc.unfreeze()

    def open_phase(self, base: dict) -> None:
        a = self.a
        self.phase("open")
        rate = a.open_rate / self.k
        budget = a.open_timeout or (60 + 2 * self.n / a.open_rate)
        t_open = time.monotonic()
        spids, hpids = self.server_pids(), self.holder_pids()
        c0, h0 = cpu_seconds(spids), cpu_seconds(hpids)
        for p in self.pipes:
            p.send(("open", rate, t_open + budget))
        replies: list[dict | None] = [None] * self.k
        waiting = {p: i for i, p in enumerate(self.pipes)}
        last, last_t = -1, time.monotonic()
        self.stalled = False
        hard = t_open + budget + a.handshake_timeout + 30
        while waiting and time.monotonic() < hard:
            for p in multiprocessing.connection.wait(list(waiting), 1.0):
                i = waiting.pop(p)
                try:
                    kind, body = p.recv()
                except (EOFError, OSError):
                    continue
                replies[i] = body
            opened = self.counter(S_OPENED)
            if opened != last:
                last, last_t = opened, time.monotonic()
            elif time.monotonic() - last_t > a.stall and not self.stop.value:
                self.stalled = True       # no progress: stop trying
                self.stop.value = 1
        self.t_all_open = time.monotonic() - t_open
        dt = max(1e-9, self.t_all_open)
        self.res["open_cpu"] = {
            "server_fraction_of_one_core": round((cpu_seconds(spids) - c0) / dt, 3),
            "holders_fraction_of_one_core": round((cpu_seconds(hpids) - h0) / dt, 3),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }
        self.open_replies = replies
        opened = self.counter(S_OPENED)
        errors: dict[str, int] = {}
        first: list[str] = []
        for r in replies:
            if r:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
                first += r["first_errors"][: max(0, 5 - len(first))]
        self.res.update(opened=opened, open_seconds=round(self.t_all_open, 2),
                        connections_per_s=round(opened / self.t_all_open) if self.t_all_open else None,
                        open_failed=self.counter(S_FAILED), open_errors=errors, open_first_errors=first,
                        holders_not_answering=sum(1 for r in replies if r is None))

    def run(self) -> dict:
        a = self.a
        self.res["sysctls"] = {s: read_sysctl(s) for s in SYSCTLS}
        self.res["rlimit_nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
        self.res["cpus"] = os.cpu_count()
        self.res["mem_total"] = meminfo().get("MemTotal")
        self.start_server()
        self.start_holders()
        time.sleep(1.0)
        base = self.snapshot()
        base["holders_rss"] = rss(self.holder_pids())
        base["holders_pss"] = pss(self.holder_pids())
        self.res["baseline"] = base
        sampler = threading.Thread(target=self.sampler, daemon=True)
        sampler.start()

        self.open_phase(base)
        time.sleep(a.settle)
        held_n = self.counter(S_OPENED) - self.counter(S_LOST)
        self.res["held_connections"] = held_n
        self.phase("held")
        held = self.snapshot()
        held["server_established_ss"] = established(self.port)
        held["holders_rss"] = rss(self.holder_pids())
        held["holders_pss"] = pss(self.holder_pids())
        self.res["held"] = held
        self.res["per_connection"] = self.per_connection(base, held, held_n)

        skip = self.mem_low is not None or held_n == 0
        if not skip and a.hold > 0:
            self.hold_phase(held_n)
        if not skip and a.broadcasts > 0:
            self.broadcast_phase(held_n)
        self.close_phase(base)
        self.stop_sampling.set()
        sampler.join(5)
        self.res["limit"] = self.limit(held_n)
        self.res["ok"] = (held_n == self.n and self.res.get("broadcast", {}).get("all_delivered", False)
                          and self.res.get("lost_while_held", 1) == 0)
        return self.res

    def per_connection(self, base: dict, held: dict, n: int) -> dict:
        if not n:
            return {}
        d = {k: held[k] - base[k] for k in ("server_rss", "server_pss", "slab", "sunreclaim", "tcp_mem")}
        return {
            "server_rss_bytes": round(d["server_rss"] / n),
            "server_pss_bytes": round(d["server_pss"] / n),
            "kernel_slab_bytes": round(d["slab"] / n),
            "kernel_sunreclaim_bytes": round(d["sunreclaim"] / n),
            "kernel_tcp_mem_bytes": round(d["tcp_mem"] * 4096 / n),
            "mem_available_drop_bytes": round((base["mem_available"] - held["mem_available"]) / n),
            "client_rss_bytes": round((held["holders_rss"] - base["holders_rss"]) / n),
            "client_pss_bytes": round((held["holders_pss"] - base["holders_pss"]) / n),
            "kernel_note": ("the kernel figures cover both ends of each connection (the client and the "
                            "server socket, file and epoll entry live on this one machine) and anything "
                            "else the kernel allocated meanwhile; the server figures are the whole server "
                            "process tree (supervisor + workers)"),
        }

    def hold_phase(self, n: int) -> None:
        """Idle with pings: the server tree's CPU over --hold seconds."""
        self.phase("hold")
        spids, hpids = self.server_pids(), self.holder_pids()
        c0, h0, p0, l0 = cpu_seconds(spids), cpu_seconds(hpids), self.counter(S_PONGS), self.counter(S_LOST)
        t0 = time.monotonic()
        end = t0 + self.a.hold
        while time.monotonic() < end and self.mem_low is None:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        dt = time.monotonic() - t0
        pongs = self.counter(S_PONGS) - p0
        self.res["hold"] = {
            "seconds": round(dt, 1),
            "server_cpu_fraction_of_one_core": round((cpu_seconds(spids) - c0) / dt, 4),
            "holders_cpu_fraction_of_one_core": round((cpu_seconds(hpids) - h0) / dt, 4),
            "pongs_sent": pongs, "pings_per_s": round(pongs / dt, 1),
            # fastws pings a quiet connection every interval, then waits up to the
            # timeout before it schedules the next interval: one ping per interval + timeout
            "expected_pings_per_s": round(n / (self.a.ping_interval + self.a.ping_timeout), 1)
            if self.a.ping_interval else 0,
            "lost_during_hold": self.counter(S_LOST) - l0,
            "server_rss_end": rss(self.server_pids()),
        }

    def broadcast_phase(self, n: int) -> None:
        """--broadcasts messages, each to every held connection."""
        self.phase("broadcast")
        a = self.a
        pub = Publisher(self.port)
        time.sleep(0.5)
        per = []
        start_lost = self.counter(S_LOST)
        try:
            for seq in range(a.broadcasts):
                target = self.counter(S_RECEIVED) + n - (self.counter(S_LOST) - start_lost)
                t = time.monotonic()
                pub.publish(seq, a.size)
                limit = t + 30 + n / 20000
                while time.monotonic() < limit and self.mem_low is None:
                    if self.counter(S_RECEIVED) >= target - (self.counter(S_LOST) - start_lost):
                        break
                    time.sleep(0.02)
                per.append({"seq": seq, "all_in_s": round(time.monotonic() - t, 3),
                            "received": self.counter(S_RECEIVED)})
                time.sleep(a.gap)
        finally:
            pub.close()
        reps = self.ask(("report",), "report", 60 + n / 50000)
        self.reports = reps
        lat = [np.concatenate([np.frombuffer(r["latency_ns"][s], dtype=np.int64) for r in reps if r] or
                              [np.zeros(0, np.int64)]) for s in range(a.broadcasts)]
        for s, d in enumerate(per):
            d.update(percentiles_us(lat[s]))
        complete = sum(r["complete"] for r in reps if r)
        self.res["broadcast"] = {
            "per_broadcast": per,
            "latency_all": percentiles_us(np.concatenate(lat) if lat else np.zeros(0, np.int64)),
            "receivers": n, "complete": complete,
            "short": sum(r["short"] for r in reps if r), "over": sum(r["over"] for r in reps if r),
            "deliveries": self.counter(S_RECEIVED), "expected_deliveries": n * a.broadcasts,
            "all_delivered": complete == n and self.counter(S_RECEIVED) == n * a.broadcasts,
            "publisher_error": pub.error,
            "holder_errors": merge_errors(reps),
            "holder_first_errors": sorted({e for r in reps if r for e in r["first_errors"]})[:20],
            "latency_note": "publish (CLOCK_MONOTONIC in the publisher) to receive (the same clock in "
                            "the holder, at data_received), every message of every connection",
        }
        self.res["lost_while_held"] = self.counter(S_LOST)

    def close_phase(self, base: dict) -> None:
        """Close everything; wait (bounded) for the server and the kernel to let go."""
        a = self.a
        self.phase("close")
        pre = self.counter(S_OPENED)
        replies = self.ask(("close", a.close_wait), "closed", a.close_wait + 60)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        closed_at = self.now()
        self.phase("release")
        # until the server's workers hold no more descriptors than before (the
        # holders have exited: their sockets are gone); other processes' TCP
        # sockets on this machine are not ours to wait for
        deadline = time.monotonic() + a.release_wait
        while time.monotonic() < deadline:
            pids = self.server_pids()
            if sum(fd_count(p) for p in pids) <= base["server_fds_total"] + max(10, pre // 1000):
                break
            time.sleep(0.5)
        # the kernel frees in the background, and each worker gives its C heap
        # back at its next check (fastws.memory.HeapTrim, every INTERVAL seconds)
        time.sleep(min(HEAP_TRIM_INTERVAL + 2.0, max(0.0, deadline - time.monotonic())))
        after = self.snapshot()
        after["server_established_ss"] = established(self.port)
        after["released_after_s"] = round(self.now() - closed_at, 1)
        self.res["after_close"] = after
        self.res["close"] = {
            "clean": sum(r["clean"] for r in replies if r), "aborted": sum(r["aborted"] for r in replies if r),
            "holders_not_answering": sum(1 for r in replies if r is None),
        }
        held = self.res["held"]
        self.res["returned"] = {
            k: {"before": base[k], "held": held[k], "after": after[k]}
            for k in ("server_rss", "server_pss", "server_fds_total", "server_fds_max_process", "tcp_inuse",
                      "tcp_orphan", "tcp_tw", "tcp_alloc", "tcp_mem", "slab", "sunreclaim", "mem_available")
        }
        self.phase("end")

    def limit(self, held_n: int) -> dict | None:
        """What stopped the open phase short of N, with the evidence."""
        if held_n >= self.n:
            return None
        errors = self.res.get("open_errors", {})
        d_net = {k: self.res["held"].get(k, 0) - self.res["baseline"].get(k, 0) for k in netstat()}
        evidence = {"open_errors": errors, "first_errors": self.res.get("open_first_errors"),
                    "netstat_deltas": d_net, "server_fds_max_process": self.res["held"]["server_fds_max_process"],
                    "mem_available_at_held": self.res["held"]["mem_available"]}
        if self.mem_low:
            kind = "memory"
            evidence["mem_low"] = self.mem_low
        elif errors:
            kind = max(errors, key=errors.get)
        elif self.stalled:
            kind = "stall (no new connection for --stall seconds: CPU or the accept queue)"
        else:
            kind = "time (open deadline)"
        return {"kind": kind, "held": held_n, "asked": self.n, "evidence": evidence}

    # -- cleanup, output

    def cleanup(self) -> None:
        self.stop_sampling.set()
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(10)
        self.res["server_log_tail"] = self.server_log_tail()
        if getattr(self, "server_log", None) is not None:
            self.server_log.close()

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        stem = out / f"capacity-{self.n}-{stamp}"
        self.res["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.res["phases"] = self.phases
        self.res["timeline"] = self.samples
        self.res["json"] = stem.with_suffix(".json").name
        self.res["png"] = stem.with_suffix(".png").name
        plot(self, stem.with_suffix(".png"))
        stem.with_suffix(".json").write_text(json.dumps(self.res, indent=1) + "\n")
        return stem.with_suffix(".json")


def merge_errors(reports: list[dict | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reports:
        for k, v in (r or {}).get("errors", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def plot(run: Run, path: Path) -> None:
    """Top: connections (the holders' count of upgraded ones, and the kernel's
    TCP sockets in use above the baseline, halved: both ends are here).
    Bottom: the server tree's RSS and the machine's used memory. Phases shaded."""
    s = run.samples
    fig = Figure(figsize=(10, 7))
    top = fig.add_subplot(2, 1, 1)
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    if s:
        t = [x["t"] for x in s]
        base_inuse = run.res.get("baseline", {}).get("tcp_inuse", s[0]["tcp_inuse"])
        top.plot(t, [x["held"] for x in s], label="connections open (holders' count: upgraded - closed - lost)",
                 color="tab:blue")
        top.plot(t, [max(0, x["tcp_inuse"] - base_inuse) / 2 for x in s], color="tab:cyan", linestyle="--",
                 label="(TCP sockets in use - baseline) / 2, /proc/net/sockstat")
        bottom.plot(t, [x["server_rss"] / 2**30 for x in s], color="tab:red", label="server RSS (supervisor + workers)")
        total = run.res.get("mem_total") or 0
        bottom.plot(t, [(total - x["mem_available"]) / 2**30 for x in s], color="tab:gray", linestyle=":",
                    label="machine memory in use (MemTotal - MemAvailable)")
    colors = {"open": "#dde8f7", "hold": "#e4f4e4", "broadcast": "#fbe9d0", "close": "#f6dcdc",
              "release": "#eeeeee"}
    end = run.now()
    for ax in (top, bottom):
        for name, t0, t1 in run.phases:
            if name in colors:
                ax.axvspan(t0, t1 if t1 is not None else end, color=colors[name], alpha=0.7, lw=0)
                if ax is top:
                    ax.text(t0, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
        ax.legend(loc="center left", fontsize=8)
    top.set_ylabel("connections")
    bottom.set_ylabel("GiB")
    bottom.set_xlabel("seconds since start")
    pc = run.res.get("per_connection", {})
    fig.suptitle(f"fastws capacity: {run.res.get('opened', 0):,} of {run.n:,} held, {run.workers} workers; "
                 f"server {pc.get('server_rss_bytes', '?')} B/conn (RSS), kernel {pc.get('kernel_slab_bytes', '?')}"
                 " B/conn (Slab, both ends)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=100_000, help="N connections to hold")
    p.add_argument("--workers", type=int, default=0, help="server workers (default: ceil(N / 15000))")
    p.add_argument("--per-holder", type=int, default=PER_PROCESS, help="connections per holder process")
    p.add_argument("--hold", type=float, default=60.0, help="seconds to hold them idle (pings on)")
    p.add_argument("--ping-interval", type=float, default=20.0, help="the server's --ping-interval")
    p.add_argument("--ping-timeout", type=float, default=20.0, help="the server's --ping-timeout")
    p.add_argument("--broadcasts", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="broadcast payload bytes (>= 16)")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between broadcasts")
    p.add_argument("--open-rate", type=float, default=5000.0, help="connections opened per second at most")
    p.add_argument("--concurrency", type=int, default=16, help="handshakes in flight per holder")
    p.add_argument("--handshake-timeout", type=float, default=20.0)
    p.add_argument("--open-timeout", type=float, default=0.0,
                   help="seconds allowed for opening (default 60 + 2 N / --open-rate)")
    p.add_argument("--stall", type=float, default=60.0, help="stop opening after this long without progress")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after opening before the 'held' reading")
    p.add_argument("--close-wait", type=float, default=0.0,
                   help="seconds for the close handshakes (default 30 + N / 10000)")
    p.add_argument("--release-wait", type=float, default=60.0,
                   help="seconds to wait after closing for the server's fds and the TCP sockets to return")
    p.add_argument("--min-available", type=float, default=2.0,
                   help="GiB of MemAvailable under which opening stops and everything closes")
    p.add_argument("--sample-interval", type=float, default=1.0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    a.close_wait = a.close_wait or 30 + a.connections / 10_000
    if a.size < LAT.size or a.size > 125:
        p.error(f"--size must be {LAT.size}..125")
    if a.per_holder + 100 > FD_HARD_CAP:
        p.error(f"--per-holder must stay under the {FD_HARD_CAP} open files of one process")
    return a


def time_budget(a: argparse.Namespace, workers: int) -> float:
    """Seconds the whole run may take before the watchdog stops it."""
    opening = a.open_timeout or (60 + 2 * a.connections / a.open_rate)
    broadcasts = a.broadcasts * (30 + a.connections / 20000 + a.gap) + 60 + a.connections / 50000
    return (60 + 2 * workers + opening + a.handshake_timeout + 30 + a.settle + a.hold + broadcasts
            + a.close_wait + 60 + a.release_wait + 300)


def on_alarm(signum, frame) -> None:
    raise TimeoutError("the run took longer than its time budget (watchdog)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    run = Run(a)
    rc = 1
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(math.ceil(time_budget(a, run.workers)))
    try:
        run.run()
        rc = 0 if run.res["ok"] else 1
    except BaseException as e:          # report what we have, then clean up
        run.res["ok"] = False
        run.res["crashed"] = f"{type(e).__name__}: {e}"
        if isinstance(e, KeyboardInterrupt):
            rc = 130
    finally:
        signal.alarm(0)
        run.cleanup()
    path = run.write(Path(a.out))
    line = {k: v for k, v in run.res.items() if k not in ("timeline",)}
    line["json_path"] = str(path)
    print(json.dumps(line))
    return rc


if __name__ == "__main__":
    sys.exit(main())
