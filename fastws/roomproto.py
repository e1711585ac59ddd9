"""The room protocol (``fastws.rooms.v1``): rooms for clients over one WebSocket.

A fastws.App serves it with one line::

    rt = app.rooms_endpoint("/rt")          # a RoomEndpoint
    rt.publish("lobby", "hello")            # from the app (or app.publish(..., namespace=rt.namespace))

and the clients of :mod:`fastws.client` (Python) and ``fastws.js`` (browsers,
Node) speak it.  The wire format is specified in ``docs/protocol.md``; in
short, one JSON object per text frame, ``"t"`` naming its type:

client -> server
    ``{"t":"sub","room":R,"since":POS}`` subscribe (``since``: the last
    position seen, to resume), ``{"t":"unsub","room":R}``,
    ``{"t":"pub","room":R,"data":TEXT}`` (``"b64"`` for binary, ``"ack":N``
    to get an answer), ``{"t":"ping","ts":X}`` (``"seqs":true``: the pong
    names each room's last seq);
server -> client
    ``{"t":"m","room":R,"seq":N,"id":ID,"data":TEXT}`` a message (``seq``:
    this node's count of the room's messages; ``id``: the Redis Stream entry
    id with a history broker; no ``seq`` on a replayed one),
    ``{"t":"subscribed","room":R,"recovered":BOOL,"pos":P,"seq":N}``,
    ``{"t":"unsubscribed","room":R}``, ``{"t":"ack","ack":N}``,
    ``{"t":"pong","ts":X}``, ``{"t":"error","code":C,"message":M,...}``.

How the messages are delivered:

* with a broker that keeps history (``--broker redis+streams://``) every
  subscription is a resumable membership (:meth:`fastws.node.Node.resume`):
  the client gets the room's stream in stream order with entry ids, on
  whichever node it is connected to, and a ``since`` replays what it missed
  (``recovered`` false when the stream no longer holds all of it);
* otherwise a subscription is a plain room membership; the envelope with the
  room's sequence number is built once per message and node
  (``Rooms.envelopes``); there is no history, so a ``since`` is answered
  ``recovered: false``.

The endpoint's rooms live in their own namespace (by default the endpoint's
path), so rooms of plain ``on_message`` routes are not affected: publish to
them with :meth:`RoomEndpoint.publish` or ``app.publish(room, msg,
namespace=endpoint.namespace)`` (or the HTTP API with that ``namespace``).
The app's ``authorize_join`` / ``authorize_publish`` checks of that
namespace decide subscribes and client publishes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import logging
import time
from json.encoder import encode_basestring
from pathlib import Path

from .errors import BrokerError, Reject, RoomDeniedError, RoomLimitError, RoomNameError

log = logging.getLogger("fastws")

__all__ = ["SUBPROTOCOL", "RoomEndpoint", "ERROR_CODES", "client_js", "serve_client_js"]

#: the subprotocol name; the version is part of it
SUBPROTOCOL = "fastws.rooms.v1"

#: error codes of ``{"t":"error"}`` answers
ROOM_LIMIT = "room_limit"        # the connection is in max_rooms_per_connection rooms already
ROOM_NAME = "room_name"          # the room name is too long or not UTF-8
DENIED = "denied"                # authorize_join / authorize_publish said no (or publishing is off)
RATE_LIMITED = "rate_limited"    # past the endpoint's publish rate, or too many requests waiting
BAD_REQUEST = "bad_request"      # not a request of this protocol
UNAVAILABLE = "unavailable"      # the broker could not do it now; try again later
ERROR_CODES = (ROOM_LIMIT, ROOM_NAME, DENIED, RATE_LIMITED, BAD_REQUEST, UNAVAILABLE)

#: requests of one connection that may wait for the broker at once
MAX_PENDING = 256

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _data_fields(message) -> str:
    """``"data":"..."`` for text, ``"b64":"..."`` for binary."""
    if type(message) is str:
        return '"data":' + encode_basestring(message)
    return '"b64":"' + base64.b64encode(bytes(message)).decode("ascii") + '"'


def room_frame(room: str, seq: int, message) -> str:
    """A message frame without history: room, this node's seq, the data."""
    return '{"t":"m","room":%s,"seq":%d,%s}' % (encode_basestring(room), seq, _data_fields(message))


def stream_frame(room: str, entry_id: str, seq, message) -> str:
    """A message frame with history: room, seq (None: replayed), stream id, the data."""
    if seq is None:
        return '{"t":"m","room":%s,"id":"%s",%s}' % (encode_basestring(room), entry_id, _data_fields(message))
    return '{"t":"m","room":%s,"seq":%d,"id":"%s",%s}' % (encode_basestring(room), seq, entry_id,
                                                          _data_fields(message))


def _error(code: str, message: str, **fields) -> str:
    body = {"t": "error", "code": code, "message": message}
    body.update((k, v) for k, v in fields.items() if v is not None)
    return _dumps(body)


class _Bad(Exception):
    """A request that is not one of this protocol (answered bad_request)."""


class RoomEndpoint:
    """The room protocol on one path of a fastws.App (see the module
    docstring); made by :meth:`fastws.App.rooms_endpoint`.

    ``namespace``: the namespace of the endpoint's rooms (default: the
    path).  ``client_publish``: clients may publish (else ``denied``).
    ``publish_rate``: publishes per second per connection (0: no limit;
    a burst of one second's worth), past it ``rate_limited``.
    ``history_limit``: messages a resume replays at most (the newest ones;
    ``recovered`` is then false).  ``on_connect``: the app's own upgrade
    decision (authentication), run first; the endpoint adds its
    subprotocol to the accept."""

    def __init__(self, app, path: str, *, namespace: str | None = None, on_connect=None,
                 client_publish: bool = True, publish_rate: float = 0.0, history_limit: int = 1000,
                 accept_type=None) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        if publish_rate < 0:
            raise ValueError("publish_rate must be >= 0")
        self.app = app
        self.path = path
        self.namespace = path if namespace is None else namespace
        self.user_on_connect = on_connect
        self.client_publish = client_publish
        self.publish_rate = float(publish_rate)
        self.history_limit = int(history_limit)
        self._accept_type = accept_type
        self.node = None
        self.history = False
        #: requests answered, by type, and errors by code (for tests and /stats)
        self.counters = {"sub": 0, "unsub": 0, "pub": 0, "ping": 0, "recovered": 0, "not_recovered": 0}
        self.errors = dict.fromkeys(ERROR_CODES, 0)
        if on_connect is not None and inspect.iscoroutinefunction(on_connect):
            self.on_connect = self._on_connect_async
        else:
            self.on_connect = self._on_connect

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """The node started (an ``on_startup`` hook): install the envelope of
        this namespace's messages (with history: the stream members'; else
        the rooms' direct members')."""
        node = self.app.node
        self.node = node
        self.history = node.resumer is not None
        if self.history:
            node.resumer.envelopes[self.namespace] = stream_frame
        else:
            node.rooms.envelopes[self.namespace] = room_frame

    # -- the upgrade ------------------------------------------------------------------

    def _decide(self, request, result):
        offered = request.subprotocols
        if offered and SUBPROTOCOL not in offered:
            return Reject(400, f"this endpoint speaks the subprotocol {SUBPROTOCOL}")
        if isinstance(result, Reject) or not offered:
            return result
        if result is None:
            return self._accept_type(subprotocol=SUBPROTOCOL)
        if getattr(result, "subprotocol", "") is None:
            result.subprotocol = SUBPROTOCOL
        return result

    def _on_connect(self, request):
        result = self.user_on_connect(request) if self.user_on_connect is not None else None
        return self._decide(request, result)

    async def _on_connect_async(self, request):
        return self._decide(request, await self.user_on_connect(request))

    # -- requests ---------------------------------------------------------------------

    def on_message(self, conn, data) -> None:
        """One request of a client (see the module docstring)."""
        req = None
        try:
            if type(data) is not str:
                raise _Bad("binary frames are not requests of " + SUBPROTOCOL)
            try:
                req = json.loads(data)
            except ValueError:
                raise _Bad("not JSON") from None
            if type(req) is not dict:
                raise _Bad("a request is a JSON object")
            t = req.get("t")
            if t == "pub":
                self._pub(conn, req)
            elif t == "sub":
                self._sub(conn, req)
            elif t == "unsub":
                self._unsub(conn, req)
            elif t == "ping":
                self.counters["ping"] += 1
                if req.get("seqs") is True:
                    conn.send(self._pong_with_seqs(conn, req.get("ts")))
                else:
                    conn.send('{"t":"pong","ts":%s}' % _dumps(req.get("ts")))
            else:
                raise _Bad(f"unknown request type {t!r}")
        except _Bad as exc:
            self._fail(conn, BAD_REQUEST, str(exc), ack=req.get("ack") if type(req) is dict else None)

    def _pong_with_seqs(self, conn, ts) -> str:
        """A pong that names the seq of the last message of each of the
        connection's rooms on this node (sent or dropped before this pong):
        a client that has less lost the rest."""
        ns = self.namespace
        node = self.node
        seqs = {}
        for key in conn.rooms or ():
            if key[0] == ns:
                seqs[key[1]] = node.resumer.seq(key) if self.history else node.rooms.seq(key[1], ns)
        return _dumps({"t": "pong", "ts": ts, "seqs": seqs})

    def on_disconnect(self, conn, code, reason) -> None:
        ops = conn.store.get("fastws.rt.ops") if conn.store else None
        if ops:
            for task in list(ops.values()):
                task.cancel()
            ops.clear()

    def _fail(self, conn, code: str, message: str, **fields) -> None:
        self.errors[code] += 1
        if not conn.closed:
            conn.send(_error(code, message, **fields))

    @staticmethod
    def _room(req) -> str:
        room = req.get("room")
        if type(room) is not str or not room:
            raise _Bad('"room" must be a non-empty string')
        return room

    def _room_error(self, conn, exc, room, ack=None) -> None:
        if isinstance(exc, RoomLimitError):
            self._fail(conn, ROOM_LIMIT, str(exc), room=room, ack=ack)
        elif isinstance(exc, RoomNameError):
            self._fail(conn, ROOM_NAME, str(exc), room=room, ack=ack)
        else:
            self._fail(conn, DENIED, str(exc), room=room, ack=ack)

    # subscribe / unsubscribe: in order per room and connection

    def _serial(self, conn, room: str, coro) -> None:
        """Run ``coro`` after the earlier subscribe/unsubscribe of ``room`` on
        ``conn`` (at most MAX_PENDING rooms waiting per connection)."""
        store = conn.store
        ops = store.get("fastws.rt.ops")
        if ops is None:
            ops = store["fastws.rt.ops"] = {}
        prev = ops.get(room)
        if prev is None and len(ops) >= MAX_PENDING:
            coro.close()
            self._fail(conn, RATE_LIMITED, f"more than {MAX_PENDING} subscriptions waiting", room=room)
            return
        task = asyncio.ensure_future(self._after(prev, coro))
        ops[room] = task

        def done(t, ops=ops, room=room):
            if ops.get(room) is t:
                del ops[room]
            if not t.cancelled() and t.exception() is not None:
                log.error("fastws: room protocol request failed", exc_info=t.exception())
        task.add_done_callback(done)

    @staticmethod
    async def _after(prev, coro):
        if prev is not None:
            try:
                await asyncio.shield(prev)
            except BaseException:       # its own failure is its own; ours still runs
                pass
        return await coro

    def _sub(self, conn, req) -> None:
        room = self._room(req)
        since = req.get("since")
        if since is not None and type(since) not in (str, int):
            raise _Bad('"since" must be a stream id (string) or a seq (integer)')
        self.counters["sub"] += 1
        if self.history:
            self._serial(conn, room, self._resume(conn, room, since))
            return
        ops = conn.store.get("fastws.rt.ops") if conn.store else None
        if ops and room in ops:
            self._serial(conn, room, self._join_later(conn, room, since))
            return
        self._join(conn, room, since)

    async def _join_later(self, conn, room, since) -> None:
        self._join(conn, room, since)

    def _join(self, conn, room: str, since) -> None:
        rooms = self.node.rooms
        try:
            rooms.join(conn, room, self.namespace)
        except (RoomLimitError, RoomNameError, RoomDeniedError) as exc:
            self._room_error(conn, exc, room)
            return
        if conn.closed:
            return
        # no history: what was published while the client was away is gone
        recovered = since is None
        self.counters["recovered" if recovered else "not_recovered"] += 1
        seq = rooms.seq(room, self.namespace)
        conn.send('{"t":"subscribed","room":%s,"recovered":%s,"pos":%d,"seq":%d}'
                  % (encode_basestring(room), "true" if recovered else "false", seq, seq))

    async def _resume(self, conn, room: str, since) -> None:
        node = self.node
        position = since if type(since) is str else None   # a seq is no stream position
        try:
            complete = await node.resume(conn, room, position, namespace=self.namespace,
                                         limit=self.history_limit)
        except (RoomLimitError, RoomNameError, RoomDeniedError) as exc:
            self._room_error(conn, exc, room)
            return
        except ValueError as exc:        # a malformed since
            self._fail(conn, BAD_REQUEST, str(exc), room=room)
            return
        except BrokerError as exc:
            self._fail(conn, UNAVAILABLE, f"history unavailable: {exc}", room=room)
            return
        if conn.closed:
            return
        recovered = bool(complete) and (since is None or position is not None)
        self.counters["recovered" if recovered else "not_recovered"] += 1
        pos = node.broker.last_id((self.namespace, room))
        body = '{"t":"subscribed","room":%s,"recovered":%s' % (encode_basestring(room),
                                                                "true" if recovered else "false")
        conn.send(body + (',"pos":"%s"}' % pos if pos is not None else "}"))

    def _unsub(self, conn, req) -> None:
        room = self._room(req)
        self.counters["unsub"] += 1
        ops = conn.store.get("fastws.rt.ops") if conn.store else None
        if ops and room in ops:
            self._serial(conn, room, self._leave_later(conn, room))
        else:
            self._leave(conn, room)

    async def _leave_later(self, conn, room) -> None:
        self._leave(conn, room)

    def _leave(self, conn, room: str) -> None:
        self.node.rooms.leave(conn, room, self.namespace)
        if not conn.closed:
            conn.send('{"t":"unsubscribed","room":%s}' % encode_basestring(room))

    # publish

    def _pub(self, conn, req) -> None:
        room = self._room(req)
        ack = req.get("ack")
        if ack is not None and type(ack) not in (int, str):
            raise _Bad('"ack" must be an integer or a string')
        if "data" in req:
            message = req["data"]
            if type(message) is not str:
                raise _Bad('"data" must be a string (binary goes in "b64")')
            try:
                message.encode("utf-8")
            except UnicodeEncodeError:
                raise _Bad('"data" is not valid UTF-8 (a lone surrogate)') from None
        elif "b64" in req:
            try:
                message = base64.b64decode(req["b64"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise _Bad('"b64" is not base64') from None
        else:
            raise _Bad('a publish needs "data" or "b64"')
        if not self.client_publish:
            self._fail(conn, DENIED, "clients may not publish on this endpoint", room=room, ack=ack)
            return
        if self.publish_rate and not self._take_token(conn):
            self._fail(conn, RATE_LIMITED, f"more than {self.publish_rate:g} publishes per second",
                       room=room, ack=ack)
            return
        node = self.node
        try:
            node.rooms.check_publish(conn, room, message, self.namespace)
        except (RoomNameError, RoomDeniedError) as exc:
            self._room_error(conn, exc, room, ack)
            return
        self.counters["pub"] += 1
        if ack is None:
            node.publish(room, message, namespace=self.namespace)
            return
        if node.bridge is None:
            seq = node.publish(room, message, namespace=self.namespace)
            conn.send('{"t":"ack","ack":%s,"seq":%d}' % (_dumps(ack), seq))
            return
        ops = conn.store.get("fastws.rt.acks", 0)
        if ops >= MAX_PENDING:
            self._fail(conn, RATE_LIMITED, f"more than {MAX_PENDING} publishes waiting for the broker",
                       room=room, ack=ack)
            return
        conn.store["fastws.rt.acks"] = ops + 1
        asyncio.ensure_future(self._confirmed(conn, room, message, ack))

    async def _confirmed(self, conn, room, message, ack) -> None:
        try:
            _, remote = await self.node.publish_confirmed(room, message, namespace=self.namespace)
        except BrokerError:
            remote = False
        finally:
            conn.store["fastws.rt.acks"] -= 1
        if conn.closed:
            return
        if remote:
            conn.send('{"t":"ack","ack":%s}' % _dumps(ack))
        else:
            self._fail(conn, UNAVAILABLE, "the broker did not take the message; publish again",
                       room=room, ack=ack)

    def _take_token(self, conn) -> bool:
        """A token bucket per connection: ``publish_rate`` per second, a burst
        of one second's worth."""
        store = conn.store
        now = time.monotonic()
        tokens, last = store.get("fastws.rt.bucket", (self.publish_rate, now))
        tokens = min(self.publish_rate, tokens + (now - last) * self.publish_rate)
        if tokens < 1:
            store["fastws.rt.bucket"] = (tokens, now)
            return False
        store["fastws.rt.bucket"] = (tokens - 1, now)
        return True

    # -- the app's side ------------------------------------------------------------------

    def publish(self, room: str, message, *, priority=None) -> int:
        """Send ``message`` (str or bytes) to the subscribers of ``room`` on
        every node; returns this node's seq for it (see ``App.publish``)."""
        if self.app.node is None:
            return 0
        if priority is None:
            return self.app.node.publish(room, message, namespace=self.namespace)
        return self.app.node.publish(room, message, namespace=self.namespace, priority=priority)

    def stats(self) -> dict:
        return {"requests": dict(self.counters), "errors": dict(self.errors), "history": self.history}


# -- the browser client, served at /fastws.js (serve_client_js) -------------------------------

_JS_PATH = Path(__file__).with_name("client") / "fastws.js"


def client_js() -> str:
    """The browser client as an ES module (``fastws/client/fastws.js``)."""
    return _JS_PATH.read_text(encoding="utf-8")


def global_script(module_source: str) -> str:
    """The ES module as a plain script defining ``globalThis.fastws``: the
    module's one ``export { ... };`` line becomes the global's fields (the
    same transform as ``clients/js/build.mjs``)."""
    lines = module_source.split("\n")
    exports = [i for i, line in enumerate(lines) if line.startswith("export {")]
    if len(exports) != 1:
        raise ValueError("fastws.js must end with one 'export { ... };' line")
    names = lines[exports[0]][len("export {"):].split("}")[0]
    del lines[exports[0]]
    body = "\n".join(lines).rstrip("\n")
    return ("(function () {\n" + body + "\nglobalThis.fastws = {" + names + "};\n})();\n")


def serve_client_js(routes) -> None:
    """``GET /fastws.js`` (the ES module) and ``GET /fastws.global.js`` (a
    plain script defining ``fastws``) on ``routes`` (a node's HTTP routes)."""
    module = client_js().encode("utf-8")
    script = global_script(client_js()).encode("utf-8")
    headers = [("Cache-Control", "no-cache"), ("Access-Control-Allow-Origin", "*")]

    def module_handler(request):
        return 200, module, "text/javascript; charset=utf-8", headers

    def script_handler(request):
        return 200, script, "text/javascript; charset=utf-8", headers

    routes.add("GET", "/fastws.js", module_handler, ops=False)
    routes.add("GET", "/fastws.global.js", script_handler, ops=False)
