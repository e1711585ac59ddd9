"""Authentication at the upgrade: a ready ``on_connect`` verifier for JSON Web Tokens.

    import fastws
    from fastws.auth import TokenAuth

    app = fastws.App()
    auth = TokenAuth(keys=[os.environ["JWT_SECRET"]], algorithms=["HS256"],
                     issuer="https://auth.example.com", audience="chat")
    app.route("/chat", on_connect=auth, on_message=...)

    @app.on_open("/chat")
    def hello(conn):
        conn.send(f"hello {conn.store['user']}")   # the token's "sub" claim

What it checks (PyJWT does the cryptography): the signature with one of
``keys`` (several keys for rotation: the token's ``kid`` header picks one
when ``keys`` is a mapping ``{kid: key}``, otherwise each key is tried in
turn), the algorithm (only those in ``algorithms``; ``none`` is never
accepted), ``exp`` (required by default), ``nbf`` and ``iat`` with
``leeway`` seconds of clock skew, ``iss`` == ``issuer`` and ``aud``
containing ``audience`` when those are given, and any other
``required_claims``.  Keys are HMAC secrets (``HS256/384/512``), or PEM
public keys / ``cryptography`` key objects for ``RS*``, ``PS*``, ``ES*``
and ``EdDSA``.

Where the token is taken from, in the order of ``sources``:

* ``"header"`` - ``Authorization: Bearer <token>`` (scheme in any case);
* ``"cookie"`` - the cookie named ``cookie`` (default ``access_token``);
  browsers send cookies on a WebSocket upgrade, so pair this with the
  ``allowed_origins`` setting (cross-site pages are refused before this
  runs);
* ``"query"`` - the query parameter ``query`` (default ``token``); query
  strings end up in access logs, prefer the others;
* ``"subprotocol"`` - a ``Sec-WebSocket-Protocol`` entry
  ``<subprotocol_prefix><token>`` (default prefix ``bearer.``), the one
  place a browser's ``new WebSocket(url, protocols)`` can carry a token
  without a cookie.  The answer selects another offered subprotocol when
  there is one, else echoes that entry (browsers require the answer to be
  one they offered).

On success the upgrade is accepted and the connection's ``store`` holds
``"claims"`` (the verified claims) and ``"user"`` (the ``user_claim``,
default ``"sub"``); ``then(request, claims)`` (optional, sync or async) may
refuse (return or raise :class:`fastws.Reject`) or choose the answer
(return :class:`fastws.Accept`).  On failure the answer is ``401`` with
``WWW-Authenticate: Bearer`` and a body that says nothing about why (the
reason is logged at debug level and counted in ``failures``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

from .app import Accept
from .errors import Reject

try:
    import jwt
except ImportError as exc:  # an optional dependency: say what to install
    raise ImportError('fastws.auth needs PyJWT: pip install "fastws[auth]"') from exc

log = logging.getLogger("fastws")

SOURCES = ("header", "cookie", "query", "subprotocol")
_UNAUTHORIZED = [("WWW-Authenticate", "Bearer")]


class TokenAuth:
    """An ``on_connect`` callback that verifies a JWT (see the module docstring)."""

    def __init__(self, *, keys, algorithms=("HS256",), issuer: str | None = None,
                 audience: str | None = None, leeway: float = 0.0,
                 required_claims=("exp",), sources=SOURCES, header: str = "authorization",
                 cookie: str = "access_token", query: str = "token",
                 subprotocol_prefix: str = "bearer.", user_claim: str = "sub", then=None) -> None:
        if isinstance(keys, (str, bytes)) or not keys:
            keys = [keys] if keys else []
        if not keys:
            raise ValueError("TokenAuth needs at least one key")
        algorithms = list(algorithms)
        if not algorithms or any(a.lower() == "none" for a in algorithms):
            raise ValueError("TokenAuth needs signing algorithms, and never 'none'")
        unknown = [s for s in sources if s not in SOURCES]
        if unknown or not sources:
            raise ValueError(f"token sources are {', '.join(SOURCES)}; got {list(sources)}")
        self.keys = keys                    # list of keys, or {kid: key}
        self.algorithms = algorithms
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.required = list(required_claims)
        self.sources = tuple(sources)
        self.header = header.lower()
        self.cookie = cookie
        self.query = query
        self.prefix = subprotocol_prefix
        self.user_claim = user_claim
        self.then = then
        self.then_is_async = then is not None and inspect.iscoroutinefunction(then)
        #: refused upgrades by reason: missing, malformed, expired, invalid
        self.failures = {"missing": 0, "malformed": 0, "expired": 0, "invalid": 0}

    # -- the token --------------------------------------------------------------

    def token_of(self, request):
        """``(token, subprotocol it came in)`` from the first source that has
        one, else ``(None, None)``."""
        for source in self.sources:
            if source == "header":
                value = request.header(self.header)
                if value:
                    scheme, _, token = value.strip().partition(" ")
                    if scheme.lower() == "bearer" and token.strip():
                        return token.strip(), None
            elif source == "cookie":
                token = _cookie(request.header("cookie"), self.cookie)
                if token:
                    return token, None
            elif source == "query":
                token = request.query.get(self.query)
                if token:
                    return token, None
            else:
                for proto in request.subprotocols:
                    if self.prefix and proto.startswith(self.prefix) and len(proto) > len(self.prefix):
                        return proto[len(self.prefix):], proto
        return None, None

    def verify(self, token: str) -> dict:
        """The claims of ``token``; ``jwt.InvalidTokenError`` if it does not verify."""
        options = {"require": self.required}
        kwargs = dict(algorithms=self.algorithms, leeway=self.leeway, options=options)
        if self.audience is not None:
            kwargs["audience"] = self.audience
        if self.issuer is not None:
            kwargs["issuer"] = self.issuer
        if isinstance(self.keys, Mapping):
            kid = jwt.get_unverified_header(token).get("kid")
            if kid not in self.keys:
                raise jwt.InvalidKeyError("no key for this token's kid")
            return jwt.decode(token, self.keys[kid], **kwargs)
        last = None
        for key in self.keys:
            try:
                return jwt.decode(token, key, **kwargs)
            except jwt.InvalidSignatureError as exc:   # another key may sign it (rotation)
                last = exc
        raise last

    # -- the on_connect callback -----------------------------------------------------

    def __call__(self, request):
        token, carrier = self.token_of(request)
        if token is None:
            return self._refuse("missing", request)
        try:
            claims = self.verify(token)
        except jwt.ExpiredSignatureError:
            return self._refuse("expired", request)
        except jwt.DecodeError:
            return self._refuse("malformed", request)
        except (jwt.InvalidTokenError, ValueError, TypeError):
            return self._refuse("invalid", request)
        accept = self._accept(request, claims, carrier)
        if self.then is None:
            return accept
        if self.then_is_async:
            return self._then_async(request, claims, accept)
        return _merge(accept, self.then(request, claims))

    async def _then_async(self, request, claims, accept):
        return _merge(accept, await self.then(request, claims))

    def _accept(self, request, claims: dict, carrier):
        subprotocol = None
        if carrier is not None:
            others = [p for p in request.subprotocols if p != carrier]
            subprotocol = others[0] if others else carrier
        return Accept(subprotocol=subprotocol,
                      store={"claims": claims, "user": claims.get(self.user_claim)})

    def _refuse(self, reason: str, request):
        self.failures[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws: token refused (%s) for %s", reason, request.path)
        return Reject(401, "unauthorized", list(_UNAUTHORIZED))


def _merge(accept: Accept, decision):
    """The verifier's acceptance, with what ``then`` decided on top."""
    if decision is None or decision is True:
        return accept
    if isinstance(decision, Accept):
        store = dict(accept.store or {})
        store.update(decision.store or {})
        return Accept(subprotocol=decision.subprotocol or accept.subprotocol,
                      headers=decision.headers, store=store)
    return decision        # a Reject, or False (403)


def _cookie(header, name: str):
    """The value of cookie ``name`` in a ``Cookie`` header, or None."""
    if not header:
        return None
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"') or None
    return None


__all__ = ["TokenAuth", "SOURCES"]
