"""Typed stubs for the Cython extension fastws._core (see fastws/core.py for the contract).

tests/unit/test_connection_contract.py checks that the names and parameters
here are what the built extension exports.
"""

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .frames import DeflateParams

CONT: int
TEXT: int
BINARY: int
CLOSE: int
PING: int
PONG: int
ERROR: int
OPEN: int
CLOSING: int
CLOSED: int
PRIORITY_LOW: int
PRIORITY_NORMAL: int
PRIORITY_HIGH: int
DELIVERY_LATENCY_BUCKETS: tuple[float, ...]
DELIVERY_LATENCY_ROUTES: int

def encode_frame(opcode: int, payload: bytes | str, fin: bool = ..., mask: bytes | None = ...,
                 rsv1: bool = ...) -> bytes: ...
def utf8_valid(data: bytes) -> bool: ...
def _fast_accept_for_test(head: bytes, origins: str = ...) -> tuple[str, str, bytes, bool] | None: ...
def _sha1_for_test(data: bytes) -> bytes: ...

class _Route(Protocol):
    """What a connection needs of a route (any object with these).  A
    ``path`` attribute (a non-empty str), when the route has one, labels its
    connections' delivery-latency histogram in ``Hub.stats()`` (else "asgi")."""

    on_open: Callable[[Connection], Any] | None
    on_message: Callable[[Connection, str | bytes], Any] | None
    on_disconnect: Callable[[Connection, int, str], Any] | None
    open_is_async: bool
    message_is_async: bool
    disconnect_is_async: bool

class Engine:
    state: int
    close_code: int | None
    close_reason: str | None
    max_message_size: int
    max_frame_size: int
    def __init__(self, *, max_message_size: int = ..., max_frame_size: int = ...,
                 deflate: DeflateParams | None = ..., client: bool = ...) -> None: ...
    def receive(self, data: bytes) -> list[tuple[Any, ...]]: ...
    def data_to_send(self) -> bytes: ...
    def send(self, message: str | bytes) -> bytes: ...
    def encode_message(self, opcode: int, payload: bytes) -> bytes: ...
    def ping(self, payload: bytes = ...) -> bytes: ...
    def close(self, code: int = ..., reason: str = ...) -> bytes: ...
    @property
    def sent_close(self) -> tuple[int, str] | None: ...
    @property
    def client(self) -> bool: ...

class Hub:
    loop: Any
    handshake: Callable[[Connection, bytes | None], None] | None
    connections: dict[int, Connection]
    node_id: str
    max_message_size: int
    max_frame_size: int
    max_head_size: int
    close_timeout: float
    on_callback_error: Callable[[Connection, BaseException], None] | None
    on_lost: Callable[[Connection], None] | None
    on_closed: Callable[[Connection], None] | None
    rooms: Any
    high_water: int
    max_queue: int
    slow_grace: float
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    slow_consumer_closes: int
    closes: dict[int | str, int]
    dropped: dict[tuple[str, int], int]
    handshake_timeouts: int
    ping_timeouts: int
    idle_timeouts: int
    body_timeouts: int
    ping_interval: float
    ping_timeout: float
    idle_timeout: float
    handshake_timeout: float
    body_timeout: float
    max_messages_per_second: float
    max_bytes_per_second: int
    rate_burst_seconds: float
    rate_limited: dict[str, int]
    tick: float
    fast_upgrades: int
    def __init__(self, loop: Any, handshake: Callable[[Connection, bytes | None], None] | None = ..., *,
                 max_message_size: int = ..., max_frame_size: int = ..., max_head_size: int = ...,
                 close_timeout: float = ...,
                 on_callback_error: Callable[[Connection, BaseException], None] | None = ...,
                 high_water: int = ..., max_queue: int = ..., slow_grace: float = ...,
                 ping_interval: float = ..., ping_timeout: float = ..., idle_timeout: float = ...,
                 handshake_timeout: float = ..., body_timeout: float = ...,
                 max_messages_per_second: float = ..., max_bytes_per_second: int = ...,
                 rate_burst_seconds: float = ..., node_id: str = ..., tick: float | None = ...) -> None: ...
    def connection_factory(self) -> Connection: ...
    def connection(self, conn_id: str | int) -> Connection | None: ...
    @property
    def rate_window(self) -> tuple[int, int, int]: ...
    def set_fast_upgrade(self, routes: dict[str, _Route | None] | None, default: _Route | None = ..., *,
                         max_connections: int = ..., deflate: bool = ..., origins: str = ...) -> None: ...
    def stop_timers(self) -> None: ...
    @property
    def scheduled(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def broadcast(self, message: str | bytes, connections: Iterable[Connection],
                  exclude: Connection | None = ..., priority: int = ...) -> int: ...
    def broadcast_frame(self, opcode: int, payload: bytes, connections: Iterable[Connection],
                        exclude: Connection | None = ..., priority: int = ...) -> int: ...
    @property
    def open_connections(self) -> int: ...

class Connection(Engine):
    path: str | None
    query_string: str | None
    subprotocol: str | None
    route: Any
    rooms: Any
    dropped: int
    def __init__(self, hub: Hub) -> None: ...
    # asyncio (buffered) protocol
    def connection_made(self, transport: Any) -> None: ...
    def get_buffer(self, sizehint: int) -> Any: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def feed(self, data: bytes) -> None: ...
    # the upgrade decision
    def accept_upgrade(self, response: bytes, route: _Route, path: str, query_string: str,
                       subprotocol: str | None = ..., deflate: DeflateParams | None = ...) -> bool: ...
    def reject_upgrade(self, response: bytes) -> None: ...
    def hold_upgrade(self) -> None: ...
    def reserve_id(self) -> str: ...
    def read_body(self, size: int, callback: Callable[[bytes], None]) -> None: ...
    def adopt(self, transport: Any, response: bytes, route: _Route, path: str, query_string: str,
              subprotocol: str | None = ..., deflate: DeflateParams | None = ..., early: bytes = ...) -> None: ...
    # the application's API
    def send(self, message: str | bytes) -> None: ...  # type: ignore[override]
    def send_frame(self, frame: bytes) -> None: ...
    def ping(self, payload: bytes = ...) -> None: ...  # type: ignore[override]
    def close(self, code: int = ..., reason: str = ...) -> None: ...  # type: ignore[override]
    def abort(self) -> None: ...
    def join(self, room: str, namespace: str | None = ..., batch: bool = ...) -> None: ...
    def leave(self, room: str, namespace: str | None = ...) -> None: ...
    @property
    def id(self) -> str | None: ...
    @property
    def number(self) -> int: ...
    @property
    def backlog(self) -> int: ...
    @property
    def remote_address(self) -> Any: ...
    @property
    def timer_state(self) -> tuple[int, int, int, int, int]: ...
    @property
    def store(self) -> dict[str, Any]: ...
    @property
    def closed(self) -> bool: ...
