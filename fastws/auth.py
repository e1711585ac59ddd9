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

Needs PyJWT with its cryptography extra: ``pip install "fastws[auth]"``.

What it checks (PyJWT does the cryptography): the signature with one of
``keys``, the algorithm (only those in ``algorithms``, as the token's header
names it; ``none`` is never accepted), ``exp`` (required by default),
``nbf`` and ``iat`` with ``leeway`` seconds of clock skew, ``iss`` ==
``issuer`` and ``aud`` containing ``audience`` when those are given (a token
with an ``aud`` is refused when no ``audience`` is given), and any other
``required_claims``.

Keys: HMAC secrets (``HS256/384/512``: str or bytes), or public keys for
``RS*``, ``PS*``, ``ES*`` and ``EdDSA`` (PEM text, or ``cryptography`` key
objects; a private key is reduced to its public half).  Each key is loaded
once, here, for every listed algorithm it suits; a key that suits none of
them is a ValueError now rather than a refused client later.  Several keys
(rotation): a list is tried in turn for the token's algorithm, so an old and
a new key are both valid while clients move over; a mapping ``{kid: key}``
picks the key named by the token's ``kid`` header (an unknown ``kid`` is
refused).

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
  place a browser's ``new WebSocket(url, ["chat", "bearer." + jwt])`` can
  carry a token without a cookie.  A browser fails the connection unless the
  answer names one of the entries it offered, so the answer is: the first
  other offered entry that is in ``subprotocols`` (the ones the application
  speaks; any other offered entry when ``subprotocols`` is None), else the
  token entry itself.

On success the upgrade is accepted and the connection's ``store`` holds
``"claims"`` (the verified claims) and ``"user"`` (the ``user_claim``,
default ``"sub"``); ``then(request, claims)`` (optional, sync or async) may
refuse (return False for 403, or return or raise :class:`fastws.Reject`) or
choose the answer (return :class:`fastws.Accept`; its ``store`` is added to
the claims).  On failure the answer is ``401`` with ``WWW-Authenticate:
Bearer`` and the same body whatever went wrong (the reason is logged at
debug level and counted in ``failures``: ``missing``, ``malformed``,
``expired``, ``invalid``; a running server exports them as
``websocket_auth_failures_total{reason}`` for every route whose
``on_connect`` is a TokenAuth).

ASGI applications (FastAPI, Starlette) authenticate in the framework, e.g.
a dependency: :meth:`TokenAuth.token_of` takes a fastws request, a
Starlette ``WebSocket``/``Request`` or an ASGI scope, and
:meth:`TokenAuth.verify` returns the claims (see docs/asgi.md).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs

from .app import Accept, Decision
from .errors import Reject

try:
    import jwt
    from jwt.algorithms import get_default_algorithms
except ImportError as exc:  # an optional dependency: say what to install
    raise ImportError('fastws.auth needs PyJWT: pip install "fastws[auth]"') from exc

log = logging.getLogger("fastws")

SOURCES = ("header", "cookie", "query", "subprotocol")
_UNAUTHORIZED = [("WWW-Authenticate", "Bearer")]
_BODY = "unauthorized"

#: ``then(request, claims)``: the app's decision once the token verified
#: (plain or ``async def``; answers as ``on_connect`` does)
Then = Callable[[Any, dict[str, Any]], Decision | Awaitable[Decision]]


class TokenAuth:
    """An ``on_connect`` callback that verifies a JWT (see the module docstring)."""

    def __init__(self, *, keys: object, algorithms: str | Iterable[str] = ("HS256",), issuer: str | None = None,
                 audience: str | None = None, leeway: float = 0.0,
                 required_claims: Iterable[str] = ("exp",), sources: str | Iterable[str] = SOURCES,
                 header: str = "authorization", cookie: str = "access_token", query: str = "token",
                 subprotocol_prefix: str = "bearer.", subprotocols: Iterable[str] | None = None,
                 user_claim: str = "sub", then: Then | None = None) -> None:
        if isinstance(algorithms, str):
            algorithms = [algorithms]
        algorithms = list(algorithms)
        if not algorithms or any(str(a).lower() == "none" for a in algorithms):
            raise ValueError("TokenAuth needs signing algorithms, and never 'none'")
        known = get_default_algorithms()
        missing = [a for a in algorithms if a not in known or a == "none"]
        if missing:
            raise ValueError(f"unknown or unavailable JWT algorithms {missing} (RS*, PS*, ES* and "
                             'EdDSA need cryptography: pip install "fastws[auth]")')
        sources = (sources,) if isinstance(sources, str) else tuple(sources)
        unknown = [s for s in sources if s not in SOURCES]
        if unknown or not sources:
            raise ValueError(f"token sources are {', '.join(SOURCES)}; got {list(sources)}")
        if "subprotocol" in sources and not subprotocol_prefix:
            raise ValueError("the subprotocol source needs a subprotocol_prefix")
        self.by_kid = isinstance(keys, Mapping)
        self.algorithms = algorithms
        #: algorithm -> [(kid, loaded key), ...] of the keys that suit it
        self.keys = _load_keys(keys, algorithms, known)
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.required = list(required_claims)
        self.sources = sources
        self.header = header.lower()
        self.cookie = cookie
        self.query = query
        self.prefix = subprotocol_prefix
        self.subprotocols = None if subprotocols is None else list(subprotocols)
        self.user_claim = user_claim
        self.then = then
        self.then_is_async = then is not None and inspect.iscoroutinefunction(then)
        #: refused upgrades by reason: missing, malformed, expired, invalid
        self.failures: dict[str, int] = {"missing": 0, "malformed": 0, "expired": 0, "invalid": 0}

    # -- the token --------------------------------------------------------------

    def token_of(self, request: Any) -> tuple[str | None, str | None]:
        """``(token, the subprotocol entry it came in)`` from the first source
        that has one, else ``(None, None)``.  ``request``: a fastws
        :class:`~fastws.handshake.Request`, an object with an ASGI ``scope``
        (Starlette's ``WebSocket`` and ``Request``), or a scope itself."""
        header, query, offered = _fields(request)
        for source in self.sources:
            if source == "header":
                value = header(self.header)
                if value:
                    scheme, _, bearer = value.strip().partition(" ")
                    if scheme.lower() == "bearer" and bearer.strip():
                        return bearer.strip(), None
            elif source == "cookie":
                token = _cookie(header("cookie"), self.cookie)
                if token:
                    return token, None
            elif source == "query":
                token = query(self.query)
                if token:
                    return token, None
            else:
                for proto in offered:
                    if proto.startswith(self.prefix) and len(proto) > len(self.prefix):
                        return proto[len(self.prefix):], proto
        return None, None

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of ``token``; a ``jwt.InvalidTokenError`` (or another
        ``jwt.PyJWTError``) when it does not verify."""
        header = jwt.get_unverified_header(token)         # DecodeError when malformed
        alg = header.get("alg")
        candidates = self.keys.get(alg) if isinstance(alg, str) else None
        if not candidates:
            raise jwt.InvalidAlgorithmError("the token's algorithm is not allowed")
        if self.by_kid:
            kid = header.get("kid")
            candidates = [c for c in candidates if c[0] == kid]
            if not candidates:
                raise jwt.InvalidKeyError("no key for the token's kid")
        kwargs: dict[str, Any] = {"algorithms": [alg], "leeway": self.leeway, "options": {"require": self.required}}
        if self.audience is not None:
            kwargs["audience"] = self.audience
        if self.issuer is not None:
            kwargs["issuer"] = self.issuer
        last = jwt.InvalidSignatureError("no key verifies the token")   # (candidates is never empty)
        for _, key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(token, key, **kwargs)
                return claims
            except jwt.InvalidSignatureError as exc:   # another key may sign it (rotation)
                last = exc
        raise last

    def claims(self, request: Any) -> dict[str, Any] | None:
        """The verified claims of ``request``'s token, or None (the reason is
        counted in ``failures`` and logged at debug level)."""
        return self._check(request)[0]

    def subprotocol_for(self, request: Any, carrier: str | None) -> str | None:
        """The ``Sec-WebSocket-Protocol`` answer when the token came in the
        offered entry ``carrier`` (see the module docstring); None when it
        did not come in one."""
        if carrier is None:
            return None
        _, _, offered = _fields(request)
        others = [p for p in offered if p != carrier and not p.startswith(self.prefix)]
        if self.subprotocols is not None:
            others = [p for p in others if p in self.subprotocols]
        return others[0] if others else carrier

    # -- the on_connect callback -----------------------------------------------------

    def __call__(self, request: Any) -> Decision | Awaitable[Decision]:
        claims, carrier = self._check(request)
        if claims is None:
            return Reject(401, _BODY, list(_UNAUTHORIZED))
        accept = Accept(subprotocol=self.subprotocol_for(request, carrier),
                        store={"claims": claims, "user": claims.get(self.user_claim)})
        if self.then is None:
            return accept
        if self.then_is_async:
            return self._then_async(request, claims, accept)
        decision = self.then(request, claims)
        if inspect.isawaitable(decision):      # a plain callable that answered with a coroutine
            return self._await_then(decision, accept)
        return _merge(accept, decision)

    def _check(self, request: Any) -> tuple[dict[str, Any] | None, str | None]:
        token, carrier = self.token_of(request)
        if token is None:
            self._refused("missing", request)
            return None, None
        try:
            return self.verify(token), carrier
        except jwt.ExpiredSignatureError:
            reason = "expired"
        except jwt.InvalidSignatureError:         # (a DecodeError too: tested first)
            reason = "invalid"
        except jwt.DecodeError:
            reason = "malformed"
        except Exception as exc:  # whatever a crafted token makes the decoder raise
            if log.isEnabledFor(logging.DEBUG):
                log.debug("fastws: token check raised %s: %s", type(exc).__name__, exc)
            reason = "invalid"
        self._refused(reason, request)
        return None, None

    async def _then_async(self, request: Any, claims: dict[str, Any], accept: Accept) -> Decision:
        assert self.then is not None           # then_is_async says there is one
        decision = self.then(request, claims)
        assert inspect.isawaitable(decision)
        return _merge(accept, await decision)

    @staticmethod
    async def _await_then(decision: Awaitable[Decision], accept: Accept) -> Decision:
        return _merge(accept, await decision)

    def _refused(self, reason: str, request: Any) -> None:
        self.failures[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws: token refused (%s) for %s", reason, getattr(request, "path", "?"))
        return None


def _load_keys(keys: object, algorithms: list[str], known: Mapping[str, Any]) -> dict[str, list[tuple[Any, Any]]]:
    """``{algorithm: [(kid, loaded key), ...]}``: each key loaded once for
    every algorithm it suits; ValueError for no key, or a key no algorithm
    takes (named by position or kid, never shown)."""
    if isinstance(keys, Mapping):
        items = list(keys.items())
    elif isinstance(keys, (list, tuple)):
        items = [(None, k) for k in keys]
    else:
        items = [(None, keys)] if keys else []
    if not items:
        raise ValueError("TokenAuth needs at least one key")
    table: dict[str, list[tuple[Any, Any]]] = {alg: [] for alg in algorithms}
    for i, (kid, key) in enumerate(items):
        fits = 0
        for alg in algorithms:
            try:
                loaded = known[alg].prepare_key(key)
            except Exception:  # this key is not for this algorithm
                continue
            if not hasattr(loaded, "verify") and hasattr(loaded, "public_key"):
                loaded = loaded.public_key()           # a private key: verify with its public half
            table[alg].append((kid, loaded))
            fits += 1
        if not fits:
            name = f"key {kid!r}" if kid is not None else f"key #{i + 1}"
            raise ValueError(f"{name} suits none of the algorithms {algorithms} (an HMAC secret "
                             "for HS*, a public key for RS*/PS*/ES*/EdDSA)")
    return {alg: entries for alg, entries in table.items() if entries}


def _merge(accept: Accept, decision: Decision) -> Decision:
    """The verifier's acceptance, with what ``then`` decided on top."""
    if decision is None or decision is True:
        return accept
    if isinstance(decision, Accept):
        store = dict(accept.store or {})
        store.update(decision.store or {})
        return Accept(subprotocol=decision.subprotocol or accept.subprotocol,
                      headers=decision.headers, store=store)
    if isinstance(decision, str):             # a subprotocol, as on_connect may answer
        return Accept(subprotocol=decision, store=accept.store)
    return decision        # a Reject, or False (403)


def _fields(request: Any) -> tuple[Callable[[str], str | None], Callable[[str], str | None], list[str]]:
    """``(header(name), query(name), offered subprotocols)`` of a fastws
    request, of an object with an ASGI ``scope``, or of a scope."""
    scope = getattr(request, "scope", None)
    if scope is None and isinstance(request, Mapping):
        scope = request
    if not isinstance(scope, Mapping):
        return request.header, lambda name: request.query.get(name), request.subprotocols

    headers = scope.get("headers") or ()

    def header(name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in headers:
            if bytes(k).lower() == key:
                return bytes(v).decode("latin-1")
        return None

    def query(name: str) -> str | None:
        values = parse_qs(bytes(scope.get("query_string") or b"").decode("latin-1")).get(name)
        return values[0] if values else None

    return header, query, list(scope.get("subprotocols") or ())


def _cookie(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None."""
    if not header:
        return None
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"') or None
    return None


__all__ = ["TokenAuth", "SOURCES"]
