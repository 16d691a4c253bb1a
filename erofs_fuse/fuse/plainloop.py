"""The daemon's request loop without trio, for the mounts that never need an event loop.

trio is pyfuse3's event loop; the daemon needs it only to hand reads to worker threads
(``--threads``, and layers whose reads may wait on a network). Every other mount is served by
one thread that polls ``/dev/fuse`` and answers each request in turn (pyfuse3 patch 07,
``serve_until``: patches 02 and 05 had made trio's loop do the same between its own passes).
Importing trio took 85-135 ms of the daemon's start (more with its modules' files out of the page
cache), and the kernel holds a new mount's first request until INIT is answered, so the first
access to a mount waited that long: `erofs-fuse mount` of the bench stack answered its first
listing 0.42 s after the command started, against 0.25-0.27 s without trio.

Signals to stop (SIGTERM, SIGINT, SIGHUP) interrupt the loop's wait; their handler only notes
them, and the loop ends between requests. The daemon's other threads keep them blocked, so
they reach this one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Callable, Iterable

import pyfuse3

from .operations import Operations

log = logging.getLogger(__name__)

# How long one wait for a request lasts at most. A signal ends the wait at once; this bounds
# the delay where one came at the wrong moment (just before the wait began).
IDLE_POLL_MS = 1000
# serve_until's own bound: the loop calls it again.
ROUND_SECONDS = 3600.0


def eligible(ops: Operations) -> bool:
    """Whether ``ops`` can be served without trio: patched pyfuse3, no read threads, no reads
    that wait on a network, and the main thread (signal handlers can be set only there). Where
    trio is loaded already (the snapshotter's fork server loads it for the mounts that need
    it), this loop still costs less per request than trio's. ``EROFS_FUSE_LOOP=trio`` asks for
    trio's loop, to compare."""
    return (getattr(pyfuse3, "serve_until", None) is not None and ops.read_threads == 0
            and not ops.blocking_reads
            and threading.current_thread() is threading.main_thread()
            and os.environ.get("EROFS_FUSE_LOOP") != "trio")


def serve(ops: Operations, stop_signals: Iterable[signal.Signals],
          warm_up: Callable[[], None]) -> None:
    """Serve until unmounted or a stop signal comes; ``warm_up`` runs once INIT is answered.
    The stop signals are blocked on entry (held since the mount was made) and on return."""
    stops = tuple(stop_signals)
    stopped: list[int] = []
    warmed = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)

    def done() -> bool:
        return bool(stopped) or (ops.initialized and not warmed)

    # patch 07's functions, which pyfuse3's type stubs do not declare
    serve_until: Callable[[Callable[[], bool], int, float], int] = getattr(pyfuse3, "serve_until")
    exited: Callable[[], bool] = getattr(pyfuse3, "exited")
    log.debug("serving without trio")
    previous = {signum: signal.signal(signum, on_signal) for signum in stops}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # one sent meanwhile arrives now
    try:
        # a signal that ended the wait has been noted by the time the loop comes back here
        # (Python runs pending handlers at the loop's backward jump)
        while not stopped and not exited():
            serve_until(done, IDLE_POLL_MS, ROUND_SECONDS)
            if ops.initialized and not warmed:
                warmed = True
                # the threads it starts inherit the mask: the signals must come to this one
                signal.pthread_sigmask(signal.SIG_BLOCK, stops)
                try:
                    warm_up()
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped:
        log.info("%s: unmounting", signal.Signals(stopped[0]).name)
