"""The ASGI ``lifespan`` scope: the application's startup before the server
listens, its shutdown after the last connection is gone."""

from __future__ import annotations

import asyncio
import logging

from ..errors import LifespanError
from .wire import ASGI_LIFESPAN, last_line

log = logging.getLogger("fastws")


class Lifespan:
    """Runs the ``lifespan`` scope: startup before serving, shutdown after.

    An application that raises before it ever calls ``receive()`` does not
    speak lifespan (info log, serving goes on, as uvicorn's ``auto``); one
    that sends ``lifespan.startup.failed`` or raises after receiving
    ``lifespan.startup`` fails the start (:class:`LifespanError`)."""

    def __init__(self, app, state: dict) -> None:
        self.app = app
        self.state = state
        self.task = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.received = False          # the app called receive(): it speaks lifespan
        self.unsupported = False
        self.startup_done = asyncio.Event()
        self.shutdown_done = asyncio.Event()
        self.failure = None            # one-line message

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._main())
        await self.events.put({"type": "lifespan.startup"})
        await self.startup_done.wait()
        if self.failure is not None:
            raise LifespanError(f"ASGI lifespan startup failed: {self.failure}")

    async def shutdown(self, timeout: float) -> None:
        if self.task is None or self.unsupported or self.task.done():
            return
        await self.events.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self.shutdown_done.wait(), timeout or None)
        except asyncio.TimeoutError:
            log.error("fastws: ASGI lifespan shutdown did not complete in %ss", timeout)
            self.task.cancel()
        if self.failure is not None:
            log.error("fastws: ASGI lifespan shutdown failed: %s", self.failure)

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_LIFESPAN, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:  # the app's, reported below
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not self.received:
                self.unsupported = True
                log.info("fastws: ASGI 'lifespan' protocol appears unsupported (%s: %s)",
                         type(exc).__name__, exc)
            elif self.failure is None:
                self.failure = f"{type(exc).__name__}: {exc}"
                log.debug("fastws: exception in ASGI lifespan", exc_info=exc)
        finally:
            self.startup_done.set()
            self.shutdown_done.set()

    async def _receive(self):
        self.received = True
        return await self.events.get()

    async def _send(self, message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.startup_done.set()
        elif kind == "lifespan.startup.failed":
            self.failure = last_line(message.get("message", ""))
            self.startup_done.set()
        elif kind == "lifespan.shutdown.complete":
            self.shutdown_done.set()
        elif kind == "lifespan.shutdown.failed":
            self.failure = last_line(message.get("message", ""))
            self.shutdown_done.set()
        else:
            raise RuntimeError(f"unexpected ASGI lifespan message {kind!r}")
