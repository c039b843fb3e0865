"""The cyclic garbage collector while the process serves requests.

    with serving(): ...   start-up objects frozen, young passes ten times rarer

Tests and `keyproxy dev` run several apps in one process at once: the first to start tunes
the collector, the last to stop puts back what was there.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_GC_THRESHOLD = 7000  # allocations between passes of the cyclic collector (default 700)

_serving = 0
_thresholds = gc.get_threshold()


@contextlib.contextmanager
def serving() -> Iterator[None]:
    """The collector tuned for serving, for as long as any app of the process serves."""
    global _serving, _thresholds  # noqa: PLW0603  # the collector is one per process too
    # What is loaded now (modules, the compiled configuration, cached keys) lives as long as
    # the app: out of the collector's full passes, so their cost per request does not grow
    # with the number of routes and policies.
    gc.collect()
    gc.freeze()
    if not _serving:
        # A young-generation pass walks every object of the requests in flight, and by
        # default one runs every 700 allocations (each 30 requests at 32 in flight): passes
        # ten times rarer cost a tenth as much (7-10 us per request at c=32 before), and the
        # garbage that waits for them is the few reference cycles requests leave (most objects
        # are freed as they are dropped).
        _thresholds = gc.get_threshold()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *_thresholds[1:])
    _serving += 1
    try:
        yield
    finally:
        _serving -= 1
        if not _serving:
            gc.unfreeze()  # what the apps leave behind is collectable again
            gc.set_threshold(*_thresholds)
