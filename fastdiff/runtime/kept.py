"""Prepared objects kept between calls: one least-recently-used get-or-build, shared by the prepared
loops of :func:`fastdiff.sample` and the executors of :func:`fastdiff.runtime.loop.run_plan`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


def kept(cache: OrderedDict, lock: threading.Lock, key: Hashable, build: Callable[[], Any], size: int) -> Any:
    """The entry of ``key`` in ``cache``, or ``build()`` kept there on a miss; the ``size`` entries
    used last are kept. ``key`` must be hashable (the caller decides what cannot be kept). ``build``
    runs outside ``lock``: building may take a while and may raise (then nothing is kept)."""
    with lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    value = build()
    with lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)
    return value
