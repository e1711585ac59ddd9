"""One Config for the CLI and the library: every knob, its default and check.

Layering (defaults < TOML file < FASTWS_* environment < CLI flags) is the
operations issue's work; today the CLI and ``App.serve``/``fastws.run`` both
build this same object from keywords, and every value is validated here with
an error that names the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import ConfigError


@dataclass
class Config:
    host: str = "127.0.0.1"                  # address to listen on
    port: int = 8000                         # TCP port (0: pick a free one)
    max_message_size: int = 1 << 20          # bytes; larger messages close with 1009; 0 = no limit
    max_frame_size: int = 0                  # bytes; 0 = same as max_message_size
    max_head_size: int = 8192                # bytes of HTTP request head; larger -> 431
    compression: bool = False                # negotiate permessage-deflate (RFC 7692)
    close_timeout: float = 5.0               # seconds to wait for the peer's close frame
    backlog: int = 4096                      # listen(2) backlog
    reuse_port: bool = False                 # SO_REUSEPORT (several processes on one port)
    log_level: str = "info"                  # debug, info, warning, error
    shutdown_timeout: float = 10.0           # seconds a graceful shutdown waits

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond, key, allowed):
            if not cond:
                raise ConfigError(key, getattr(self, key), allowed)

        for f in fields(self):
            v = getattr(self, f.name)
            t = f.type
            if t == "int":
                need(isinstance(v, int) and not isinstance(v, bool), f.name, "an integer")
            elif t == "float":
                need(isinstance(v, (int, float)) and not isinstance(v, bool), f.name, "a number")
            elif t == "bool":
                need(isinstance(v, bool), f.name, "true or false")
            elif t == "str":
                need(isinstance(v, str), f.name, "a string")
        need(0 <= self.port <= 65535, "port", "0..65535")
        need(self.max_message_size >= 0, "max_message_size", "bytes >= 0 (0 = no limit)")
        need(self.max_frame_size >= 0, "max_frame_size", "bytes >= 0 (0 = no limit)")
        need(self.max_head_size >= 256, "max_head_size", "bytes >= 256")
        need(self.close_timeout >= 0, "close_timeout", "seconds >= 0")
        need(self.shutdown_timeout >= 0, "shutdown_timeout", "seconds >= 0")
        need(self.backlog > 0, "backlog", "an integer > 0")
        need(self.log_level in ("debug", "info", "warning", "error"), "log_level",
             "one of debug, info, warning, error")
