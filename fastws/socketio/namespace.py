"""Class-based namespaces, as python-socketio's ``AsyncNamespace``.

    class Chat(fastws.socketio.AsyncNamespace):
        def on_connect(self, sid, environ):
            ...
        async def on_message(self, sid, data):
            await self.emit("message", data, skip_sid=sid)

    sio.register_namespace(Chat("/chat"))

A method ``on_<event>`` handles ``<event>``; the emitting methods default to
the namespace of the object.
"""

from __future__ import annotations

from .server import Handler


class AsyncNamespace:
    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace or "/"
        self.server = None
        self._handlers: dict = {}

    def _set_server(self, server) -> None:
        self.server = server

    def handler(self, event: str):
        """The :class:`~fastws.socketio.server.Handler` of ``on_<event>``, or None."""
        h = self._handlers.get(event)
        if h is None:
            fn = getattr(self, "on_" + event, None)
            if fn is None or not callable(fn):
                return None
            h = self._handlers[event] = Handler(fn)
        return h

    async def trigger_event(self, event: str, *args):
        h = self.handler(event)
        if h is None:
            return None
        result = h.fn(*args)
        return await result if h.is_async else result

    def emit(self, event, data=None, to=None, room=None, skip_sid=None, namespace=None, callback=None,
             volatile: bool = False, ignore_queue: bool = False):
        return self.server.emit(event, data, to=to, room=room, skip_sid=skip_sid,
                                namespace=namespace or self.namespace, callback=callback, volatile=volatile)

    def send(self, data, to=None, room=None, skip_sid=None, namespace=None, callback=None,
             ignore_queue: bool = False):
        return self.server.send(data, to=to, room=room, skip_sid=skip_sid,
                                namespace=namespace or self.namespace, callback=callback)

    async def call(self, event, data=None, to=None, sid=None, namespace=None, timeout=60,
                   ignore_queue: bool = False):
        return await self.server.call(event, data, to=to, sid=sid, namespace=namespace or self.namespace,
                                      timeout=timeout)

    def enter_room(self, sid, room, namespace=None):
        return self.server.enter_room(sid, room, namespace=namespace or self.namespace)

    def leave_room(self, sid, room, namespace=None):
        return self.server.leave_room(sid, room, namespace=namespace or self.namespace)

    def close_room(self, room, namespace=None):
        return self.server.close_room(room, namespace=namespace or self.namespace)

    def rooms(self, sid, namespace=None):
        return self.server.rooms(sid, namespace=namespace or self.namespace)

    def get_session(self, sid, namespace=None):
        return self.server.get_session(sid, namespace=namespace or self.namespace)

    def save_session(self, sid, session, namespace=None):
        return self.server.save_session(sid, session, namespace=namespace or self.namespace)

    def session(self, sid, namespace=None):
        return self.server.session(sid, namespace=namespace or self.namespace)

    def disconnect(self, sid, namespace=None, ignore_queue: bool = False):
        return self.server.disconnect(sid, namespace=namespace or self.namespace)


Namespace = AsyncNamespace

__all__ = ["AsyncNamespace", "Namespace"]
