"""Raw-socket tests against a real ``fastws serve examples.echo:app``.

Frames are built here by hand (independently of fastws's own encoder) and
written on plain TCP sockets, so what is checked is the bytes on the wire:
the upgrade, rejections, chunking, fragmentation, control frames, close codes
and limits. Every test runs on both engines (see conftest.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time

import pytest

LIMIT = 1 << 20  # default --max-message-size
BIG_LIMIT = "67108864"  # 64 MiB, as in the Autobahn run
TIMEOUT = 15.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- helpers: frames --------------------------------------------------------


def mask_payload(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    """A client frame (masked unless ``masked=False``)."""
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if not masked:
        return bytes(head) + payload
    mask = mask if mask is not None else os.urandom(4)
    return bytes(head) + mask + mask_payload(payload, mask)


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(OP_CLOSE, payload)


class Conn:
    """A raw client connection: handshake, send bytes, read server frames."""

    def __init__(self, address, timeout: float = TIMEOUT):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.address = address
        self.buf = bytearray()

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    # -- HTTP ------------------------------------------------------------

    def read_response_head(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
            assert len(self.buf) < 65536, "response head too long"
        end = self.buf.index(b"\r\n\r\n")
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        assert parts[0] == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers, head.encode("latin-1")

    def read_until_eof(self, timeout: float = TIMEOUT) -> bytes:
        self.sock.settimeout(timeout)
        data = bytes(self.buf)
        self.buf.clear()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(
                    f"server kept the connection open {timeout}s after its response"
                ) from None
            if not chunk:
                break
            data += chunk
        return data

    # -- frames ------------------------------------------------------------

    def read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._take(2)
        assert not b1 & 0x80, "server frames must not be masked"
        assert not b0 & 0x70, f"RSV bits set on a server frame: {b0:#x}"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._take(n)

    def read_message(self) -> tuple[int, bytes]:
        """The next data message (fragments joined); pongs are skipped."""
        opcode, parts = None, []
        while True:
            fin, op, payload = self.read_frame()
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise AssertionError(f"expected a message, got close {code} {payload[2:]!r}")
            if opcode is None:
                assert op in (OP_TEXT, OP_BINARY), f"unexpected opcode {op}"
                opcode = op
            else:
                assert op == OP_CONT, f"expected a continuation, got opcode {op}"
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def read_close(self) -> tuple[int | None, bytes]:
        """Skip data/pong frames until the server's close frame."""
        while True:
            try:
                fin, op, payload = self.read_frame()
            except (EOFError, ConnectionResetError) as e:
                raise AssertionError(
                    f"connection ended without a close frame ({e!r})"
                ) from None
            if op == OP_CLOSE:
                assert fin, "fragmented close frame"
                if len(payload) >= 2:
                    return struct.unpack("!H", payload[:2])[0], payload[2:]
                return None, payload

    def expect_eof(self, timeout: float = 5.0) -> None:
        """The server closes TCP after the close exchange."""
        self.sock.settimeout(timeout)
        try:
            extra = self.sock.recv(65536)
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError(f"server kept TCP open {timeout}s after the close") from None
        assert extra == b"", f"data after the close frame: {extra[:60]!r}"


def make_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(
    address,
    path: str = "/",
    key: str | None = None,
    *,
    method: str = "GET",
    headers: dict[str, str | None] | None = None,
    extra: list[tuple[str, str]] = (),
) -> bytes:
    """A client upgrade request; a header set to None in ``headers`` is omitted."""
    base = {
        "Host": f"{address[0]}:{address[1]}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key or make_key(),
        "Sec-WebSocket-Version": "13",
    }
    base.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in base.items() if v is not None]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def open_ws(address, **kw) -> Conn:
    conn = Conn(address)
    key = make_key()
    conn.send(upgrade_request(address, key=key, **kw))
    status, headers, head = conn.read_response_head()
    assert status == 101, head
    assert headers.get("sec-websocket-accept") == accept_for(key), head
    return conn


def assert_echo(conn: Conn, opcode: int, payload: bytes) -> None:
    got_op, got = conn.read_message()
    assert got_op == opcode, f"opcode {got_op}, expected {opcode}"
    assert len(got) == len(payload), f"echo of {len(got)} bytes, expected {len(payload)}"
    assert got == payload, "echo payload differs"


def assert_closed_with(conn: Conn, code: int) -> None:
    got, reason = conn.read_close()
    assert got == code, f"close code {got} ({reason!r}), expected {code}"
    reason.decode("utf-8")  # a close reason is valid UTF-8


# -- the upgrade --------------------------------------------------------------


def test_upgrade_response(echo_server):
    key = make_key()
    with Conn(echo_server.address) as conn:
        conn.send(upgrade_request(echo_server.address, key=key))
        status, headers, head = conn.read_response_head()
        assert status == 101, head
        assert headers["upgrade"].lower() == "websocket", head
        assert "upgrade" in headers["connection"].lower(), head
        assert headers["sec-websocket-accept"] == accept_for(key), head
        assert "sec-websocket-extensions" not in headers, head  # compression is off
        conn.send(frame(OP_TEXT, b"hi"))
        assert_echo(conn, OP_TEXT, b"hi")


def test_upgrade_and_first_frame_in_one_write(echo_server):
    key = make_key()
    with Conn(echo_server.address) as conn:
        conn.send(
            upgrade_request(echo_server.address, key=key)
            + frame(OP_TEXT, b"first")
            + frame(OP_BINARY, b"\x00\x01second")
        )
        status, headers, head = conn.read_response_head()
        assert status == 101, head
        assert headers["sec-websocket-accept"] == accept_for(key)
        assert_echo(conn, OP_TEXT, b"first")
        assert_echo(conn, OP_BINARY, b"\x00\x01second")


def test_request_split_byte_by_byte(echo_server):
    key = make_key()
    data = upgrade_request(echo_server.address, key=key, path="/a/b?x=1")
    with Conn(echo_server.address) as conn:
        for i in range(len(data)):
            conn.send(data[i : i + 1])
            time.sleep(0.001)
        status, headers, head = conn.read_response_head()
        assert status == 101, head
        assert headers["sec-websocket-accept"] == accept_for(key)
        # frames split byte by byte too: 7-bit, 16-bit and 64-bit lengths
        for payload in (b"x" * 5, b"y" * 300, b"z" * 70000):
            f = frame(OP_BINARY, payload)
            step = 1 if len(f) < 1000 else 997
            for i in range(0, len(f), step):
                conn.send(f[i : i + step])
                if step == 1:
                    time.sleep(0.0005)
            assert_echo(conn, OP_BINARY, payload)


def test_request_and_frames_byte_by_byte_without_waiting(echo_server):
    data = upgrade_request(echo_server.address) + frame(OP_TEXT, b"abc") + frame(
        OP_TEXT, "h\u00e9llo \u2603".encode()
    )
    with Conn(echo_server.address) as conn:
        for i in range(len(data)):
            conn.send(data[i : i + 1])
        status, _, head = conn.read_response_head()
        assert status == 101, head
        assert_echo(conn, OP_TEXT, b"abc")
        assert_echo(conn, OP_TEXT, "h\u00e9llo \u2603".encode())


def test_many_frames_in_one_write(echo_server):
    payloads = [str(i).encode() * (i % 7) for i in range(200)]
    with open_ws(echo_server.address) as conn:
        conn.send(b"".join(frame(OP_TEXT, p) for p in payloads))
        for p in payloads:
            assert_echo(conn, OP_TEXT, p)


# -- handshake rejections -----------------------------------------------------


def reject(address, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with Conn(address) as conn:
        conn.send(request)
        status, headers, head = conn.read_response_head()
        rest = conn.read_until_eof(timeout=5.0)  # the server closes after a rejection
        if headers.get("content-length"):
            assert len(rest) == int(headers["content-length"]), (head, rest)
        return status, headers, head


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("method POST", {"method": "POST"}),
        ("method PUT", {"method": "PUT"}),
        ("no Sec-WebSocket-Key", {"headers": {"Sec-WebSocket-Key": None}}),
        ("key not base64", {"headers": {"Sec-WebSocket-Key": "not base64!!"}}),
        ("key of 8 bytes", {"headers": {"Sec-WebSocket-Key": base64.b64encode(b"12345678").decode()}}),
        ("key of 20 bytes", {"headers": {"Sec-WebSocket-Key": base64.b64encode(b"x" * 20).decode()}}),
        ("Upgrade: h2c", {"headers": {"Upgrade": "h2c"}}),
        ("no Upgrade", {"headers": {"Upgrade": None}}),
        ("Connection: keep-alive", {"headers": {"Connection": "keep-alive"}}),
        ("no Connection", {"headers": {"Connection": None}}),
    ],
)
def test_handshake_rejected_400(echo_server, case, kwargs):
    status, _, head = reject(echo_server.address, upgrade_request(echo_server.address, **kwargs))
    assert status == 400, f"{case}: {head}"


@pytest.mark.parametrize("version", ["8", "12", "14"])
def test_wrong_version_426(echo_server, version):
    req = upgrade_request(echo_server.address, headers={"Sec-WebSocket-Version": version})
    status, headers, head = reject(echo_server.address, req)
    assert status == 426, head
    assert headers.get("sec-websocket-version") == "13", head


def test_headers_are_case_insensitive(echo_server):
    key = make_key()
    req = (
        f"GET / HTTP/1.1\r\nhost: {echo_server.host}:{echo_server.port}\r\n"
        f"UPGRADE: WebSocket\r\nconnection: keep-alive, Upgrade\r\n"
        f"sec-websocket-key: {key}\r\nSEC-WEBSOCKET-VERSION: 13\r\n\r\n"
    ).encode()
    with Conn(echo_server.address) as conn:
        conn.send(req)
        status, headers, head = conn.read_response_head()
        assert status == 101, head
        assert headers["sec-websocket-accept"] == accept_for(key)
        conn.send(frame(OP_TEXT, b"ok"))
        assert_echo(conn, OP_TEXT, b"ok")


def test_request_head_over_8k_431(echo_server):
    req = upgrade_request(echo_server.address, extra=[("X-Pad", "a" * 9000)])
    status, _, head = reject(echo_server.address, req)
    assert status == 431, head


def test_unterminated_head_over_8k_431(echo_server):
    """A head that never ends is refused once past the limit, not buffered."""
    req = upgrade_request(echo_server.address)[:-2]  # no blank line
    req += b"".join(b"X-Pad-%d: %s\r\n" % (i, b"b" * 100) for i in range(100))
    assert len(req) > 9000
    with Conn(echo_server.address) as conn:
        conn.send(req)
        status, _, head = conn.read_response_head()
        assert status == 431, head


def test_request_head_under_8k_accepted(echo_server):
    req = upgrade_request(echo_server.address, extra=[("X-Pad", "a" * 7000)])
    assert len(req) < 8000
    with Conn(echo_server.address) as conn:
        conn.send(req + frame(OP_TEXT, b"after a big head"))
        status, _, head = conn.read_response_head()
        assert status == 101, head
        assert_echo(conn, OP_TEXT, b"after a big head")


def test_server_survives_garbage_and_resets(echo_server):
    for junk in (b"\x16\x03\x01\x02\x00" + os.urandom(200), b"\r\n\r\n", b"GET\r\n\r\n", b""):
        with Conn(echo_server.address) as conn:
            if junk:
                conn.send(junk)
            conn.sock.settimeout(1)
            try:
                conn.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                pass
    # abortive close (RST) in the middle of a message
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_BINARY, b"q" * 100000)[:5000])
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_TEXT, b"still alive"))
        assert_echo(conn, OP_TEXT, b"still alive")


# -- control frames -----------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"ping-payload", bytes(range(125))])
def test_ping_answered_with_pong(echo_server, payload):
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_PING, payload))
        fin, op, got = conn.read_frame()
        assert (fin, op, got) == (True, OP_PONG, payload)
        conn.send(frame(OP_TEXT, b"after ping"))
        assert_echo(conn, OP_TEXT, b"after ping")


def test_unsolicited_pong_ignored(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_PONG, b"unsolicited") + frame(OP_TEXT, b"next"))
        fin, op, got = conn.read_frame()
        assert (op, got) == (OP_TEXT, b"next"), "the pong must not be answered or echoed"


def test_close_handshake(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(close_frame(1000, b"bye"))
        code, _ = conn.read_close()
        assert code == 1000
        conn.expect_eof()


def test_empty_close_answered(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(close_frame(None))
        code, _ = conn.read_close()
        assert code in (None, 1000), code
        conn.expect_eof()


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])
def test_valid_close_codes_echoed(echo_server, code):
    with open_ws(echo_server.address) as conn:
        conn.send(close_frame(code))
        got, _ = conn.read_close()
        assert got == code
        conn.expect_eof()


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_invalid_close_code_1002(echo_server, code):
    with open_ws(echo_server.address) as conn:
        conn.send(close_frame(code))
        assert_closed_with(conn, 1002)
        conn.expect_eof()


def test_close_with_one_byte_payload_1002(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_CLOSE, b"\x03"))
        assert_closed_with(conn, 1002)


def test_close_reason_invalid_utf8_1007(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(close_frame(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"))
        assert_closed_with(conn, 1007)


# -- fragmentation ------------------------------------------------------------


def test_fragmented_message_echoed_as_one(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(
            frame(OP_TEXT, b"Hel", fin=False)
            + frame(OP_CONT, b"", fin=False)
            + frame(OP_CONT, b"lo", fin=True)
        )
        assert_echo(conn, OP_TEXT, b"Hello")
        conn.send(frame(OP_BINARY, b"\x00", fin=False) + frame(OP_CONT, b"\xff", fin=True))
        assert_echo(conn, OP_BINARY, b"\x00\xff")


def test_ping_between_fragments(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(
            frame(OP_TEXT, b"frag", fin=False)
            + frame(OP_PING, b"in the middle")
            + frame(OP_CONT, b"mented", fin=True)
        )
        fin, op, got = conn.read_frame()
        assert (op, got) == (OP_PONG, b"in the middle"), "the pong comes before the echo"
        assert_echo(conn, OP_TEXT, b"fragmented")


def test_utf8_split_inside_a_character_across_fragments(echo_server):
    text = "\u20ac\U0001f600".encode()  # 3 + 4 bytes
    with open_ws(echo_server.address) as conn:
        conn.send(
            frame(OP_TEXT, text[:1], fin=False)
            + frame(OP_CONT, text[1:5], fin=False)
            + frame(OP_CONT, text[5:], fin=True)
        )
        assert_echo(conn, OP_TEXT, text)


def test_5000_small_fragments(echo_server):
    parts = [f"{i:05d}|".encode() for i in range(5000)]
    data = frame(OP_TEXT, parts[0], fin=False)
    data += b"".join(frame(OP_CONT, p, fin=False) for p in parts[1:-1])
    data += frame(OP_CONT, parts[-1], fin=True)
    with open_ws(echo_server.address) as conn:
        conn.send(data)
        assert_echo(conn, OP_TEXT, b"".join(parts))


def test_1mib_in_64_byte_fragments(server_factory):
    """Like Autobahn 9.5/9.6: 16,384 fragments, within the size limit."""
    server = server_factory("--max-message-size", BIG_LIMIT)
    payload = os.urandom(LIMIT)
    chunks = [payload[i : i + 64] for i in range(0, LIMIT, 64)]
    mask = os.urandom(4)
    data = frame(OP_BINARY, chunks[0], fin=False, mask=mask)
    data += b"".join(frame(OP_CONT, c, fin=False, mask=mask) for c in chunks[1:-1])
    data += frame(OP_CONT, chunks[-1], fin=True, mask=mask)
    with open_ws(server.address) as conn:
        conn.send(data)
        assert_echo(conn, OP_BINARY, payload)


@pytest.mark.parametrize(
    "case, data",
    [
        ("continuation without a start", frame(OP_CONT, b"x", fin=True)),
        ("new text inside a fragmented message",
         frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b", fin=True)),
        ("new binary inside a fragmented message",
         frame(OP_BINARY, b"a", fin=False) + frame(OP_BINARY, b"b", fin=True)),
        ("fragmented ping", frame(OP_PING, b"a", fin=False) + frame(OP_CONT, b"b")),
        ("ping of 126 bytes", frame(OP_PING, b"p" * 126)),
        ("close of 126 bytes", frame(OP_CLOSE, b"\x03\xe8" + b"r" * 124)),
        ("RSV1 without an extension", frame(OP_TEXT, b"x", rsv=4)),
        ("RSV2", frame(OP_TEXT, b"x", rsv=2)),
        ("RSV3 on a ping", frame(OP_PING, b"x", rsv=1)),
        ("reserved opcode 3", frame(0x3, b"x")),
        ("reserved opcode 0xB", frame(0xB, b"x")),
        ("unmasked text frame", frame(OP_TEXT, b"hello", masked=False)),
        ("unmasked ping", frame(OP_PING, b"", masked=False)),
    ],
)
def test_protocol_error_1002(echo_server, case, data):
    with open_ws(echo_server.address) as conn:
        conn.send(data)
        assert_closed_with(conn, 1002)
        conn.expect_eof(timeout=10)


# -- UTF-8 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, data",
    [
        ("0xff", frame(OP_TEXT, b"\xff")),
        ("surrogate", frame(OP_TEXT, b"ab\xed\xa0\x80cd")),
        ("overlong", frame(OP_TEXT, b"\xc0\xaf")),
        ("truncated at the end", frame(OP_TEXT, b"abc\xe2\x82")),
        ("truncated at the end of a fragmented message",
         frame(OP_TEXT, b"abc", fin=False) + frame(OP_CONT, b"\xf0\x9f\x98", fin=True)),
        ("beyond U+10FFFF", frame(OP_TEXT, b"\xf4\x90\x80\x80")),
    ],
)
def test_invalid_utf8_1007(echo_server, case, data):
    with open_ws(echo_server.address) as conn:
        conn.send(data)
        assert_closed_with(conn, 1007)
        conn.expect_eof(timeout=10)


def test_invalid_utf8_fails_fast_mid_message(echo_server):
    """The first fragment is already invalid: 1007 without waiting for the rest."""
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_TEXT, b"valid so far \xce\xba\xff", fin=False))
        assert_closed_with(conn, 1007)


def test_binary_is_not_utf8_checked(echo_server):
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_BINARY, b"\xff\xfe\xed\xa0\x80"))
        assert_echo(conn, OP_BINARY, b"\xff\xfe\xed\xa0\x80")


# -- limits -------------------------------------------------------------------


def test_exactly_1mib_accepted(echo_server):
    payload = os.urandom(LIMIT)
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_BINARY, payload))
        assert_echo(conn, OP_BINARY, payload)


def test_1mib_plus_1_closed_1009_from_the_header(echo_server):
    """The limit is checked from the header: no payload needs to arrive."""
    data = frame(OP_BINARY, b"\x00" * (LIMIT + 1))
    with open_ws(echo_server.address) as conn:
        conn.send(data[:14 + 100])  # header + mask + a little payload
        assert_closed_with(conn, 1009)


def test_1mib_plus_1_closed_1009_whole_message_sent(echo_server):
    """What real clients do: write the whole message, then read the close."""
    data = frame(OP_BINARY, b"\x00" * (LIMIT + 1))
    with open_ws(echo_server.address) as conn:
        try:
            conn.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert_closed_with(conn, 1009)


def test_1009_close_lingers_while_client_finishes_its_frame(echo_server):
    """After its 1009 close frame the server keeps reading (and discarding)
    until the client has finished the frame it is sending and answered the
    close; only then does TCP close. A server that closes the socket at once
    with unread input resets the connection (RST): a client still writing
    the rest of the big message gets EPIPE/ECONNRESET on its write and
    reports 1006 instead of 1009 (seen with Chromium)."""
    data = frame(OP_BINARY, b"\x00" * (LIMIT + 1))
    with open_ws(echo_server.address) as conn:
        conn.send(data[:65536])
        assert_closed_with(conn, 1009)
        time.sleep(0.2)  # the server has certainly processed its close by now
        try:
            for i in range(65536, len(data), 65536):
                conn.send(data[i : i + 65536])
                time.sleep(0.005)
            conn.send(close_frame(1009))
        except (BrokenPipeError, ConnectionResetError) as e:
            raise AssertionError(
                f"server reset the connection while the client was still sending "
                f"the rest of its message after the 1009 close ({e!r})"
            ) from None
        conn.expect_eof()


def test_1mib_plus_1_text_closed_1009(echo_server):
    data = frame(OP_TEXT, b"a" * (LIMIT + 1))
    with open_ws(echo_server.address) as conn:
        try:
            conn.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert_closed_with(conn, 1009)


def test_fragments_over_the_limit_closed_1009(echo_server):
    half = b"\x01" * (LIMIT // 2 + 1)
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_BINARY, half, fin=False))
        try:
            conn.send(frame(OP_CONT, half, fin=True))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert_closed_with(conn, 1009)


def test_16mib_message_with_64mib_limit(server_factory):
    server = server_factory("--max-message-size", BIG_LIMIT)
    payload = os.urandom(16 << 20)
    with open_ws(server.address) as conn:
        conn.sock.settimeout(60)
        conn.send(frame(OP_BINARY, payload))
        assert_echo(conn, OP_BINARY, payload)
        text = b"0123456789abcdef" * (1 << 20)  # 16 MiB text, in 4 fragments
        q = len(text) // 4
        conn.send(
            frame(OP_TEXT, text[:q], fin=False)
            + frame(OP_CONT, text[q : 2 * q], fin=False)
            + frame(OP_CONT, text[2 * q : 3 * q], fin=False)
            + frame(OP_CONT, text[3 * q :], fin=True)
        )
        assert_echo(conn, OP_TEXT, text)


def test_64mib_limit_still_enforced(server_factory):
    server = server_factory("--max-message-size", BIG_LIMIT)
    with open_ws(server.address) as conn:
        head = bytes([0x82, 0xFF]) + struct.pack("!Q", int(BIG_LIMIT) + 1) + os.urandom(4)
        conn.send(head + b"\x00" * 100)
        assert_closed_with(conn, 1009)


def test_huge_declared_length_closed_1009(echo_server):
    """A 64-bit length of 2**63-1 must not allocate anything."""
    with open_ws(echo_server.address) as conn:
        conn.send(bytes([0x82, 0xFF]) + struct.pack("!Q", (1 << 63) - 1) + os.urandom(4) + b"xx")
        code, _ = conn.read_close()
        assert code in (1009, 1002), code


def test_64bit_length_with_msb_set_rejected(echo_server):
    """RFC 6455 5.2: the most significant bit of a 64-bit length must be 0."""
    with open_ws(echo_server.address) as conn:
        conn.send(bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + os.urandom(4))
        code, _ = conn.read_close()
        assert code in (1002, 1009), code


def test_connection_count_does_not_leak(echo_server):
    """Many short connections, opened and dropped in all the usual ways."""
    for i in range(100):
        conn = open_ws(echo_server.address)
        if i % 3 == 0:
            conn.send(close_frame(1000))
            conn.read_close()
        elif i % 3 == 1:
            conn.send(frame(OP_TEXT, b"x" * 10)[:4])
        conn.close()
    with open_ws(echo_server.address) as conn:
        conn.send(frame(OP_TEXT, b"fine"))
        assert_echo(conn, OP_TEXT, b"fine")
