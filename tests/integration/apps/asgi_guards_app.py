"""A FastAPI app for the guards in ASGI mode (tests/integration/test_guards.py).

WebSocket
  /whoami     accepts, sends ``{"client": scope["client"], "scheme": scope["scheme"]}``,
              then echoes text until the client leaves
  /secure     authenticated as docs/asgi.md shows (a dependency on
              TokenAuth.token_of / verify; HS256 key ``hs_new`` of
              ``$FASTWS_TEST_AUTH_DIR``): sends ``{"user": <sub>}``; a bad
              or missing token is refused before the accept (403)
HTTP
  GET /whoami ``{"client": ..., "scheme": ...}`` of the http scope
"""

import os

import jwt
from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect, WebSocketException, status

from fastws.auth import TokenAuth

_DIR = os.environ.get("FASTWS_TEST_AUTH_DIR", "")
ISS = "https://issuer.test"
AUD = "fastws-tests"


def _secret():
    if not _DIR:
        return "no-key-directory-given-to-this-app!"
    with open(os.path.join(_DIR, "hs_new")) as fh:
        return fh.read().strip()


app = FastAPI()
auth = TokenAuth(keys=[_secret()], algorithms=["HS256"], issuer=ISS, audience=AUD)


async def current_user(websocket: WebSocket) -> dict:
    token, _ = auth.token_of(websocket)        # header, cookie, query or subprotocol
    if token is None:
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION)
    try:
        return auth.verify(token)
    except jwt.PyJWTError:
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION) from None


@app.websocket("/secure")
async def secure(websocket: WebSocket, claims: dict = Depends(current_user)):
    await websocket.accept()
    await websocket.send_json({"user": claims["sub"]})
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


@app.websocket("/whoami")
async def whoami(websocket: WebSocket):
    await websocket.accept()
    await websocket.send_json({"client": list(websocket.scope["client"] or ()),
                               "scheme": websocket.scope["scheme"]})
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


@app.get("/whoami")
async def whoami_http(request: Request):
    return {"client": list(request.scope["client"] or ()), "scheme": request.scope["scheme"]}
