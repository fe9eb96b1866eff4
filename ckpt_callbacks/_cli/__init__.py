"""``python -m ckpt_callbacks`` / ``ckpt-callbacks``: ls, inspect, verify, gc, export."""

from ._main import main

__all__ = ["main"]
