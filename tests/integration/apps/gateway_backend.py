"""The gateway tests' backend: one handler, served over HTTP (a FastAPI app under
uvicorn, ``app``) and by Streams workers (``python -m fastws.gateway
tests.integration.apps.gateway_backend:handle --url redis://...``).

Every event it handles is appended as one JSON line to ``$GW_LOG`` (``{"who":
..., "event": {...}}``; ``who`` is ``$GW_NAME``), so a test sees what reached
the backend even across restarts.  What it does (messages are commands)::

    connect     ?deny=1 -> 403 "denied by backend"; ?status=N -> N "no";
                ?user=U, ?rooms=a,b, ?sub=P (subprotocol); ?sleep=S first
    "echo X"    -> reply X                 binary B -> reply b"bin:" + B
    "id"        -> reply the connection's id
    "sleep S X" -> wait S seconds, reply X
    "pub R X"   -> publish X to room R     "join R" / "leave R" -> reply "joined R" / "left R"
    "send ID X" -> X to connection ID, reply "sent"
    "close C R" -> close this connection with code C, reason R
    "kick ID"   -> close connection ID with 4001 "kicked"
    "later X"   -> reply nothing; 0.2 s later X through the node's HTTP API ($FASTWS_URL, $FASTWS_TOKEN)
    "boom"      -> the handler raises
    other       -> reply the text itself

The HTTP app (``app``) also has ``GET /stats``: requests, events, the most
events in one request, the most requests at once, the Authorization headers
seen; and fails the first N attempts of a connect with ``?flaky=KEY&fails=N``
(HTTP 500).  ``$GW_TOKEN``: the token it requires; ``$GW_BATCH``: its
Fastws-Gateway-Batch (0: it does not take batches).
"""

from __future__ import annotations

import asyncio
import json
import os

from fastapi import FastAPI

from fastws.gateway import Accept, Client, GatewayApp, Reject

LOG = os.environ.get("GW_LOG")
NAME = os.environ.get("GW_NAME", str(os.getpid()))
_log = open(LOG, "a", buffering=1) if LOG else None   # noqa: SIM115  (one line per event, flushed)
_tasks: set = set()


def record(event) -> None:
    if _log is not None:
        _log.write(json.dumps({"who": NAME, "event": event.raw}) + "\n")


async def _later(conn_id: str, text: str) -> None:
    await asyncio.sleep(0.2)
    client = Client(os.environ["FASTWS_URL"], os.environ["FASTWS_TOKEN"])
    try:
        await client.post_to_connection(conn_id, text)
    finally:
        await client.aclose()


async def handle(event, api):
    record(event)
    if event.type == "connect":
        q = event.query
        if "sleep" in q:
            await asyncio.sleep(float(q["sleep"]))
        if q.get("deny"):
            return Reject(403, "denied by backend")
        if "status" in q:
            return Reject(int(q["status"]), "no")
        return Accept(subprotocol=q.get("sub"), user=q.get("user"),
                      rooms=[r for r in q.get("rooms", "").split(",") if r])
    if event.type == "disconnect":
        return None
    data = event.data
    if isinstance(data, bytes):
        return b"bin:" + data
    cmd, _, rest = data.partition(" ")
    if cmd == "echo":
        return rest
    if cmd == "id":
        return event.connection_id
    if cmd == "sleep":
        secs, _, text = rest.partition(" ")
        await asyncio.sleep(float(secs))
        return text
    if cmd == "pub":
        room, _, text = rest.partition(" ")
        await api.publish(room, text)
        return None
    if cmd == "join":
        await api.join(rest)
        return f"joined {rest}"
    if cmd == "leave":
        await api.leave(rest)
        return f"left {rest}"
    if cmd == "send":
        target, _, text = rest.partition(" ")
        await api.post_to_connection(target, text)
        return "sent"
    if cmd == "close":
        code, _, reason = rest.partition(" ")
        await api.close(int(code), reason)
        return None
    if cmd == "kick":
        await api.close(4001, "kicked", connection_id=rest)
        return "kicking"
    if cmd == "later":
        task = asyncio.get_running_loop().create_task(_later(event.connection_id, rest))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return None
    if cmd == "boom":
        raise RuntimeError("the handler failed on purpose")
    return data


class Instrumented:
    """GatewayApp with counters and the flaky-connect switch (see the module docstring)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.stats = {"requests": 0, "events": 0, "max_events": 0, "concurrent": 0, "max_concurrent": 0,
                      "auth": []}
        self.attempts: dict = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        chunks = []
        while True:
            m = await receive()
            chunks.append(m.get("body", b""))
            if not m.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            obj = json.loads(body)
        except ValueError:
            obj = {}
        events = obj.get("events", [obj]) if isinstance(obj, dict) else []
        s = self.stats
        s["requests"] += 1
        s["events"] += len(events)
        s["max_events"] = max(s["max_events"], len(events))
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        if auth not in s["auth"]:
            s["auth"].append(auth)
        for ev in events:
            q = ev.get("query") or {} if isinstance(ev, dict) else {}
            if "flaky" in q:
                n = self.attempts[q["flaky"]] = self.attempts.get(q["flaky"], 0) + 1
                if n <= int(q.get("fails", 1)):
                    await send({"type": "http.response.start", "status": 500, "headers": []})
                    await send({"type": "http.response.body", "body": b"flaky"})
                    return
        s["concurrent"] += 1
        s["max_concurrent"] = max(s["max_concurrent"], s["concurrent"])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.inner(scope, replay, send)
        finally:
            s["concurrent"] -= 1


_batch = int(os.environ.get("GW_BATCH", "1000"))
gateway = Instrumented(GatewayApp(handle, token=os.environ.get("GW_TOKEN") or None, batch=max(1, _batch)))
if _batch == 0:      # a backend that does not take batches: no Fastws-Gateway-Batch header
    gateway.inner.batch_header = [(b"content-type", b"application/json")]

app = FastAPI()


@app.get("/stats")
async def stats():
    return {**gateway.stats, "attempts": gateway.attempts}


app.mount("/events", gateway)
