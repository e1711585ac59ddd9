"""Typed stubs for the Cython extension fastws._core."""

from typing import Any, Callable, Iterable

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

def encode_frame(opcode: int, payload: bytes | str, fin: bool = ..., mask: bytes | None = ..., rsv1: bool = ...) -> bytes: ...
def utf8_valid(data: bytes) -> bool: ...

class Engine:
    state: int
    close_code: int | None
    close_reason: str | None
    max_message_size: int
    max_frame_size: int
    def __init__(self, *, max_message_size: int = ..., max_frame_size: int = ..., deflate: Any = ...) -> None: ...
    def receive(self, data: bytes) -> list[tuple]: ...
    def data_to_send(self) -> bytes: ...
    def send(self, message: str | bytes) -> bytes: ...
    def ping(self, payload: bytes = ...) -> bytes: ...
    def close(self, code: int = ..., reason: str = ...) -> bytes: ...

class Hub:
    loop: Any
    handshake: Callable[[Connection, bytes | None], None]
    connections: dict[int, Connection]
    max_message_size: int
    max_frame_size: int
    max_head_size: int
    close_timeout: float
    on_callback_error: Callable[[Connection, BaseException], None] | None
    def __init__(self, loop: Any, handshake: Callable[..., None], *, max_message_size: int = ...,
                 max_frame_size: int = ..., max_head_size: int = ..., close_timeout: float = ...,
                 on_callback_error: Any = ...) -> None: ...
    def connection_factory(self) -> Connection: ...
    def broadcast(self, message: str | bytes, connections: Iterable[Connection], exclude: Connection | None = ...) -> int: ...
    @property
    def open_connections(self) -> int: ...

class Connection(Engine):
    id: int | None
    path: str | None
    query_string: str | None
    subprotocol: str | None
    route: Any
    def send(self, message: str | bytes) -> None: ...  # type: ignore[override]
    def send_frame(self, frame: bytes) -> None: ...
    def ping(self, payload: bytes = ...) -> None: ...  # type: ignore[override]
    def close(self, code: int = ..., reason: str = ...) -> None: ...  # type: ignore[override]
    def abort(self) -> None: ...
    @property
    def remote_address(self) -> Any: ...
    @property
    def store(self) -> dict: ...
    @property
    def closed(self) -> bool: ...
