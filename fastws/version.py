"""The version of fastws (layer 1: imports nothing from fastws)."""

__version__ = "0.1.0.dev0"
