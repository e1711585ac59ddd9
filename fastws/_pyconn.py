"""Pure-Python twin of ``_core.Hub`` and ``_core.Connection``.

Used when the Cython extension is not built (or ``FASTWS_NO_EXTENSIONS=1``):
the same connection protocol, driven by the wsproto-backed engine through the
sans-I/O interface of ``fastws/core.py``.  Same public API and behaviour as
the Cython classes; slower, and it keeps a small per-connection read buffer.
"""

from __future__ import annotations

import logging

from . import _wsproto_engine as engine_mod
from .errors import CALLBACK_FAILED, IDLE_TIMEOUT, PING_TIMEOUT, SLOW_CONSUMER, ConnectionClosed
from .frames import BINARY, CLOSED, ERROR, OPEN, PRIORITY_LOW, PRIORITY_NORMAL, TEXT
from .handshake import error_response

_log = logging.getLogger("fastws")

P_HANDSHAKE, P_DECIDING, P_OPEN, P_DONE = 0, 1, 2, 3
#: the answer to a request head or body that did not arrive in time
REQUEST_TIMEOUT = error_response(408, "request timeout")
#: the answer to a request head on a hub that expects none (no handshake)
UNEXPECTED_HEAD = error_response(400, "unexpected request")


class Hub:
    """Per-server state: limits, handshake, registry, write coalescing."""

    def __init__(self, loop, handshake=None, *, max_message_size=1 << 20, max_frame_size=0,
                 max_head_size=8192, close_timeout=5.0, on_callback_error=None,
                 high_water=65536, max_queue=1 << 20, slow_grace=5.0,
                 ping_interval=20.0, ping_timeout=20.0, idle_timeout=0.0,
                 handshake_timeout=10.0, body_timeout=30.0, tick=None):
        # the pure-Python twin uses one loop timer per waiting connection
        # instead of the Cython hub's timer wheel: it is the fallback, not
        # the engine for 100,000 connections
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.body_timeout = body_timeout
        if tick is None:
            # fine enough for the shortest timeout configured, at most 1 s
            shortest = min([t for t in (ping_interval, ping_timeout, idle_timeout,
                                        handshake_timeout, body_timeout, close_timeout)
                            if t > 0] or [1.0])
            tick = max(0.05, min(1.0, shortest / 4))
        self.tick = tick
        self.handshake_timeouts = self.ping_timeouts = self.idle_timeouts = 0
        self.body_timeouts = 0
        self.loop = loop
        self.high_water = high_water
        self.max_queue = max_queue
        self.slow_grace = slow_grace
        self.on_lost = None
        self.rooms = None
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0
        self.slow_consumer_closes = 0
        self.closes = {}          # close code (1000..1015, else "3xxx"/"4xxx"/"other") -> count
        self.dropped = {}
        self.handshake = handshake
        self.connections = {}
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.max_head_size = max_head_size
        self.close_timeout = close_timeout
        self.on_callback_error = on_callback_error
        self._next_id = 0
        self._dirty = []
        self._scheduled = False

    def connection_factory(self):
        return Connection(self)

    fast_upgrades = 0

    def set_fast_upgrade(self, routes, default=None, *, max_connections=0, deflate=False, origins="*"):
        """The Cython hub answers plain upgrades in C; this engine has no such
        path: every request head goes to the ``handshake`` callback."""

    def _mark_dirty(self, conn):
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush_all)

    def _flush_all(self):
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for c in dirty:
            c._flush()

    def broadcast(self, message, connections, exclude=None, priority=PRIORITY_NORMAL):
        """``broadcast_frame`` of ``message``: str as TEXT (its UTF-8),
        bytes-like as BINARY."""
        if isinstance(message, str):
            return self.broadcast_frame(TEXT, message.encode("utf-8"), connections, exclude, priority)
        if isinstance(message, (bytes, bytearray, memoryview)):
            return self.broadcast_frame(BINARY, bytes(message), connections, exclude, priority)
        raise TypeError(f"message must be str or bytes, not {type(message).__name__}")

    def broadcast_frame(self, opcode, payload, connections, exclude=None, priority=PRIORITY_NORMAL):
        """Queue one frame of ``opcode`` (TEXT or BINARY) around the encoded
        ``payload`` on every open connection of ``connections`` except
        ``exclude``, under the delivery policy for ``priority``; built once
        (a connection with deflate gets its own compressed frame).  Returns
        the number of connections it was queued on."""
        if opcode != TEXT and opcode != BINARY:
            raise ValueError(f"opcode {opcode} is not TEXT or BINARY")
        payload = bytes(payload)
        n = 0
        frame = None
        for c in connections:
            if c is exclude or c.closed:
                continue
            if c._wpaused and not c._admit(priority):
                continue
            if c._deflate is not None:  # compressed per connection
                c._queue(c._engine.encode_message(opcode, payload))
            else:
                if frame is None:
                    frame = engine_mod.encode_frame(opcode, payload)
                c._queue(frame)
            n += 1
        self.messages_out += n
        return n

    def stop_timers(self):
        """Cancel the hub's timers (shutdown)."""

    def stats(self):
        total = largest = 0
        for c in self.connections.values():
            q = c._wq_size
            if c.transport is not None and c._wpaused:
                q += c.transport.get_write_buffer_size()
            total += q
            largest = max(largest, q)
        return {
            "connections": len(self.connections),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "closes": dict(self.closes),
            "dropped": dict(self.dropped),
            "slow_consumer_closes": self.slow_consumer_closes,
            "queued_bytes_total": total,
            "queued_bytes_max": largest,
        }

    @property
    def open_connections(self):
        return len(self.connections)


class Connection:
    """One WebSocket connection (see ``_core.Connection`` for the API)."""

    def __init__(self, hub: Hub):
        self._hub = hub
        self._engine = None
        self.transport = None
        self.id = None
        self.path = None
        self.query_string = None
        self.subprotocol = None
        self.route = None
        self._phase = P_HANDSHAKE
        self._head = bytearray()
        self._buf = bytearray(65536)
        self._wq = None
        self._dirty = False
        self._end_mode = 0        # 0 none, 1 close, 2 linger, 3 linger with FIN sent
        self._errored = False
        self._store = None
        self._close_timer = None     # the one loop timer of this connection
        self._timer_kind = None
        self._ping_at = 0.0
        self._last_rx = self._last_msg = 0.0
        self._reported = False
        self._body_cb = None
        self._body_size = 0
        self._wq_size = 0
        self._wpaused = False
        self._paused_at = 0.0
        self.rooms = None
        self.dropped = 0
        self._deflate = None
        self.close_code = None
        self.close_reason = None

    # -- asyncio protocol ------------------------------------------------------

    def connection_made(self, transport):
        self._made(transport)
        if self._hub.handshake_timeout > 0:
            self._set_timer(self._hub.handshake_timeout, self._handshake_expired)

    def _made(self, transport):
        self.transport = transport
        self._last_rx = self._last_msg = self._hub.loop.time()
        if self._hub.high_water != 65536:
            transport.set_write_buffer_limits(high=self._hub.high_water)

    def get_buffer(self, sizehint):
        return self._buf

    def buffer_updated(self, nbytes):
        self._hub.bytes_in += nbytes
        self._last_rx = self._hub.loop.time()
        data = bytes(self._buf[:nbytes])
        if self._phase == P_OPEN:
            self._input(data)
        elif self._phase == P_HANDSHAKE:
            self._head_data(data)
        elif self._phase == P_DECIDING:
            self._head.extend(data)
            self._check_body()

    def data_received(self, data):
        self._hub.bytes_in += len(data)
        self._last_rx = self._hub.loop.time()
        self.feed(data)

    def feed(self, data):
        """Process ``data`` as if read from the transport (protocol hand-over)."""
        data = bytes(data)
        if self._phase == P_OPEN:
            self._input(data)
        elif self._phase == P_HANDSHAKE:
            self._head_data(data)
        elif self._phase == P_DECIDING:
            self._head.extend(data)
            self._check_body()

    def read_body(self, size, callback):
        """Call ``callback(body)`` once ``size`` bytes behind the head are
        in; 408 and close if they are not in within ``body_timeout``."""
        self._body_size = size
        self._body_cb = callback
        if self._hub.body_timeout > 0:
            self._set_timer(self._hub.body_timeout, self._body_expired)
        self._check_body()

    def _check_body(self):
        cb = self._body_cb
        if cb is not None and self._head is not None and len(self._head) >= self._body_size:
            self._body_cb = None
            body = bytes(self._head[:self._body_size])
            del self._head[:self._body_size]
            # the handler answers next: bounded by the handshake timeout, and
            # nothing more is read (the answer closes the connection)
            if self._hub.handshake_timeout > 0:
                self._set_timer(self._hub.handshake_timeout, self._handshake_expired)
            elif self._close_timer is not None:
                self._close_timer.cancel()
                self._close_timer = None
            if self.transport is not None:
                self.transport.pause_reading()
            cb(body)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        phase = self._phase
        self._phase = P_DONE
        self._wq = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if phase == P_OPEN:
            self._hub.connections.pop(self.id, None)
        if self.close_code is None:
            sent = getattr(self._engine, "_sent_close", None) if self._engine is not None else None
            self.close_code, self.close_reason = sent if sent else (1006, "")
        if phase == P_OPEN:
            hub = self._hub
            code = int(self.close_code)
            if not 1000 <= code <= 1015:   # client-chosen codes share 3 keys: the dict stays small
                code = "3xxx" if 3000 <= code <= 3999 else ("4xxx" if 4000 <= code <= 4999 else "other")
            hub.closes[code] = hub.closes.get(code, 0) + 1
            if self.rooms and hub.on_lost is not None:
                try:
                    hub.on_lost(self)
                except Exception as exc:
                    _log.error("fastws: leaving rooms failed", exc_info=exc)
        if phase == P_OPEN and not self._reported:
            self._reported = True
            self._call_disconnect()
        self.transport = None

    def pause_writing(self):
        self._wpaused = True
        self._paused_at = self._hub.loop.time()
        if self.transport is not None and self._phase == P_OPEN:
            self.transport.pause_reading()

    def resume_writing(self):
        self._wpaused = False
        if self.transport is not None and self._phase == P_OPEN:
            self.transport.resume_reading()
            if self._wq is not None:
                self._flush()

    def _admit(self, priority):
        hub = self._hub
        if self._wq_size > hub.max_queue or (
                hub.slow_grace > 0 and hub.loop.time() - self._paused_at > hub.slow_grace):
            self._slow_consumer()
            return False
        if priority <= PRIORITY_LOW or (priority == PRIORITY_NORMAL and self._wq_size * 2 > hub.max_queue):
            self.dropped += 1
            key = ("backpressure", priority)
            hub.dropped[key] = hub.dropped.get(key, 0) + 1
            return False
        return True

    def _slow_consumer(self):
        if self.closed:
            return
        self._hub.slow_consumer_closes += 1
        self._wq = None
        self._wq_size = 0
        frame = self._engine.close(*SLOW_CONSUMER)
        if self.transport is not None:
            self.transport.write(frame)
        self._arm_close_timer()

    # -- handshake -------------------------------------------------------------

    def _head_data(self, data):
        start = max(len(self._head) - 3, 0)
        self._head.extend(data)
        end = self._head.find(b"\r\n\r\n", start)
        limit = self._hub.max_head_size
        if end < 0 or end + 4 > limit:
            if end >= 0 or len(self._head) > limit:
                self._phase = P_DECIDING
                self._decide(None)
            return
        end += 4
        head = bytes(self._head[:end])
        del self._head[:end]
        self._phase = P_DECIDING
        self._decide(head)

    def _decide(self, head):
        hs = self._hub.handshake
        if hs is None:
            self.reject_upgrade(UNEXPECTED_HEAD)
        else:
            hs(self, head)

    def accept_upgrade(self, response, route, path, query_string, subprotocol=None, deflate=None):
        """Send the 101 ``response``, register, start framing, run on_open,
        then parse what came after the head.  False if not deciding."""
        if self._phase != P_DECIDING or self.transport is None:
            return False
        self._accept(response, route, path, query_string, subprotocol, deflate)
        rest, self._head = bytes(self._head), None
        if not self.transport.is_reading():
            self.transport.resume_reading()
        if rest:
            self._input(rest)
        return True

    def adopt(self, transport, response, route, path, query_string, subprotocol=None,
              deflate=None, early=b""):
        """Take over ``transport``, whose upgrade request was parsed and
        decided elsewhere: become its protocol, write ``response``, start
        framing, run on_open, then parse ``early`` as frames."""
        transport.set_protocol(self)
        self._made(transport)
        self._phase = P_DECIDING
        self._head = None
        self._accept(response, route, path, query_string, subprotocol, deflate)
        if not transport.is_reading():
            transport.resume_reading()
        if early and self._phase == P_OPEN:
            self._input(bytes(early))

    def _accept(self, response, route, path, query_string, subprotocol, deflate):
        self._hub.bytes_out += len(response)
        self.transport.write(response)
        self._engine = engine_mod.Engine(
            max_message_size=self._hub.max_message_size,
            max_frame_size=self._hub.max_frame_size,
            deflate=deflate,
        )
        self._deflate = deflate
        self.route = route
        self.path = path
        self.query_string = query_string
        self.subprotocol = subprotocol
        self._hub._next_id += 1
        self.id = self._hub._next_id
        self._hub.connections[self.id] = self
        self._phase = P_OPEN
        self._heartbeat()
        if route.on_open is not None:
            try:
                res = route.on_open(self)
                if route.open_is_async:
                    self._hub.loop.create_task(res).add_done_callback(self._task_done)
            except Exception as exc:
                self._callback_failed(exc)

    def reject_upgrade(self, response):
        """Answer the request with the HTTP ``response`` and close."""
        self._head = None
        if self.transport is not None:
            self._hub.bytes_out += len(response)
            self.transport.write(response)
            self.transport.close()

    def hold_upgrade(self):
        """Stop reading while an async decision runs."""
        if self.transport is not None:
            self.transport.pause_reading()

    # the names the fronts used before the hooks were public (to be removed)
    def _hs_accept(self, *args, **kwargs):
        return self.accept_upgrade(*args, **kwargs)

    def _hs_reject(self, response):
        self.reject_upgrade(response)

    def _hs_pause(self):
        self.hold_upgrade()

    def _hs_read_body(self, size, callback):
        self.read_body(size, callback)

    # -- frames ----------------------------------------------------------------

    def _input(self, data):
        eng = self._engine
        # dispatched as each frame is parsed (what a callback does, a close,
        # acts on the frames after it), answers queued before the callback
        for ev, out in eng.receive_iter(data):
            if out:
                self._queue(out)
            kind = ev[0]
            if kind == TEXT or kind == BINARY:
                self._hub.messages_in += 1
                self._last_msg = self._last_rx
                self._dispatch(ev[1])
            elif kind == ERROR:
                self._errored = True
        if eng.state == CLOSED and self._phase == P_OPEN and self._end_mode == 0:
            self.close_code, self.close_reason = eng.close_code, eng.close_reason
            if self._errored:
                self._end_mode = 2
                self._arm_close_timer()
            else:
                self._end_mode = 1
                if self._close_timer is not None:
                    self._close_timer.cancel()
                    self._close_timer = None
        if self._dirty:
            self._flush()
        elif self._end_mode:
            self._end_transport()

    def _end_transport(self):
        t = self.transport
        if t is None:
            return
        if self._end_mode == 1:
            t.close()
        elif self._end_mode == 2:
            self._end_mode = 3
            if t.can_write_eof():
                t.write_eof()
            else:
                t.close()

    def _dispatch(self, payload):
        route = self.route
        cb = route.on_message
        if cb is None:
            return
        if route.message_is_async:
            task = self._hub.loop.create_task(cb(self, payload))
            task.add_done_callback(self._task_done)
            return
        try:
            cb(self, payload)
        except Exception as exc:
            self._callback_failed(exc)

    def _queue(self, frame):
        if self._phase != P_OPEN:
            return
        if self._wq is None:
            self._wq = [frame]
        else:
            self._wq.append(frame)
        self._wq_size += len(frame)
        if self._wpaused:
            if self._wq_size > self._hub.max_queue and not self.closed:
                self._slow_consumer()
            return
        if not self._dirty:
            self._dirty = True
            self._hub._mark_dirty(self)

    def _flush(self):
        self._dirty = False
        if self._wpaused and not self._end_mode:
            return
        wq, self._wq = self._wq, None
        size, self._wq_size = self._wq_size, 0
        t = self.transport
        if wq and t is not None:
            self._hub.bytes_out += size
            t.write(b"".join(wq))
        if self._end_mode:
            self._end_transport()

    def _task_done(self, task):
        if not task.cancelled() and task.exception() is not None:
            self._callback_failed(task.exception())

    def _callback_failed(self, exc):
        handler = self._hub.on_callback_error
        if handler is not None:
            handler(self, exc)
        else:
            _log.error("fastws: exception in a callback", exc_info=exc)
        if not self.closed:
            self._queue(self._engine.close(*CALLBACK_FAILED))
            self._arm_close_timer()

    def _call_disconnect(self):
        route = self.route
        if route is None or route.on_disconnect is None:
            return
        try:
            res = route.on_disconnect(self, self.close_code, self.close_reason or "")
            if route.disconnect_is_async:
                self._hub.loop.create_task(res)
        except Exception as exc:
            _log.error("fastws: exception in on_disconnect", exc_info=exc)

    def _set_timer(self, delay, fn):
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = self._hub.loop.call_later(delay, fn)

    def _arm_close_timer(self):
        if self._hub.close_timeout > 0 and self._timer_kind != "close":
            self._timer_kind = "close"
            self._set_timer(self._hub.close_timeout, self._close_timeout)

    def _close_timeout(self):
        self._close_timer = None
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self):
        self._close_timer = None
        if self.transport is None:
            return
        if self._phase == P_HANDSHAKE and self._head:
            self._hub.handshake_timeouts += 1
            self.reject_upgrade(REQUEST_TIMEOUT)      # part of a head came, slowly (slowloris)
        elif self._phase in (P_HANDSHAKE, P_DECIDING):
            self._hub.handshake_timeouts += 1
            self.transport.abort()                # silent client, or no decision in time

    def _body_expired(self):
        self._close_timer = None
        if self.transport is not None and self._phase == P_DECIDING and self._body_cb is not None:
            self._hub.body_timeouts += 1
            self._body_cb = None
            self.reject_upgrade(REQUEST_TIMEOUT)      # the request body did not come in time

    def _heartbeat(self):
        hub = self._hub
        d = hub.ping_interval
        if hub.idle_timeout > 0 and (d <= 0 or hub.idle_timeout < d):
            d = hub.idle_timeout
        self._timer_kind = "ping"
        if d > 0:
            self._set_timer(d, self._ping_due)
        elif self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def _ping_due(self):
        self._close_timer = None
        if self.closed or self.transport is None:
            return
        hub = self._hub
        now = hub.loop.time()
        if hub.idle_timeout > 0 and now - self._last_msg >= hub.idle_timeout:
            hub.idle_timeouts += 1
            self.close(*IDLE_TIMEOUT)
            return
        if hub.ping_interval > 0 and now - self._last_rx >= hub.ping_interval * 0.999:
            self._ping_at = now
            self._queue(self._engine.ping(b""))
            self._set_timer(hub.ping_timeout, self._pong_due)
        else:
            self._heartbeat()

    def _pong_due(self):
        self._close_timer = None
        if self.closed or self.transport is None:
            return
        if self._last_rx >= self._ping_at:
            self._heartbeat()
        else:
            self._hub.ping_timeouts += 1
            self.close(*PING_TIMEOUT)

    # -- public API ------------------------------------------------------------

    @property
    def state(self):
        return self._engine.state if self._engine is not None else OPEN

    @property
    def closed(self):
        return self._phase != P_OPEN or self._engine.state != OPEN

    def send(self, message):
        if self.closed:
            if self._engine is not None and self._engine.state != OPEN:
                self._engine.send(message)  # raises ConnectionClosed with the known code
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")
        self._hub.messages_out += 1
        self._queue(self._engine.send(message))

    def join(self, room, namespace=None, batch=False):
        self._hub.rooms.join(self, room, namespace, batch)

    def leave(self, room, namespace=None):
        self._hub.rooms.leave(self, room, namespace)

    def send_frame(self, frame: bytes):
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason or "")
        self._queue(frame)

    def ping(self, payload=b""):
        self._queue(self._engine.ping(payload))

    def close(self, code=1000, reason=""):
        if self.closed:
            return
        self._queue(self._engine.close(code, reason))
        self._arm_close_timer()

    def abort(self):
        if self.transport is not None:
            self.transport.abort()

    @property
    def remote_address(self):
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    @property
    def store(self):
        if self._store is None:
            self._store = {}
        return self._store

    def __repr__(self):
        return f"<fastws.Connection id={self.id} path={self.path!r} state={self.state}>"
