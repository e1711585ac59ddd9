"""The wsproto-backed frame engine: the reference twin of ``fastws._core``.

It implements the interface documented in :mod:`fastws.core` (read that
docstring first) on top of wsproto's frame layer, so that a parser written by
others is the oracle in every protocol test, and so that fastws runs, slower,
where the Cython extension is not built.

Theory of operation
-------------------
wsproto's ``FrameProtocol`` does the parsing and most of the validation: it
reads headers, unmasks, hands out data frames *in chunks* as their payload
arrives (control frames only once complete), decodes text incrementally, and
raises ``ParseFailed(msg, code)`` on a violation. This adapter adds what the
fastws contract needs on top, at three hooks:

* ``_FrameDecoder.parse_header``: called once a whole frame header (masking key
  included) has been read and before any of its payload is consumed. Here the
  engine checks fragment sequencing and the size limits, so a 1009 (or a stray
  continuation) is reported from the header alone.
* ``_MessageDecoder``: Python's incremental UTF-8 decoder holds back the
  prefix ``ED A0..BF`` (a UTF-16 surrogate) until its third byte arrives; the
  RFC asks to fail fast, so that prefix is rejected as soon as it is seen.
* ``_ServerFrameProtocol._process_close``: close codes are checked with
  :func:`fastws.errors.is_valid_close_code` (wsproto rejects 1014).

and, with permessage-deflate, ``_BoundedDeflate`` replaces wsproto's inbound
decompression: it inflates each chunk of compressed payload as wsproto hands
it over (nothing compressed is stored), at most ``max_message_size + 1``
bytes per message (a zip bomb fails with 1009 without being inflated), and
it keeps the "compressed message" bit across control frames interleaved with
the fragments (wsproto 1.3.2 drops it there).

The checks, in the order the Cython engine must follow (within a stage too),
each made as soon as the bytes it needs have arrived:

1. first 2 header bytes: unknown opcode; fragmented control frame; control
   frame with a 7-bit length > 125                                   -> 1002
2. extended length read: 16-bit length <= 125 or 64-bit length <= 65535
   (non-minimal), 64-bit length with the top bit set; RSV bits not claimed by
   a negotiated extension; an unmasked frame to a server, a masked frame
   to a client                                                        -> 1002
3. masking key read: continuation with no message started, or a new data
   frame inside a fragmented message                                  -> 1002;
   frame length > max_frame_size, or message length so far plus frame
   length > max_message_size                                          -> 1009
   (lengths as declared on the wire; for a compressed message each limit
   is raised by deflate's worst-case overhead, see ``deflate_bound``)
4. payload: text checked incrementally (1007); compressed payload inflated
   incrementally (bad data 1007, past max_message_size 1009); a control frame
   is handled once its whole payload is in; close payload: 1 byte -> 1002,
   invalid code -> 1002, then invalid UTF-8 reason -> 1007.

Choices the contract leaves open, made here:

* A ping is answered while CLOSING too (RFC 6455 5.5.2: unless a close was
  *received*); after CLOSED nothing is read.
* ``close_code``/``close_reason``: the peer's close frame (1005, "" if
  empty), or the ERROR code and its canonical reason; None until then, so
  still None while CLOSING.
* ``send``/``ping``/``close`` outside OPEN raise ``errors.ConnectionClosed``
  (the code/reason above, else the ones we sent); ``close`` raises
  ValueError for a code a peer may not receive (1005 sends an empty close),
  and cuts the reason to 123 UTF-8 bytes on a character boundary (as
  wsproto does); ``ping`` raises ValueError past 125 bytes.
* With deflate, ``send`` compresses every data message (see _BoundedDeflate).

The client role (``Engine(client=True)``) is wsproto's client
``FrameProtocol``: every frame out masked with a fresh key (wsproto draws
each from ``os.urandom``), frames in must come unmasked, and with
permessage-deflate the roles of the parameters swap (what the client
compresses follows ``client_*``, what it inflates ``server_*``).

Nothing here touches a socket: bytes in, event tuples out, bytes queued.
"""

from __future__ import annotations

import struct
import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import (
    Frame,
    FrameDecoder,
    FrameProtocol,
    Header,
    MessageDecoder,
    Opcode,
    ParseFailed,
    RsvBits,
    XorMaskerSimple,
)

from . import errors
from .frames import BINARY, CLOSE, CLOSED, CLOSING, CONT, ERROR, OPEN, PING, PONG, TEXT  # noqa: F401

# The four bytes RFC 7692 strips from the end of every compressed message.
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


def deflate_bound(n: int) -> int:
    """The most bytes deflate can turn ``n`` bytes into (zlib's compressBound).

    Incompressible data goes out in stored blocks, a few bytes each, so a
    compressed message may pass a size limit on the wire by this much, and
    no more: the header check refuses anything longer before its payload is
    read, whatever it would inflate to.
    """
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


class _FrameDecoder(FrameDecoder):
    """wsproto's frame decoder, plus a call once a header is read."""

    def __init__(self, client: bool, extensions, on_header) -> None:
        super().__init__(client=client, extensions=extensions)
        self._on_header = on_header

    def parse_header(self) -> bool:
        if not super().parse_header():
            return False
        # The header (masking key included) is consumed, no payload yet.
        self._on_header(self.header)
        return True


class _MessageDecoder(MessageDecoder):
    """wsproto's message decoder, failing fast on a UTF-16 surrogate prefix."""

    def process_frame(self, frame: Frame) -> Frame:
        frame = super().process_frame(frame)
        if self.decoder is not None:  # a text message is still in progress
            pending, _ = self.decoder.getstate()
            if pending[:1] == b"\xed" and pending[1:2] >= b"\xa0":
                raise ParseFailed(
                    "invalid UTF-8: surrogate code point",
                    errors.INVALID_PAYLOAD,
                )
        return frame


class _FrameProtocol(FrameProtocol):
    """wsproto's FrameProtocol (server side, or client side with ``client``)
    with fastws's hooks installed."""

    def __init__(self, client: bool, extensions, on_header) -> None:
        super().__init__(client=client, extensions=extensions)
        # The parsing generator is not started yet; it looks these up lazily.
        self._frame_decoder = _FrameDecoder(client, self.extensions, on_header)
        self._message_decoder = _MessageDecoder()

    def whole_message(self, opcode: Opcode, payload: bytes) -> bytearray:
        """One unfragmented data frame of ``opcode`` around ``payload``,
        through the extensions (compressed with permessage-deflate)."""
        return self._serialize_frame(opcode, payload, True)

    def _process_close(self, frame: Frame) -> Frame:
        data = frame.payload
        if not data:
            code, reason = errors.NO_STATUS_RCVD, ""
        elif len(data) == 1:
            raise ParseFailed("close frame with a 1-byte payload")
        else:
            (code,) = struct.unpack("!H", data[:2])
            if not errors.is_valid_close_code(code):
                raise ParseFailed(f"invalid close code {code}")
            try:
                reason = bytes(data[2:]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ParseFailed(
                    f"close reason is not UTF-8: {exc}", errors.INVALID_PAYLOAD
                ) from None
        return Frame(frame.opcode, (code, reason), frame.frame_finished, frame.message_finished)


class _BoundedDeflate(PerMessageDeflate):
    """permessage-deflate whose inbound side never inflates past a limit.

    The outbound side (compressing what this side sends) is wsproto's:
    zlib level 6 (Z_DEFAULT_COMPRESSION), memLevel 8, raw deflate with
    ``server_max_window_bits``, Z_SYNC_FLUSH at the end of each message with
    the 4-byte tail stripped, a fresh compressor per message under
    ``server_no_context_takeover`` (the ``client_*`` parameters in the
    client role).  The inbound side inflates with the peer's parameters:
    the client's on the server side, the server's on the client side.
    """

    def __init__(self, params, max_message_size: int, client: bool = False) -> None:
        # zlib cannot deflate with an 8-bit window and wsproto refuses it;
        # a 9-bit window inflates anything an 8-bit one produced.
        super().__init__(
            client_no_context_takeover=params.client_no_context_takeover,
            client_max_window_bits=max(9, params.client_max_window_bits),
            server_no_context_takeover=params.server_no_context_takeover,
            server_max_window_bits=max(9, params.server_max_window_bits),
        )
        self.finalize(self.name)  # negotiated already: just enable it
        self._client = client
        # what the peer compresses with: its window and no_context_takeover
        self._peer_bits = self.server_max_window_bits if client else self.client_max_window_bits
        self._peer_no_context = (params.server_no_context_takeover if client
                                 else params.client_no_context_takeover)
        self._max_message_size = max_message_size
        self._message_compressed = False  # RSV1 of the current message's first frame
        self._frame_compressed = False  # the current frame's payload is deflated
        self._inflated = 0  # bytes inflated so far for the current message

    def frame_inbound_header(self, proto, opcode, rsv, payload_length):
        if rsv.rsv1 and (opcode.iscontrol() or opcode is Opcode.CONTINUATION):
            raise ParseFailed(f"RSV1 set on a {opcode.name} frame")
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self._message_compressed = rsv.rsv1
            self._inflated = 0
            if rsv.rsv1 and self._decompressor is None:
                self._decompressor = zlib.decompressobj(-self._peer_bits)
        # A control frame between fragments leaves the message's bit alone.
        self._frame_compressed = self._message_compressed and not opcode.iscontrol()
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(self, proto, data):
        if not self._frame_compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(self, proto, fin):
        if not (fin and self._frame_compressed):
            return None
        data = self._inflate(_DEFLATE_TAIL)
        if self._peer_no_context or self._decompressor.eof:
            # eof: the peer ended the deflate stream (BFINAL); the next
            # message starts a new one.
            self._decompressor = None
        self._message_compressed = False
        return data

    def _inflate(self, data: bytes) -> bytes:
        try:
            if not self._max_message_size:
                out = self._decompressor.decompress(data)
            else:
                room = self._max_message_size - self._inflated
                out = self._decompressor.decompress(data, room + 1)
                if len(out) > room:
                    raise ParseFailed(
                        "compressed message inflates past max_message_size",
                        errors.MESSAGE_TOO_BIG,
                    )
        except zlib.error as exc:
            raise ParseFailed(f"invalid deflate data: {exc}", errors.INVALID_PAYLOAD) from None
        self._inflated += len(out)
        return out


class Engine:
    """Server side of one WebSocket connection, on wsproto's frame layer
    (client side with ``client=True``: wsproto's client frame protocol).

    See :mod:`fastws.core` for the interface. ``deflate`` is the negotiated
    :class:`fastws.core.DeflateParams` (or None); with it, messages this side
    sends are compressed too.
    """

    def __init__(self, max_message_size: int = 1 << 20, max_frame_size: int = 0, deflate=None,
                 client: bool = False) -> None:
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.client = bool(client)
        self.state = OPEN
        self.close_code: int | None = None  # from the peer's close frame, or our ERROR
        self.close_reason: str | None = None
        self._sent_close: tuple[int, str] | None = None  # what close() put on the wire
        extensions = [] if deflate is None else [_BoundedDeflate(deflate, max_message_size, self.client)]
        self._proto = _FrameProtocol(self.client, extensions, self._check_header)
        self._outgoing = bytearray()  # pongs, close echo, error close
        # Fragment bookkeeping, kept from frame headers alone (see _check_header).
        self._in_message = False  # a non-final data frame was seen
        self._message_compressed = False
        self._message_length = 0  # payload bytes declared so far (on the wire)
        # Chunks of the message being reassembled (str for text, bytes for binary).
        self._chunks: list = []

    @property
    def sent_close(self):
        """(code, reason) of the close frame ``close()`` produced, or None."""
        return self._sent_close

    # -- receiving ------------------------------------------------------------

    def receive(self, data) -> list:
        """Feed bytes from the peer; return the events they complete."""
        events = []
        for event, out in self._receive(data):
            events.append(event)
            self._outgoing += out
        return events

    def receive_iter(self, data):
        """``receive``, one event at a time as each frame is parsed: yields
        ``(event, out)``, where ``out`` is what the engine queued in answer
        to that event (a pong, the close echo, the error close; ``b""``
        else), handed over here instead of through ``data_to_send``.  The
        caller may act (send, close) before the next frame is parsed, as
        the Cython connection, which dispatches while it parses, does."""
        return self._receive(data)

    def _receive(self, data):
        if self.state == CLOSED or not data:
            return
        self._proto.receive_bytes(bytes(data))
        try:
            for frame in self._proto.received_frames():
                pair = self._handle_frame(frame)
                if pair is not None:
                    yield pair
                if self.state == CLOSED:
                    break
        except ParseFailed as exc:
            yield self._fail(int(exc.code), str(exc))

    def _check_header(self, header: Header) -> None:
        """Sequencing and size checks from a frame header, before its payload.

        The limits apply to the declared (wire) lengths; a compressed
        message is allowed deflate's overhead over them, and its inflated
        size is bounded again by _BoundedDeflate as it is inflated.
        """
        opcode = header.opcode
        if opcode.iscontrol():
            return
        if opcode is Opcode.CONTINUATION:
            if not self._in_message:
                raise ParseFailed("continuation frame with no message started")
        else:
            if self._in_message:
                raise ParseFailed(f"{opcode.name} frame inside a fragmented message")
            self._message_compressed = header.rsv.rsv1
            self._message_length = 0
        self._in_message = not header.fin
        self._message_length += header.payload_len
        frame_limit, message_limit = self.max_frame_size, self.max_message_size
        if self._message_compressed:
            frame_limit, message_limit = deflate_bound(frame_limit), deflate_bound(message_limit)
        if self.max_frame_size and header.payload_len > frame_limit:
            raise ParseFailed(
                f"frame of {header.payload_len} bytes > max_frame_size {self.max_frame_size}",
                errors.MESSAGE_TOO_BIG,
            )
        if self.max_message_size and self._message_length > message_limit:
            raise ParseFailed(
                f"message of {self._message_length}+ bytes on the wire > max_message_size "
                f"{self.max_message_size}",
                errors.MESSAGE_TOO_BIG,
            )

    def _handle_frame(self, frame: Frame):
        """The (event, bytes queued in answer) of a parsed frame, or None
        (a fragment that completes no message)."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._chunks.append(frame.payload)
            if not frame.message_finished:
                return None
            event = (TEXT, "".join(self._chunks)) if opcode is Opcode.TEXT else (BINARY, b"".join(self._chunks))
            self._chunks = []
            return event, b""
        if opcode is Opcode.PING:
            payload = bytes(frame.payload)
            return (PING, payload), bytes(self._proto.pong(payload))
        if opcode is Opcode.PONG:
            return (PONG, bytes(frame.payload)), b""
        # CLOSE
        code, reason = frame.payload
        code = int(code)
        out = b""
        if self.state == OPEN:
            # Echo the code, not the reason; an empty close gets an empty one.
            echo = None if code == errors.NO_STATUS_RCVD else code
            out = bytes(self._proto.close(echo))
        self.close_code, self.close_reason = code, reason
        self.state = CLOSED
        self._chunks = []
        return (CLOSE, code, reason), out

    def _fail(self, code: int, detail: str):
        """The one place a protocol violation becomes an ERROR event and a close frame."""
        reason = errors.CLOSE_REASONS.get(code, "")
        out = b""
        if self.state == OPEN:
            out = bytes(self._proto.close(code, reason))
        self.close_code, self.close_reason = code, reason
        self.state = CLOSED
        self._chunks = []
        return (ERROR, code, detail), out

    # -- sending --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return (and forget) the bytes the engine queued for the peer."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def send(self, message) -> bytes:
        """Return the frame carrying ``message``: text for str, binary for bytes."""
        self._require_open()
        if not isinstance(message, (str, bytes, bytearray, memoryview)):
            raise TypeError(f"message must be str or bytes, not {type(message).__name__}")
        return bytes(self._proto.send_data(message, fin=True))

    def encode_message(self, opcode: int, payload) -> bytes:
        """Return the frame of one whole message of ``opcode`` (TEXT or
        BINARY) around ``payload``, bytes already encoded (a text payload is
        trusted to be UTF-8: nothing is decoded); compressed with deflate."""
        self._require_open()
        if opcode != TEXT and opcode != BINARY:
            raise ValueError(f"opcode {opcode} is not TEXT or BINARY")
        return bytes(self._proto.whole_message(Opcode(opcode), bytes(payload)))

    def ping(self, payload=b"") -> bytes:
        """Return a ping frame; ``payload`` is at most 125 bytes."""
        self._require_open()
        payload = bytes(payload)
        if len(payload) > 125:
            raise ValueError("a ping payload is at most 125 bytes")
        return bytes(self._proto.ping(payload))

    def close(self, code: int = errors.NORMAL_CLOSURE, reason: str = "") -> bytes:
        """Return the close frame that starts the closing handshake.

        ``code`` 1005 sends an empty close frame (``reason`` must be empty);
        otherwise it must be a code a peer may receive. ``reason`` is cut to
        123 UTF-8 bytes on a character boundary.
        """
        self._require_open()
        if code == errors.NO_STATUS_RCVD:
            if reason:
                raise ValueError("a close frame without a code has no reason")
            frame = self._proto.close(None)
        elif not errors.is_valid_close_code(code):
            raise ValueError(f"{code} is not a close code that can be sent")
        else:
            encoded = reason.encode("utf-8")
            if len(encoded) > 123:  # what goes on the wire, and what is remembered
                reason = encoded[:123].decode("utf-8", "ignore")
            frame = self._proto.close(code, reason)
        self._sent_close = (code, reason)
        self.state = CLOSING
        return bytes(frame)

    def _require_open(self) -> None:
        if self.state != OPEN:
            code, reason = (
                (self.close_code, self.close_reason)
                if self.close_code is not None
                else self._sent_close or (errors.ABNORMAL_CLOSURE, "")
            )
            raise errors.ConnectionClosed(code, reason)


def encode_frame(opcode: int, payload, fin: bool = True, mask=None, rsv1: bool = False) -> bytes:
    """Encode one frame, with no validation beyond the types.

    ``mask`` is 4 bytes for a (masked) client frame, None for a server frame.
    Any opcode 0..15 and any length are accepted, so tests can build frames
    that a peer must reject.
    """
    if not 0 <= opcode <= 0xF:
        raise ValueError(f"opcode {opcode} is not 0..15")
    if isinstance(payload, str):
        raise TypeError("payload must be bytes, not str")
    payload = bytes(payload)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0 if mask is None else 0x80
    length = len(payload)
    if length <= 125:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if mask is None:
        return header + payload
    mask = bytes(mask)
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    return header + mask + bytes(XorMaskerSimple(mask).process(bytearray(payload)))
