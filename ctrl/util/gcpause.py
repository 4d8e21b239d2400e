"""Pause Python's cyclic garbage collector around bulk work.

Decoding a list of 100,000 endpoints and planning them allocate hundreds of
thousands of small objects, none in a reference cycle; the cyclic collector
would walk every live endpoint each time it triggers, which more than
doubles that work. Reference counting frees the garbage either way. The
source's threads and the agent's sync may pause at once: a counter makes
the collector run again only when the last of them is done.

When it does, what the pause made is frozen first (gc.freeze, O(1)): the
collector counts allocations while disabled, so the first allocation after
it is enabled again would start a collection walking every object made
during the pause (24 ms after a list of 10,000 slices). Frozen objects are
still freed by reference counting; a reference cycle among them waits for
the agent's periodic full collection, which unfreezes everything first
(Agent.after_sync).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = True


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.freeze()
                gc.enable()
