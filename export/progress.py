"""Progress within long steps, reported by the code doing the work and shown by whoever listens (the CLI).

    with progress.listening(sink):              # the CLI: sink(label, done, total)
        ...
        progress.tick("text_decoder", 2, 3)      # a target's lowering, the verification, ...

Without a listener a tick costs nothing, so library code reports unconditionally.
"""
from __future__ import annotations

import contextlib
from typing import Callable

Sink = Callable[[str, int, int], None]
_sinks: list[Sink] = []


@contextlib.contextmanager
def listening(sink: Sink):
    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.remove(sink)


def tick(label: str, done: int, total: int) -> None:
    """`done` of `total` units of the current step are finished; `label` names what is being worked on now."""
    for sink in _sinks:
        sink(label, done, total)
